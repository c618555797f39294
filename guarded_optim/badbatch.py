"""Bad batches: the fast half of the bad-data story (:mod:`.drift` is the slow half).

A shard of mislabelled examples does its damage in a few steps: on the natural suite's
digits MLP the probe loss doubles within 4 bad steps, each step inside the innovation band
(its rise is 0.06-0.15 where the band allows 0.33-0.97: early on, and whenever the probe
falls fast, a fixed probe's innovations are wide), and the drift detector needs 8 to 12
steps to be sure. What the probe alone cannot tell quickly the batch tells at once: a model
that fits its data meets a mislabelled batch with a training loss 10-19x the largest recent one.

Neither sign is enough alone. A training-loss spike is also fresh data after a memorised
shard, the first batch of a new task or curriculum stage, a hard batch; a probe that rises
for one step is noise half the time. The spike is the evidence, the probe the veto: a batch
is bad when it is far from what the model has been fitting *and* far from what held-out
data costs it, *and* fitting it did not clearly help the held-out loss.

After the band accepted a measured proposal that is the only unverified step,
:class:`BadBatch` calls the batch *suspect* when its training loss ``L`` (read in the
step's one transfer, measured on the verified state before the update) spiked twice over:

* against recent batches: :class:`LossSpike`'s rule, more than ``factor - 1`` window
  magnitudes above the largest of the last ``window`` (50) applied losses of the same
  gradient signature, and
* against held-out data on the same weights: ``L > y_base + (factor - 1) |y_base|``,
  ``y_base`` the probe loss of the state the proposal started from (measured when that
  state was accepted; else the reference ``yhat``). A model that has memorised one batch has
  a window of near-zero losses, and every fresh batch spikes against it; it does not spike
  against the probe. (This assumes the probe is the training loss on held-out data, as the
  README recommends; a probe on another scale makes this test always or never pass.)

A suspect batch whose proposal did not lower the probe below ``y_base - s`` (``s`` the
band's noise scale, :meth:`NoiseBand.noise`; 0 under another threshold) is not applied: the
proposal is undone (the state is the verified one it started from), the step is a SKIP with
reason ``"bad_batch"`` (``stats["bad_batches"]``, a WARNING), its ``batch_id`` is
quarantined, and the loop is told to skip ahead (``StepEvent.skip_batches``):
``2 ** (n - 1) - 1`` batches at the ``n``-th such skip since the last applied step (0 for a
lone bad batch; 63 batches passed after 6, PaLM skipped 200-500). Why "lower by ``s``" and
not "raise": a permuted-label batch can leave the probe flat within 0.002 by chance (the
natural suite's mislabelled shard, seed 1, step 121), and a suspect batch let in teaches the
window its level, which blinds the rung to the rest of the shard. A suspect batch that
lowered the probe by more than ``s`` is new data the model should learn (a curriculum's next
stage the probe covers): applied, and its loss joins the window.

While the ladder heals (the back-off's LR scale is below 1) the rung stands aside and only
learns: the band has just rejected updates, so the optimizer, not the batch, is what it is
treating (fresh data after a memorised shard, where Adam's decayed second moment makes even
a backed-off update unhelpful: the natural suite's ``adam_v_decay``, ``--quick``, went from
1.37x to 1.83x final with the rung judging there).

Honest change that does not help the probe (a probe that covers only the old task) would
be skipped for ever; after ``patience`` skips in a row the next suspect batch is applied
and its loss learnt (``stats["bad_batch_rebased"]``, WARNING), and the drift rung judges
what follows. The rung's state goes back with a drift rewind (:mod:`.drift`).

Measured (``bench --suite natural``, 5 seeds; README has the table): the mislabelled digits
shard, full length, is caught at its first batch on every seed and skipped past in 6 steps;
its first batches are 10.6-18.7x by the window rule and about 30x the probe loss. Early in
training (``--quick``: the shard at step 60 of 150) the window still holds the first steps'
losses and one batch in 5 is caught: a 20-step window caught all there, but false-alarmed on
a clean regression (3.05x at step 222 of 300, whose training loss sits 90x above its clean
probe's). False alarms: on the 23 clean workloads of ``tests/test_clean_workloads.py`` x 5
seeds, the smaller of the two ratios (as the ``factor`` at which each would fire) among
steps whose proposal did not lower the probe by ``s`` was at most 1.45 (a Gaussian NLL
crossing zero; 1.12 elsewhere) against ``factor = 3``: a margin of 2.07. Smallest damage
skipped past: a shard with half its labels wrong (3 of 3 seeds); with 20-30% wrong one
seed in 3, the others let it in after one skip (the drift rung then judges). Blind spots: a
loop that hands the guard no loss (``opt.step()`` alone), a batch whose loss does not spike
(garbage bytes in the natural suite's byte-level LM: 2.6-2.7x at the first batch, then the
window has learnt them; one batch repeated falls instead), and ``probe_every > 1`` (no
measured proposal is one batch's own): those are left to the drift rung. Under a process
group the loss is averaged over the ranks in the step's one transfer, like the probe: every
rank must hand the guard its loss alike (all of them, or none).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

from . import validation
from .innovation import NoiseBand
from .outcome import Decision
from .rules import Ruling
from .signals.loss import LossSpike

__all__ = ["BadBatch"]


class BadBatch:
    """The bad-batch rung (see the module docstring): ``spike`` judges the batch's training
    loss, the probe its update; ``patience`` skips in a row before a suspect level is
    taken as the data's own."""

    name = "bad_batch"

    def __init__(self, spike: LossSpike | None = None, patience: int = 8):
        if spike is not None and not isinstance(spike, LossSpike):
            raise TypeError(f"spike must be a LossSpike() or None, got {spike!r}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"Invalid patience={patience!r}; need an int >= 1.")
        self.spike = spike if spike is not None else LossSpike()
        self.patience = patience
        self.streak = 0          # suspect batches skipped in a row
        self.base: tuple[int, float] | None = None   # (step verified at, its probe loss)

    def judge(self, guard, rec) -> Ruling | None:
        """A measured proposal the band accepted (``rec``). A :class:`Ruling` (SKIP): the
        batch is bad, the proposal already undone; ``None``: it goes on to be accepted, and
        its loss joins the window."""
        if rec.undone != 1 or rec.m.loss_value is None:   # not one batch's own update
            self.streak = 0
            return None
        base = self._base(guard, rec)
        suspect = (self.spike.judge(rec.m) and guard.ladder.lr_scale() >= 1.0
                   and rec.m.loss_value > base + (self.spike.factor - 1.0) * abs(base))
        if not suspect or rec.y < base - self._spread(guard):
            self._applied(rec)
            return None
        if self.streak >= self.patience:
            self._carry_on(guard, rec)
            return None
        self.streak += 1
        self._skip(guard, rec, base)
        return Ruling(Decision.SKIP, (self.name,), ("bad_batches",))

    def _applied(self, rec) -> None:
        """The batch goes on to be applied: its loss joins the window, its probe is the
        next proposal's base, the streak ends."""
        self.streak = 0
        self.spike.observe(rec.m, True, False)
        self.base = (rec.t + 1, rec.y)   # the probe of the state verified next

    def _base(self, guard, rec) -> float:
        """The probe loss of the state the proposal started from: measured when it was
        accepted, if that is the verified state now; else the reference ``yhat``."""
        step, y = self.base if self.base is not None else (None, None)
        return y if step == guard.safe_snapshot.step else rec.y - rec.nu

    @staticmethod
    def _spread(guard) -> float:
        """How far the probe moves per step by chance (:meth:`NoiseBand.noise`, the band's
        ``s_t``; 0 with a threshold that does not measure it)."""
        return guard.threshold.noise() if isinstance(guard.threshold, NoiseBand) else 0.0

    def _skip(self, guard, rec, base: float) -> None:
        """Undo the proposal, quarantine the batch, tell the loop how far to skip ahead."""
        st = guard.step_state
        self.spike.observe(rec.m, False, True)
        guard._learn(rec.pre, rec.m, False, rec.reading.fired)   # the step is not kept
        guard._restore()
        if rec.batch_id is not None:
            st.stats["quarantined"] += guard.ladder.quarantine.add(rec.batch_id)
        rec.event.skip_batches = max(rec.event.skip_batches, 2 ** (self.streak - 1) - 1)
        guard._log("bad_batch", logging.WARNING, "step %d: the batch's training loss %.4g "
                   "spiked and its update did not lower the probe loss beyond its noise "
                   "(%.4g, from %.4g): a bad batch, not applied%s; the loop skips %d batches "
                   "(StepEvent.skip_batches); opt.stats['bad_batches'] counts it", rec.t,
                   rec.m.loss_value, rec.y, base,
                   "" if rec.batch_id is None else f", batch {rec.batch_id!r} quarantined",
                   rec.event.skip_batches)

    def _carry_on(self, guard, rec) -> None:
        """``patience`` suspect batches in a row: this one is applied and its loss learnt."""
        guard.step_state.stats["bad_batch_rebased"] += 1
        guard._log("bad_batch_rebased", logging.WARNING, "step %d: %d suspect batches in a "
                   "row were skipped; the batches' new loss level (%.4g) is taken as the "
                   "data's own and training goes on (the drift rung judges what follows)",
                   rec.t, self.streak, rec.m.loss_value)
        self._applied(rec)

    def state_dict(self) -> dict[str, Any]:
        return {"spike": self.spike.state_dict(), "streak": self.streak,
                "base": None if self.base is None else list(self.base)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Checked first, then committed: a bad state changes nothing."""
        if not isinstance(state, dict) or not isinstance(state.get("spike"), dict):
            raise ValueError("bad_batch state lacks a 'spike' dict; save it with state_dict().")
        streak = validation.integer("bad_batch state['streak']", state.get("streak", 0))
        base = state.get("base")
        if base is not None:
            if not isinstance(base, (list, tuple)) or len(base) != 2:
                raise ValueError(f"bad_batch state['base'] is {base!r}; expected None or "
                                 "[step, probe loss].")
            base = (validation.integer("bad_batch state['base'][0]", base[0]),
                    validation.real("bad_batch state['base'][1]", base[1]))
        spike = copy.copy(self.spike)   # its settings (and class); the window is replaced
        spike.load_state_dict(state["spike"])
        self.spike, self.streak, self.base = spike, streak, base

    def reset(self) -> None:
        """Fresh: no window, no streak (a checkpoint from before this rung)."""
        self.spike.rebase()
        self.streak, self.base = 0, None

    def __repr__(self) -> str:
        return f"BadBatch({self.spike!r}, patience={self.patience})"

