"""What a snapshot copies, and whether the cached layout still fits the live optimizer.

A :class:`Layout` records the live tensors of one capture: the parameters (group order), the
tensor keys of each parameter's optimizer state and those tensors, the keys of its
non-tensor state, and the module buffers. It is built by :meth:`Layout.gather`, checked
cheaply at each capture (:meth:`Layout.stale`, :meth:`Layout.gather_state`) and used at a
restore to bring the live optimizer state back to the captured keys and shapes
(:meth:`Layout.relayout`). Nothing here allocates snapshot buffers or moves bytes
(:mod:`.transport` does).

Non-tensor optimizer state (LBFGS's direction history, counters) is copied whole at each
capture by :func:`copy_others` and put back by :func:`put_others`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch


def _flat_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (FSDP2), a view sharing its storage; ``t`` otherwise.

    Snapshots are rank-local: each rank copies exactly the tensors it holds."""
    return t.to_local() if hasattr(t, "to_local") else t


def _locals(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`_local` of each tensor (``ts`` itself when none is a ``DTensor``)."""
    return [_local(t) for t in ts] if any(hasattr(t, "to_local") for t in ts) else ts


def _layout(tensors: list[torch.Tensor]) -> list[tuple]:
    """Each tensor's dtype and device: a snapshot follows them (``model.double()``, ``.to()``)."""
    return [(t.dtype, t.device) for t in tensors]


def _versions(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's in-place write counter: any write (``copy_``, ``load_state_dict``) bumps it."""
    return [_local(t)._version for t in tensors]


def _buffered(v: Any) -> bool:
    """Whether an optimizer-state value gets a preallocated buffer: a dense (strided) tensor.
    Anything else (numbers, sparse tensors such as SGD's momentum for sparse gradients) is
    copied whole at each capture."""
    return isinstance(v, torch.Tensor) and v.layout == torch.strided


def _fingerprint(optimizer: torch.optim.Optimizer, buffers: list[torch.Tensor]) -> tuple:
    """Cheap layout key: changes when params are added, state appears, or state is reloaded.
    Item 3 is the number of parameters in the groups."""
    state = optimizer.state
    return (
        id(state), len(state), sum(map(len, state.values())),
        sum(len(g["params"]) for g in optimizer.param_groups), len(buffers),
    )


def module_buffers(module: torch.nn.Module | None) -> list[torch.Tensor]:
    """The module's buffers (none without a module)."""
    return [] if module is None else [b for b in module.buffers() if b is not None]


def same_shapes(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Whether ``a[i]`` and ``b[i]`` agree in shape and dtype (over the shorter list)."""
    return all(x.shape == y.shape and x.dtype == y.dtype for x, y in zip(a, b))


@dataclass
class Layout:
    """The live tensors one capture copies, and the keys that say where they belong.

    ``params``: live parameters, in group order. ``keys``: param index -> the keys of its
    dense tensor state, in capture order; ``state``: those live tensors, flattened in the
    same order, and ``devices`` where each lives (a restore recreates missing ones there).
    ``others``: param index -> the keys of its non-tensor state. ``buffers``: the module's
    buffers. ``fp``: :func:`_fingerprint` when built (``None``: rebuild at the next capture).
    ``placement``: each parameter's (dtype, device) when built.
    """

    params: list[torch.Tensor] = field(default_factory=list)
    keys: dict[int, list[str]] = field(default_factory=dict)
    others: dict[int, list[str]] = field(default_factory=dict)
    state: list[torch.Tensor] = field(default_factory=list)
    devices: list[torch.device] = field(default_factory=list)
    buffers: list[torch.Tensor] = field(default_factory=list)
    fp: tuple | None = None
    placement: list[tuple] = field(default_factory=list)

    @classmethod
    def gather(cls, optimizer: torch.optim.Optimizer, module: torch.nn.Module | None) -> "Layout":
        """The layout of the live parameters, optimizer state and module buffers now."""
        params = _flat_params(optimizer)
        keys: dict[int, list[str]] = {}
        others: dict[int, list[str]] = {}
        state: list[torch.Tensor] = []
        for i, p in enumerate(params):
            if p not in optimizer.state:
                continue
            keys[i] = []
            for k, v in optimizer.state[p].items():
                if _buffered(v):
                    keys[i].append(k)
                    state.append(v)
                else:
                    others.setdefault(i, []).append(k)
        buffers = module_buffers(module)
        return cls(params, keys, others, state, [t.device for t in state], buffers,
                   _fingerprint(optimizer, buffers), _layout(params))

    def copy(self) -> "Layout":
        """An independent record of the same live tensors (containers copied, not tensors)."""
        return Layout(list(self.params), {i: list(k) for i, k in self.keys.items()},
                      {i: list(k) for i, k in self.others.items()}, list(self.state),
                      list(self.devices), list(self.buffers), self.fp, list(self.placement))

    def stale(self, optimizer: torch.optim.Optimizer) -> bool:
        """Whether this layout no longer fits ``optimizer`` (never built, params added, state
        appeared or reloaded, a parameter's dtype or device changed, or a non-tensor state
        value became a tensor). Reads metadata only. The buffer count in the fingerprint is
        this layout's own, so module buffers added later are not seen here."""
        if self.fp is None or self.fp != _fingerprint(optimizer, self.buffers):
            return True
        if self.placement != _layout(self.params):   # model.double(), .to(device)
            return True
        state = optimizer.state  # a non-tensor entry that became a tensor (SGD momentum)
        return any(_buffered(state[self.params[i]].get(k))
                   for i, ks in self.others.items() for k in ks)

    def gather_state(self, optimizer: torch.optim.Optimizer) -> list[torch.Tensor] | None:
        """The live state tensors under :attr:`keys`, in order, or ``None`` if one is missing
        or is no longer a dense tensor."""
        state, live = optimizer.state, []
        for i, keys in self.keys.items():
            entry = state.get(self.params[i], {})
            for k in keys:
                t = entry.get(k)
                if not _buffered(t):
                    return None
                live.append(t)
        return live

    def relayout(self, optimizer: torch.optim.Optimizer, saved: list[torch.Tensor]) -> list[torch.Tensor]:
        """Bring the live optimizer state back to this layout and return its tensors (also
        stored as :attr:`state`): entries and keys the layout does not know are deleted, and
        a tensor that is missing or differs from ``saved`` (its snapshot copy, same order) in
        shape, dtype or device is replaced by an empty one to be filled."""
        known = {id(p): i for i, p in enumerate(self.params)}
        for p in list(optimizer.state):
            i = known.get(id(p))
            if i is None or (i not in self.keys and i not in self.others):
                del optimizer.state[p]
        live, pos = [], 0
        for i, keys in self.keys.items():
            entry = optimizer.state[self.params[i]]
            allowed = set(keys) | set(self.others.get(i, ()))
            for k in [k for k in entry if k not in allowed]:
                del entry[k]
            for k in keys:
                live.append(_fit(entry, k, saved[pos], self.devices[pos]))
                pos += 1
        self.state = live
        return live


def _fit(entry: dict[str, Any], k: str, saved: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``entry[k]`` if it is a tensor shaped, typed and placed like ``saved`` (on ``device``),
    else a new empty one stored there."""
    cur = entry.get(k)
    if not (isinstance(cur, torch.Tensor) and _local(cur).shape == saved.shape
            and cur.dtype == saved.dtype and cur.device == device):
        cur = entry[k] = torch.empty(saved.shape, dtype=saved.dtype, device=device)
    return cur


def split_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                state: dict[Any, dict[str, Any]]) -> tuple[dict, dict, list[tuple]]:
    """A saved ``state`` (param index -> {key: value}, as :meth:`Snapshot.state_dict` writes
    it) split into ``(keys, others, tensors)``: the dense tensor keys per index, the other
    values (deep copies) per index, and ``(value, device)`` per tensor in key order. The
    device is the live tensor's if there is one, else the parameter's (a 0-dim value, a step
    counter: the CPU)."""
    keys: dict[int, list[str]] = {}
    others: dict[int, dict[str, Any]] = {}
    tensors: list[tuple] = []
    for i, entry in sorted((int(i), e) for i, e in state.items()):
        keys[i], param = [], params[i]
        live = optimizer.state.get(param, {})
        for k, v in entry.items():
            if not _buffered(v):
                others.setdefault(i, {})[k] = copy.deepcopy(v)
                continue
            keys[i].append(k)
            cur = live.get(k)
            tensors.append((v, cur.device if isinstance(cur, torch.Tensor)
                            else param.device if v.dim() else torch.device("cpu")))
    return keys, others, tensors


# -- non-tensor optimizer state --------------------------------------------------------------
def _tree_to(obj: Any, device: torch.device | None) -> Any:
    """A copy of ``obj`` (state that is not a tensor per parameter: LBFGS's direction
    history, counters) with every tensor copied, to ``device`` when one is given (host mode:
    the CPU at capture, the parameter's device at restore), else where it is."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device if device is not None else obj.device, copy=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _tree_to(v, device) for k, v in obj.items()}
    return copy.deepcopy(obj)


def _first_device(obj: Any) -> torch.device | None:
    """The device of the first tensor in ``obj`` (a tensor, or lists/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for x in items:
        d = _first_device(x)
        if d is not None:
            return d
    return None


def copy_others(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
                others: dict[int, list[str]], host: bool) -> tuple[dict, dict]:
    """Copies of the non-tensor state under ``others`` (keys absent now are skipped), and,
    in ``host`` mode (tensors copied to the CPU), the device each key's tensors came from:
    ``(values, homes)`` with ``values[i][k]`` and ``homes[(i, k)]``."""
    to = torch.device("cpu") if host else None   # host mode: never a device clone
    values: dict[int, dict[str, Any]] = {}
    homes: dict[tuple[int, str], torch.device | None] = {}
    for i, ks in others.items():
        entry = optimizer.state[params[i]]
        values[i] = {k: _tree_to(entry[k], to) for k in ks if k in entry}
        if host:   # where each key's tensors live, to put them back there
            homes.update({(i, k): _first_device(entry[k]) for k in ks if k in entry})
    return values, homes


def put_others(optimizer: torch.optim.Optimizer, params: list[torch.Tensor],
               values: dict[int, dict[str, Any]], homes: dict, host: bool) -> None:
    """Write copies of ``values`` (from :func:`copy_others`) back into the optimizer state;
    in ``host`` mode each key's tensors go to its home (default: the parameter's device)."""
    for i, entry in values.items():
        home = params[i].device if host else None
        optimizer.state[params[i]].update(
            {k: _tree_to(v, homes.get((i, k), home) if home is not None else None)
             for k, v in entry.items()})
