"""GuardedOptimizer.state_dict / load_state_dict: serialisation, exact resume, bad input.

Everything here runs on a tiny Linear -> BatchNorm1d -> ReLU (-> Dropout) -> Linear model with
fixed seeds and a fixed 16-sample probe (see ``tiny.py``).
"""

from __future__ import annotations

import math

import copy

import pytest
import torch
from torch import nn

import tiny
from guarded_optim import GradientSpike, GuardedOptimizer, RelativeThreshold
from guarded_optim.innovation import NoiseBand

PROBE_SET, BATCHES = tiny.data(seed=0, steps=60)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers -------------------------------------------------------------------------------
def make_guard(m: nn.Module, probe: bool = True, **kw) -> GuardedOptimizer:
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    kw.setdefault("checkpoint_every", 5)  # so the ring of older snapshots is non-empty
    kw.setdefault("history", 3)
    kw.setdefault("save_history", True)  # older verified states are saved only on request
    return GuardedOptimizer(inner, tiny.probe_for(m, PROBE_SET) if probe else None,
                            module=m, **kw)


def train(m, opt, batches, spike_at=None, after=None):
    """Run one ``opt.step(closure)`` per batch; return the decisions.

    ``spike_at``: index of a batch whose step runs with lr=1e4 (set back right after).
    ``after``: called as ``after(i)`` after every step.
    """
    decisions = []
    for i, (x, y) in enumerate(batches):
        lrs = [g["lr"] for g in opt.param_groups]
        if i == spike_at:
            for g in opt.param_groups:
                g["lr"] = 1e4
        opt.step(tiny.closure_for(opt, m, x, y))
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        decisions.append(opt.last_decision)
        if after is not None:
            after(i)
    return decisions


def clone(x):
    """Deep copy with every tensor cloned (state_dict() returns live references)."""
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone(v) for v in x)
    return x


def assert_deep_equal(a, b, path="root"):
    """Exact equality: tensors by dtype, shape and value (torch.equal), the rest by ==."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype, (path, a.dtype, b.dtype)
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict), path
        assert a.keys() == b.keys(), (path, sorted(map(str, a.keys() ^ b.keys())))
        for k in a:
            assert_deep_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (u, v) in enumerate(zip(a, b)):
            assert_deep_equal(u, v, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        assert math.isnan(b), path
    else:
        assert type(a) is type(b) and a == b, (path, a, b)


def groups_content(opt):
    """param_groups as comparable data: hyper-parameters plus the identity of each param."""
    return [{k: (tuple(id(p) for p in v) if k == "params" else v) for k, v in g.items()}
            for g in opt.param_groups]


def everything(m, opt) -> dict:
    """All of the training state and the guard state, cloned, for exact comparison."""
    return {
        "train": tiny.full_state(m, opt),
        "groups": groups_content(opt),
        "yhat": opt.yhat, "y0": opt.y0, "t": opt.step_state.t, "unverified": opt.step_state.unverified,
        "last_decision": opt.last_decision,
        "stats": dict(opt.stats),
        "threshold": clone(opt.threshold.state_dict()),
        "signals": {s.name: clone(s.state_dict()) for s in opt.signals},
        "safe": clone(opt.safe_snapshot.state_dict()),
        "ring": clone(opt.snapshot_history.state_dict()),
    }


def trained_guard(steps=20, seed=0, **kw):
    m = tiny.model(seed)
    opt = make_guard(m, **kw)
    train(m, opt, BATCHES[:steps])
    return m, opt


# -- 1. serialisation round trip ------------------------------------------------------------
def test_state_dict_round_trips_through_torch_save_weights_only(tmp_path):
    """torch.save + torch.load(weights_only=True) restores every guard field in a fresh guard."""
    m, opt = trained_guard(steps=20)
    assert opt.safe_snapshot.captured and len(opt.snapshot_history) > 0  # snapshot and ring are really in the dict
    spike = next(s for s in opt.signals if isinstance(s, GradientSpike))
    assert spike.count > 0 and spike.buffer is not None

    sd = opt.state_dict()
    expected = clone(sd)
    torch.save(sd, tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert_deep_equal(loaded, expected)  # the file holds exactly what state_dict() returned

    m2 = tiny.model(seed=7)
    m2.load_state_dict(m.state_dict())
    opt2 = make_guard(m2)
    scrambled = torch.manual_seed(1234).get_state()
    opt2.load_state_dict(loaded)
    assert torch.equal(torch.get_rng_state(), scrambled)  # the load leaves the process RNG alone
    opt2.restore_rng_state(loaded)                         # ... until asked

    assert opt2.yhat == opt.yhat and opt2.y0 == opt.y0
    assert opt2.step_state.t == opt.step_state.t and opt2.step_state.unverified == opt.step_state.unverified
    assert opt2.step_state.consecutive == opt.step_state.consecutive and opt2.step_state.since_push == opt.step_state.since_push
    assert opt2.last_decision == opt.last_decision == "accept"
    assert opt2.stats == opt.stats
    assert opt2.threshold.state_dict() == opt.threshold.state_dict()
    spike2 = next(s for s in opt2.signals if isinstance(s, GradientSpike))
    assert torch.equal(spike2.buffer, spike.buffer)
    assert (spike2.count, spike2.consecutive, spike2.rebaselines) == \
        (spike.count, spike.consecutive, spike.rebaselines)
    assert expected["guard"]["safe"] is None and expected["guard"]["safe_is_live"]  # not copied twice
    assert_deep_equal(opt2.snapshot_history.state_dict(), opt.snapshot_history.state_dict())
    assert torch.equal(torch.get_rng_state(), expected["guard"]["rng"]["cpu"])
    # and the whole dict written back out is the one that was read in
    assert_deep_equal(opt2.state_dict(), expected)


def test_state_dict_holds_only_plain_data():
    """Only tensors and plain Python values: nothing that weights_only=True would refuse."""
    _, opt = trained_guard(steps=12)

    def walk(x, path="root"):
        if isinstance(x, dict):
            for k, v in x.items():
                assert isinstance(k, (str, int)), (path, k)
                walk(v, f"{path}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        else:
            assert x is None or isinstance(x, (torch.Tensor, bool, int, float, str)), \
                (path, type(x))

    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "guard"}
    walk(sd)


# -- 2. exact resume --------------------------------------------------------------------------
@pytest.mark.parametrize("probe_every,dropout", [(1, 0.0), (3, 0.0), (1, 0.3), (3, 0.3)],
                         ids=["k1", "k3", "k1-dropout", "k3-dropout"])
def test_resume_is_bit_identical_with_a_rollback_onto_the_loaded_snapshot(
        tmp_path, probe_every, dropout):
    """Save at step 30, continue 30 steps (one forced rollback); a resumed run matches exactly.

    The lr spike is placed on the first measured step after the resume point, so the rollback
    restores the snapshot that came out of the file, not one taken after loading.
    """
    first, rest = BATCHES[:30], BATCHES[30:60]

    # reference: one uninterrupted process
    m = tiny.model(seed=0, dropout=dropout)
    opt = make_guard(m, probe_every=probe_every)
    train(m, opt, first)
    assert opt.stats["skipped"] == 0 and opt.stats["rollbacks"] == 0
    assert opt.step_state.unverified == 0  # 30 is a multiple of probe_every: the resume point is verified
    torch.save(m.state_dict(), tmp_path / "model.pt")
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    at_save = {k: v.detach().clone() for k, v in m.state_dict().items()}
    spike_at = probe_every - 1  # the first measured step after the resume point

    ref_after_spike = {}
    ref_decisions = train(m, opt, rest, spike_at=spike_at, after=lambda i: ref_after_spike.update(
        {i: {k: v.detach().clone() for k, v in m.state_dict().items()}} if i == spike_at else {}))
    assert ref_decisions[spike_at] == "rollback"
    assert opt.stats["rollbacks"] == 1
    # the rollback went back to the state at the resume point
    assert_deep_equal(ref_after_spike[spike_at], at_save)
    reference = everything(m, opt)
    ref_guard = clone(opt.state_dict()["guard"])

    # resumed: fresh objects (a different init seed, so nothing matches by accident)
    m2 = tiny.model(seed=5, dropout=dropout)
    opt2 = make_guard(m2, probe_every=probe_every)
    m2.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    torch.manual_seed(999)  # scramble the RNG: the documented resume restores the saved one
    saved = torch.load(tmp_path / "opt.pt", weights_only=True)
    opt2.load_state_dict(saved)
    opt2.restore_rng_state(saved)

    after_spike = {}
    decisions = train(m2, opt2, rest, spike_at=spike_at, after=lambda i: after_spike.update(
        {i: {k: v.detach().clone() for k, v in m2.state_dict().items()}} if i == spike_at else {}))
    assert decisions == ref_decisions
    assert_deep_equal(after_spike[spike_at], at_save)  # the loaded snapshot was restored
    resumed = everything(m2, opt2)
    assert_deep_equal(resumed, {**reference, "groups": resumed["groups"]})
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    assert opt2.stats == opt.stats and opt2.last_decision == opt.last_decision
    assert_deep_equal(opt2.state_dict()["guard"], ref_guard)


def test_resume_without_restoring_rng_would_differ_with_dropout(tmp_path):
    """Sanity check of the test above: with dropout the RNG state matters for the next steps."""
    m = tiny.model(seed=0, dropout=0.3)
    opt = make_guard(m)
    train(m, opt, BATCHES[:10])
    sd = clone(opt.state_dict())
    msd = clone(m.state_dict())
    train(m, opt, BATCHES[10:15])
    reference = tiny.full_state(m, opt)

    m2 = tiny.model(seed=5, dropout=0.3)
    opt2 = make_guard(m2)
    m2.load_state_dict(msd)
    sd["guard"]["rng"]["cpu"] = torch.manual_seed(42).get_state()  # a different saved RNG
    opt2.load_state_dict(sd)
    opt2.restore_rng_state(sd)
    train(m2, opt2, BATCHES[10:15])
    other = tiny.full_state(m2, opt2)
    assert not torch.equal(other["param.0.weight"], reference["param.0.weight"])


# -- 3. a bare optimizer's checkpoint -------------------------------------------------------
def test_bare_adamw_state_dict_loads_and_training_continues_exactly(tmp_path):
    """Switching from a plain AdamW checkpoint: it loads, the guard starts afresh, and steps
    that are all accepted give exactly what the bare optimizer would have given."""
    m = tiny.model(seed=0)
    bare = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    for x, y in BATCHES[:10]:
        bare.step(tiny.closure_for(bare, m, x, y))
    torch.save(m.state_dict(), tmp_path / "model.pt")
    torch.save(bare.state_dict(), tmp_path / "bare.pt")
    for x, y in BATCHES[10:20]:
        bare.step(tiny.closure_for(bare, m, x, y))
    reference = tiny.full_state(m, bare)

    m2 = tiny.model(seed=5)
    m2.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    opt = make_guard(m2)
    opt.load_state_dict(torch.load(tmp_path / "bare.pt", weights_only=True))
    assert opt.yhat == opt.y0 is not None and opt.last_decision is None  # y(theta_0), measured now
    # theta_safe <- the loaded state (Algorithm 1, line 3), nothing older
    # (its steps numbered from the inner optimizer's count: the run's iteration 10)
    assert opt.safe_snapshot.captured and opt.safe_snapshot.step == 10 and len(opt.snapshot_history) == 0
    assert all(v == 0 for v in opt.stats.values())
    assert opt.state[next(m2.parameters())]["step"].item() == 10  # inner state is the bare one

    decisions = train(m2, opt, BATCHES[10:20])
    assert decisions == ["accept"] * 10
    assert opt.y0 is not None  # the guard measured its own reference after the load
    got = tiny.full_state(m2, opt)
    for key in reference:
        if key != "rng":
            assert_deep_equal(got[key], reference[key], key)


def test_bare_state_dict_resets_all_guard_state_of_a_used_guard():
    """A guard that already trained, then loads a bare checkpoint, is like a freshly built one."""
    m, opt = trained_guard(steps=20)
    bare_model = tiny.model(seed=3)
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1e-2, weight_decay=0.01)
    for x, y in BATCHES[:3]:
        bare.step(tiny.closure_for(bare, bare_model, x, y))
    opt.load_state_dict(clone(bare.state_dict()))

    fresh = make_guard(copy.deepcopy(m))   # a fresh guard of the same weights, loading the same
    fresh.load_state_dict(clone(bare.state_dict()))
    # measured afresh at the load; its steps numbered from the bare optimizer's 3
    assert opt.yhat == opt.y0 is not None and opt.step_state.t == 3
    assert opt.stats == fresh.stats
    assert opt.safe_snapshot.captured and opt.safe_snapshot.step == 3 and len(opt.snapshot_history) == 0
    assert opt.safe_snapshot.matches_live_params()
    assert opt.threshold.state_dict() == fresh.threshold.state_dict()
    assert_deep_equal({s.name: s.state_dict() for s in opt.signals},
                      {s.name: s.state_dict() for s in fresh.signals})


# -- 4. errors, and nothing changes on error --------------------------------------------------
def _other_model_same_counts(seed=1):
    """Different layer sizes, the same number of parameters (6) in the one group."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))


def _other_model_fewer_params(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


def _guarded_sd_of(model_fn, steps=6, probe=True):
    om = model_fn()
    probe_set = (PROBE_SET[0], PROBE_SET[1])
    inner = torch.optim.AdamW(om.parameters(), lr=1e-2, weight_decay=0.01)
    oopt = GuardedOptimizer(inner, tiny.probe_for(om, probe_set) if probe else None, module=om)
    train(om, oopt, BATCHES[:steps])
    return clone(oopt.state_dict())


def _bad_state_dicts(good):
    """name -> (bad state_dict, exception types, words the message must contain)."""
    inner = {"state": clone(good["state"]), "param_groups": clone(good["param_groups"])}
    wrong_version = clone(good)
    wrong_version["guard"]["version"] = 99
    return {
        "different-layer-sizes": (_guarded_sd_of(_other_model_same_counts),
                                  (ValueError,), ["match", "param"]),
        "different-param-count": (_guarded_sd_of(_other_model_fewer_params),
                                  (ValueError,), ["param"]),
        "missing-guard-key": ({"inner": inner, "foo": 1}, (ValueError,), ["guard"]),
        "only-inner": ({"inner": inner}, (ValueError,), ["guard"]),
        "wrong-version": (wrong_version, (ValueError,), ["version", "99"]),
        "not-a-dict-list": ([inner, good["guard"]], (TypeError,), ["dict", "list"]),
        "not-a-dict-none": (None, (TypeError,), ["dict"]),
    }


BAD_NAMES = ["different-layer-sizes", "different-param-count", "missing-guard-key", "only-inner",
             "wrong-version", "not-a-dict-list", "not-a-dict-none"]


def _check_failed_load_changes_nothing(m, opt, bad, exc_types, words):
    before = everything(m, opt)
    with pytest.raises(exc_types) as info:
        opt.load_state_dict(bad)
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, (w, msg)
    assert_deep_equal(everything(m, opt), before)
    return info


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_state_dict_raises_clearly_and_changes_nothing(name):
    m, opt = trained_guard(steps=12)
    bad, exc_types, words = _bad_state_dicts(clone(opt.state_dict()))[name]
    _check_failed_load_changes_nothing(m, opt, bad, exc_types, words)
    # and the guard still trains normally afterwards
    assert train(m, opt, BATCHES[12:15]) == ["accept"] * 3


def test_good_state_dict_still_loads_after_failed_attempts():
    m, opt = trained_guard(steps=12)
    good = clone(opt.state_dict())
    for name, (bad, exc_types, _) in _bad_state_dicts(clone(good)).items():
        with pytest.raises(exc_types):
            opt.load_state_dict(bad)
    opt.load_state_dict(good)
    opt.restore_rng_state(good)
    assert_deep_equal(opt.state_dict(), good)


def _check_atomic_then_clear(m, opt, bad, words):
    """Like _check_failed_load_changes_nothing, but checks atomicity before the error type."""
    before = everything(m, opt)
    try:
        opt.load_state_dict(bad)
    except Exception as exc:  # noqa: BLE001 - the type is asserted below
        err = exc
    else:
        pytest.fail("load_state_dict accepted a bad state_dict")
    assert_deep_equal(everything(m, opt), before)
    assert isinstance(err, (ValueError, TypeError)), repr(err)
    for w in words:
        assert w in str(err).lower(), (w, str(err))


@pytest.mark.parametrize("direction", ["fixed-into-relative", "relative-into-fixed"])
def test_state_from_a_guard_with_another_threshold_kind_is_rejected_atomically(direction):
    src_kw, dst_kw = ({"epsilon": 0.5}, {}) if direction == "fixed-into-relative" else \
        ({}, {"epsilon": 0.5})
    _, src = trained_guard(steps=12, **src_kw)
    m, opt = trained_guard(steps=5, seed=0, **dst_kw)
    assert isinstance(opt.threshold, NoiseBand) == (direction == "fixed-into-relative")
    _check_atomic_then_clear(m, opt, clone(src.state_dict()), ["threshold"])


def test_guard_dict_with_a_missing_field_is_rejected_atomically():
    m, opt = trained_guard(steps=12)
    bad = clone(opt.state_dict())
    train(m, opt, BATCHES[12:14])  # move on, so that a partial load would be visible
    del bad["guard"]["stats"]
    _check_atomic_then_clear(m, opt, bad, ["stats"])


def test_guard_entry_that_is_not_a_dict_is_rejected_clearly():
    m, opt = trained_guard(steps=12)
    sd = clone(opt.state_dict())
    bad = {"state": sd["state"], "param_groups": sd["param_groups"], "guard": None}
    _check_atomic_then_clear(m, opt, bad, ["guard"])


def test_different_model_is_rejected_also_without_a_probe():
    m, opt = trained_guard(steps=6, probe=False)
    bad = _guarded_sd_of(_other_model_same_counts, probe=False)
    _check_atomic_then_clear(m, opt, bad, ["param"])
