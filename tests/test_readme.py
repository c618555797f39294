"""The README as a newcomer meets it, executed: its Python blocks, the quickstart example, and
the path from a protected run through a resume to dropping the guard.

Which README blocks run: every fenced ```python block, in order, as ONE session (one
namespace, like a notebook: later blocks use the quickstart's ``model``, ``opt``, ``loader``),
in a temporary working directory. A block is left out only when the line just above its
fence (blank lines aside) is an HTML comment starting ``<!-- not-run``, e.g.
``<!-- not-run: the quickstart already runs this -->``; GitHub renders nothing for it. Blocks
in other languages (``bash``) never run. After a block runs, the checks registered in
``CHECKS`` for it (found by a line of its code) assert what the prose around it says.

``examples/quickstart.py`` must hold the README's first block verbatim, and it runs as a script,
the way a user runs it.

Everything here runs on one thread, in a few seconds of compute (280 small steps per
quickstart run), plus one interpreter start for the script.
"""

from __future__ import annotations

import ast
import copy
import logging
import os
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the quickstart trains on scikit-learn's bundled digits (extra: bench)")

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
QUICKSTART = ROOT / "examples" / "quickstart.py"
NOT_RUN = "<!-- not-run"
MAXIMIZE = "a param group has maximize=True"

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks(text: str) -> list[tuple[int, str, bool]]:
    """``(line number, code, runs)`` for each fenced Python block of ``text``."""
    lines = text.splitlines()
    out, i = [], 0
    while i < len(lines):
        if re.fullmatch(r"```python\s*", lines[i]):
            start = i
            j = i + 1
            while not lines[j].startswith("```"):
                j += 1
            above = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
            out.append((start + 1, "\n".join(lines[start + 1:j]) + "\n",
                        not above.strip().startswith(NOT_RUN)))
            i = j
        i += 1
    return out


def _stats(ns, name="opt"):
    return ns[name].stats


# what the prose around each block says, keyed by a line of the block's code
CHECKS = {
    "print(opt.stats)": lambda ns: (
        _stats(ns)["steps"] == _stats(ns)["accepted"] == _stats(ns)["measured"] > 0
        and _stats(ns)["rollbacks"] == _stats(ns)["skipped"] == 0
        and Path("ckpt.pt").exists()),
    "ascent.step()": lambda ns: (
        _stats(ns, "ascent")["accepted"] == _stats(ns, "ascent")["steps"] > 0
        and _stats(ns, "ascent")["rollbacks"] == 0),
    "no_probe.step(lambda: loss)": lambda ns: (
        [s.name for s in ns["no_probe"].signals] == ["nonfinite", "grad_spike", "loss_spike",
                                                    "nonfinite_weights", "weight_norm",
                                                    "optimizer_state"]
        and _stats(ns, "no_probe")["rollbacks"] == _stats(ns, "no_probe")["skipped"] == 0),
    "bare.load_state_dict(ckpt[\"opt\"])": lambda ns: (
        sorted(ns["ckpt"]["opt"]) == ["guard", "param_groups", "state"]
        and len(ns["bare"].state) == len(list(ns["model"].parameters()))),
    "opt.step(closure, batch_id=\"epoch 9, batch 0\")": lambda ns: (
        [(e.decision, e.reason) for e in ns["events"][:1]] == [("skip", "nonfinite")]
        and ns["events"][1].decision == "rollback" and "probe" in ns["events"][1].reason
        and ns["events"][1].action == "rerun:persistent,quarantine"
        and "epoch 9, batch 0" in ns["opt"].ladder.quarantine
        and [e.step for e in ns["events"]] == [280, 281]),   # the numbers the README prints
    "print(opt.stopped, opt.stats[\"backoffs\"], opt.last_event.lr_scale)": lambda ns: (
        not ns["opt"].stopped and _stats(ns)["backoffs"] == 9 and _stats(ns)["stops"] == 0
        and ns["events"][-1].lr_scale == 2.0 ** -8),   # the numbers the README prints
    "with CSVSink(\"guard.csv\") as sink:": lambda ns: (
        Path("guard.csv").read_text().startswith("step,decision,decision_code")
        and ns["opt"].last_decision == "accept"),
}


@pytest.fixture
def session_dir(tmp_path, monkeypatch):
    """A fresh working directory, and the logging setup put back afterwards (a README block
    calls ``logging.basicConfig``)."""
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield tmp_path
    root.handlers[:] = handlers
    root.setLevel(level)


def test_the_readme_marks_every_block_it_does_not_run():
    text = README.read_text()
    found = blocks(text)
    assert found and found[0][2], "the README opens with a runnable script"
    markers = [n for n, line in enumerate(text.splitlines(), 1) if line.strip().startswith(NOT_RUN)]
    skipped = [n for n, _, runs in found if not runs]
    assert len(markers) == len(skipped), "every not-run marker sits right above a python block"
    assert sum(runs for _, _, runs in found) >= 8
    for line, code, runs in found:
        if runs:
            compile(code, f"README.md:{line}", "exec")
    ran = "".join(code for _, code, runs in found if runs)
    for key in CHECKS:
        assert key in ran, f"no runnable README block has {key!r}"


def test_readme_python_blocks_run_in_order_as_one_session(session_dir, capsys):
    ns: dict = {"__name__": "__main__"}
    for line, code, runs in blocks(README.read_text()):
        if not runs:
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, f"README.md:{line}", "exec"), ns)
        # the README says the guard warns about maximize=True with a probe, and nothing else does
        ours = [str(w.message)[:len(MAXIMIZE)] for w in caught if issubclass(w.category, UserWarning)
                and ("guarded_optim" in w.filename or w.filename.startswith("README.md"))]
        assert ours == ([MAXIMIZE] if "maximize=True" in code else []), (line, ours)
        for key, check in CHECKS.items():
            if key in code:
                assert check(ns), f"README.md:{line}: the block ran, but {key!r}'s check failed"
    out = capsys.readouterr().out
    assert "epoch 9: probe loss" in out
    assert "280 skip nonfinite None" in out
    assert "False 9 0.00390625" in out   # healed, not stopped: the line the README prints


def test_examples_quickstart_is_the_readme_script():
    first = blocks(README.read_text())[0][1]
    assert first in QUICKSTART.read_text(), ("examples/quickstart.py must contain the README's "
                                             "first block verbatim")


def test_examples_quickstart_runs_as_a_script(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(QUICKSTART)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "guarded_optim" not in run.stderr, run.stderr[-3000:]   # no warning from the guard
    lines = run.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:-1]] == [f"epoch {e}" for e in range(10)]
    stats = ast.literal_eval(lines[-1])   # the printed dict of ints
    assert stats["steps"] == stats["accepted"] == 280 and stats["rollbacks"] == stats["skipped"] == 0
    assert (tmp_path / "ckpt.pt").exists()


class Interrupted(Exception):
    """The job killed right after a checkpoint was written."""


def _run_quickstart(directory: Path, monkeypatch, kill_after_saves: int | None = None) -> dict:
    monkeypatch.chdir(directory)
    real_save, saves = torch.save, []
    if kill_after_saves is not None:
        def save(*args, **kwargs):
            real_save(*args, **kwargs)
            saves.append(1)
            if len(saves) == kill_after_saves:
                raise Interrupted
        monkeypatch.setattr(torch, "save", save)
    try:
        return runpy.run_path(str(QUICKSTART), run_name="__main__")
    finally:
        monkeypatch.setattr(torch, "save", real_save)


def test_newcomer_path_protected_run_resume_then_drop_the_guard(tmp_path, monkeypatch, capsys):
    # 1. a protected run, start to end
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _run_quickstart(tmp_path / "a", monkeypatch)

    # 2. the same job killed after epoch 3's checkpoint, then started again: it resumes and
    #    ends bit for bit where the uninterrupted run ended
    with pytest.raises(Interrupted):
        _run_quickstart(tmp_path / "b", monkeypatch, kill_after_saves=4)
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["epoch"] == 3
    capsys.readouterr()
    resumed = _run_quickstart(tmp_path / "b", monkeypatch)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in printed[:-1]] == [f"epoch {e}" for e in range(4, 10)]
    for a, b in zip(whole["model"].state_dict().values(), resumed["model"].state_dict().values()):
        assert torch.equal(a, b)
    assert whole["opt"].stats == resumed["opt"].stats
    sa, sb = whole["opt"].state_dict(), resumed["opt"].state_dict()
    for i, state in sa["state"].items():
        for k, v in state.items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)

    # 3. drop the guard: the checkpoint loads into a bare AdamW, which holds the same state...
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert sorted(ckpt["opt"]) == ["guard", "param_groups", "state"]
    model, opt = resumed["model"], resumed["opt"]
    twin = copy.deepcopy(model)      # another copy of the model, from the checkpoint
    twin.load_state_dict(ckpt["model"])
    bare = torch.optim.AdamW(twin.parameters(), lr=3e-3)
    bare.load_state_dict(ckpt["opt"])
    for i, (p, q) in enumerate(zip(model.parameters(), twin.parameters())):
        for k, v in opt.state[p].items():
            assert torch.equal(v, bare.state[q][k]), (i, k)

    # ... and takes the step the guard takes (an accepted step is the inner AdamW's own)
    for group in (*opt.param_groups, *bare.param_groups):
        group["lr"] = 1e-3          # the cosine schedule ended at 0
    xb, yb = resumed["X"][64:128], resumed["y"][64:128]
    for net, optimizer in ((model, opt), (twin, bare)):
        torch.manual_seed(1)         # the same dropout masks
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(xb), yb).backward()
        optimizer.step()
    assert opt.last_decision == "accept"
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)
