"""The benchmark command runs end to end and reports numbers it measured."""

import csv

import pytest

from guarded_optim.bench.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_bench_reports_measured_numbers(tmp_path, capsys):
    assert main(["bench", "--quick", "--task", "mlp", "--seeds", "1", "--steps", "80",
                 "--fault", "lr_x1000", "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "guarded_probe" in out and "bare" in out
    rows = {r["arm"]: r for r in csv.DictReader(open(tmp_path / "protocol.csv"))}
    bare, guarded = float(rows["bare"]["final_ratio"]), float(rows["guarded_probe"]["final_ratio"])
    assert bare > 5 and guarded < 2                       # the fault hurts; the guard recovers
    assert float(rows["guarded_probe"]["interventions_in_window"]) > 0
    assert float(rows["guarded_probe"]["false_interventions"]) == 0
    assert float(rows["skip_nonfinite"]["final_ratio"]) == pytest.approx(float(rows["bare"]["final_ratio"]))
    curves = list(csv.DictReader(open(tmp_path / "curves.csv")))
    assert {r["arm"] for r in curves} == {"clean", *rows}
