"""The GPU suite (``bench --suite gpu``): its dry run on the CPU writes every file with the
documented columns and no timing claims; without CUDA the real run refuses cleanly; the
trace reading, the junit parsing and the sync-warning attribution are checked on inputs
made here (no GPU needed)."""

from __future__ import annotations

import csv
import gzip
import json
import warnings

import pytest
import torch

from guarded_optim.bench import gpu
from guarded_optim.bench.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu")
    assert main(["bench", "--suite", "gpu", "--dry-run", "--quiet", "--out", str(out)]) == 0
    return out


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_dry_run_writes_the_files_with_their_columns(dry):
    assert sorted(p.name for p in dry.iterdir()) == sorted(gpu.FILES)
    assert all((dry / name).stat().st_size < 1 << 20 for name in gpu.FILES)
    arms = {r["arm"]: r for r in _rows(dry / "gpu.csv")}
    assert list(arms) == ["bare", "guard_probe_every_1", "guard_probe_every_10", "guard_no_probe"]
    for r in arms.values():
        assert {"params", "ms_per_step", "ratio", "ratio_min", "ratio_max", "ms_verify_steps",
                "peak_device_MiB", "pinned_exact_MiB", "pinned_reserved_MiB",
                "pinned_measured_MiB", "staging_MiB", "syncs_per_step", "reps", "rollbacks",
                "skips"} <= set(r)
        assert r["ms_per_step"] == r["ratio"] == ""          # dry run: no timing claims
        assert int(r["params"]) == int(arms["bare"]["params"]) > 0
    assert float(arms["bare"]["pinned_exact_MiB"]) == 0
    assert float(arms["guard_no_probe"]["pinned_reserved_MiB"]) >= float(
        arms["guard_no_probe"]["pinned_exact_MiB"]) > 0
    tests = _rows(dry / "gpu_tests.csv")
    assert len(tests) >= 10 and {t["outcome"] for t in tests} == {"skipped"}
    assert {"test", "outcome", "seconds", "message"} <= set(tests[0])
    with gzip.open(dry / "gpu_trace.json.gz", "rt") as f:
        assert json.load(f)["traceEvents"]


def test_dry_run_sync_counts_match_the_documented_table(dry):
    rows = {r["arm/step_type"]: r for r in _rows(dry / "gpu_syncs.csv")}
    assert set(rows) == {f"{arm}/{kind}" for arm, kinds in gpu.EXPECTED_SYNCS.items() for kind in kinds}
    assert all(r["match"] == "yes" for r in rows.values()), rows
    assert rows["guard_no_probe/verification"]["steps"] == "2"
    assert rows["guard_probe_every_1/measured"]["sites"] == "guard.py:_measure_proposal guard.py:_read"


def test_dry_run_summary_makes_no_timing_claims(dry):
    text = (dry / "gpu.md").read_text()
    assert "dry run: no timing claims" in text
    for heading in ("## Step time and memory", "## Host syncs per step type", "## CUDA tests",
                    "## Profiler trace"):
        assert heading in text
    assert "no device activity in the trace" in text


def test_without_cuda_the_gpu_suite_exits_with_a_message(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--suite", "gpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and "--dry-run" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def _event(cat, name, stream, ts, dur):
    return {"ph": "X", "cat": cat, "name": name, "pid": 0, "tid": stream, "ts": ts, "dur": dur,
            "args": {"device": 0, "stream": stream}}


def test_trace_overlap_reads_overlap_and_waits_from_the_events():
    k = lambda ts, dur: _event("kernel", "gemm", 7, ts, dur)                  # noqa: E731
    d2h = lambda ts, dur: _event("gpu_memcpy", "Memcpy DtoH (Device -> Pinned)", 23, ts, dur)  # noqa: E731
    # capture 1 (0-100 us, two copies) lies under compute kernels 0-200: overlapped, no wait
    # capture 2 (1000-1300) half overlaps kernels 900-1150; compute resumes at 1310: a wait
    events = [k(0, 200), d2h(0, 60), d2h(60, 40), k(900, 250), d2h(1000, 300), k(1310, 100),
              _event("gpu_memcpy", "Memcpy DtoH (Device -> Pageable)", 7, 1150, 5),
              {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 5}]
    r = gpu.trace_overlap(events)
    assert r["captures"] == 2 and r["waited"] == 1
    assert r["copy_ms"] == pytest.approx(0.4)
    assert r["overlap_fraction"] == pytest.approx((100 + 150) / 400)
    assert r["wait_ms"] == pytest.approx(0.15)
    assert r["compute_stream"] == "7" and r["copy_stream"] == "23"
    assert "only in part" in r["reading"] and "waited on 1 of 2" in r["reading"]
    # copies that end under compute are never waited on
    r = gpu.trace_overlap([k(0, 1000), d2h(100, 200), d2h(2000, 10), k(1500, 1000)])
    assert r["waited"] == 0 and r["captures"] == 2 and "never waited" in r["reading"]
    assert "no device activity" in gpu.trace_overlap([])["reading"]
    assert "off the compute stream" in gpu.trace_overlap([k(0, 5)])["reading"]


def test_parse_junit(tmp_path):
    path = tmp_path / "j.xml"
    path.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="test_a" time="0.5"/>'
        '<testcase classname="t" name="test_b" time="1"><failure message="assert 1 == 2&#10;more">'
        'trace</failure></testcase>'
        '<testcase classname="t" name="test_c" time="0"><skipped message="needs two GPUs"/></testcase>'
        '<testcase classname="t" name="test_d" time="0"><error message="fixture broke"/></testcase>'
        '</testsuite></testsuites>')
    rows = {r["test"]: r for r in gpu.parse_junit(str(path))}
    assert [rows[t]["outcome"] for t in "test_a test_b test_c test_d".split()] == [
        "passed", "failed", "skipped", "error"]
    assert rows["test_b"]["message"] == "assert 1 == 2" and rows["test_a"]["seconds"] == 0.5


def test_a_sync_warning_is_attributed_to_the_function_that_synchronised():
    counter = gpu._SyncCounter(cuda=False)

    def _read_flags():   # stands in for the guard's read: the warning names this frame
        warnings.warn(gpu.SYNC_MESSAGE)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = counter._on_warning(warnings.showwarning)
        with counter.step():
            _read_flags()
            _read_flags()
    assert counter.steps == [["test_gpu_suite.py:_read_flags"] * 2]   # file:function


def test_parse_verbose_keeps_the_tests_a_killed_run_finished():
    text = ("============ test session starts ============\n"
            "tests/test_cuda.py::test_a PASSED                      [  5%]\n"
            "tests/test_cuda.py::test_b[x-1] SKIPPED (needs two GPUs) [ 10%]\n"
            "tests/test_cuda.py::test_c FAILED                      [ 15%]\n"
            "tests/test_cuda.py::test_d ")
    assert [(r["test"], r["outcome"]) for r in gpu.parse_verbose(text)] == [
        ("test_a", "passed"), ("test_b[x-1]", "skipped"), ("test_c", "failed")]
