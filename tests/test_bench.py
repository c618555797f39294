"""The benchmark runs end to end and reports numbers it measured; its metrics are exact."""

import csv
import math

import pytest

from guarded_optim.bench import report
from guarded_optim.bench.cli import main
from guarded_optim.bench.scenarios import ABLATIONS, SCENARIOS, Run, scenario_faults
from guarded_optim.events import StepEvent

pytestmark = pytest.mark.usefixtures("one_thread")


def test_quick_protocol_reports_measured_numbers(tmp_path, capsys):
    assert main(["bench", "--suite", "protocol", "--quick", "--task", "mlp", "--seeds", "1",
                 "--steps", "80", "--fault-start", "60", "--fault", "lr_x1000", "--repeats", "3",
                 "--out", str(tmp_path), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "guarded_probe" in out and "bare" in out
    rows = {r["arm"]: r for r in csv.DictReader(open(tmp_path / "protocol_mlp.csv"))}
    bare, guarded = float(rows["bare"]["final_ratio"]), float(rows["guarded_probe"]["final_ratio"])
    assert bare > 5 and guarded < 2                       # the fault hurts; the guard recovers
    assert float(rows["guarded_probe"]["interventions_in_window"]) > 0
    assert float(rows["guarded_probe"]["false_interventions"]) == 0
    assert float(rows["skip_nonfinite"]["final_ratio"]) == pytest.approx(bare)
    assert float(rows["guarded_probe"]["overhead"]) > 0 and float(rows["bare"]["overhead"]) == 1
    curves = list(csv.DictReader(open(tmp_path / "curves_mlp.csv")))
    assert {r["arm"] for r in curves} == {"clean", *rows}
    assert all(float(r["param_norm"]) > 0 for r in curves if r["arm"] == "clean")
    assert any(r["decision"] == "rollback" for r in curves if r["arm"] == "guarded_probe")
    pytest.importorskip("matplotlib", reason="figures need matplotlib (the bench extra)")
    for fig in ("probe_loss", "param_norm", "innovation"):
        assert (tmp_path / f"mlp_{fig}.png").stat().st_size > 1000


def test_quick_scenarios_and_ablation_tables(tmp_path, capsys):
    assert main(["bench", "--suite", "scenarios", "--quick", "--scenarios", "clean", "nan_bomb",
                 "lr_x1000", "--out", str(tmp_path), "--quiet"]) == 0
    rows = {r["model/scenario"]: r for r in csv.DictReader(open(tmp_path / "scenarios.csv"))}
    assert rows["mlp/nan_bomb"]["bare_outcome"] == "crashed"
    assert rows["mlp/lr_x1000"]["bare_outcome"] == "damaged"
    for arm in ("guarded_probe", "guarded_signals"):
        assert rows["mlp/nan_bomb"][f"{arm}_outcome"] == "ok"
        assert rows["mlp/clean"][f"{arm}_outside"] == "0"          # no false alarm
    summary = {r["model/arm"]: r for r in csv.DictReader(open(tmp_path / "scenario_summary.csv"))}
    assert summary["mlp/guarded_probe"]["bare_hurt"] == "2"
    assert summary["mlp/guarded_probe"]["ended_ok"] == "2"


def test_quick_ablation_has_a_row_per_guard(tmp_path, capsys):
    assert main(["bench", "--suite", "ablation", "--quick", "--repeats", "1", "--out",
                 str(tmp_path), "--quiet"]) == 0
    rows = {r["guard"]: r for r in csv.DictReader(open(tmp_path / "ablation.csv"))}
    assert set(rows) == set(ABLATIONS)
    caught, hurt = map(int, rows["default"]["caught"].split("/"))
    assert hurt >= 4 and caught == hurt and rows["default"]["false_alarms"] == "0"
    assert all(float(r["overhead"]) > 0 for r in rows.values())


def test_scenario_registry():
    assert len(SCENARIOS) >= 30
    assert sum(s.control for s in SCENARIOS.values()) >= 3
    for s in SCENARIOS.values():
        faults = scenario_faults(s, start=80, steps=150, seed=0).faults
        assert (not faults) == (s.name == "clean")
        for f in faults:       # every window lies inside the run
            assert 0 <= f.start and f.start + f.length <= 150


def test_steps_to_recover():
    clean = [1.0] * 10
    assert report.steps_to_recover([1.0] * 10, clean, 3) == 0
    assert report.steps_to_recover([1, 1, 1, 9, 9, 1, 1.2, 1, 1, 1], clean, 3) == 2
    assert report.steps_to_recover([1, 1, 1, 9, 1, 9, 1, 1, 1, 1], clean, 3) == 3   # must stay back
    assert report.steps_to_recover([1, 1, 1, 9, 1, 1, 1, 1, 1, math.nan], clean, 3) is None
    assert report.steps_to_recover([1, 1, 1, 1, 1, 1, 1, 1, 1, 2], clean, 3) is None


def test_outcome_and_interventions():
    assert report.outcome(1.0) == "ok" and report.outcome(1.25) == "ok"
    assert report.outcome(1.3) == "damaged" and report.outcome(math.inf) == "crashed"
    assert report.outcome(math.nan) == "crashed"
    events = [StepEvent(t, d) for t, d in enumerate(["accept", "skip", "accept", "rollback",
                                                     "accept", "accept", "rollback"])]
    run = Run("x", 0, [1.0] * 7, [1.0] * 7, events)
    assert report.interventions(run, start=2, length=1) == (1, 2)   # window [2, 3]


def test_protocol_table_numbers_come_from_the_runs():
    clean = {0: Run("bare", 0, [4.0, 2.0, 1.0, 1.0], [1.0] * 4)}
    runs = [Run("bare", 0, [4.0, 2.0, 8.0, 3.0], [1.0] * 4),
            Run("guarded", 0, [4.0, 2.0, 1.0, 1.1], [1.0] * 4, [StepEvent(2, "skip")],
                {"skipped": 1, "rollbacks": 0})]
    table = report.protocol_table(runs, clean, start=2, length=1)
    assert table["bare"]["final_ratio"] == 3.0 and table["bare"]["peak_ratio"] == 8.0
    assert table["bare"]["recovered_runs"] == 0 and math.isnan(table["bare"]["steps_to_recover"])
    assert table["guarded"]["final_ratio"] == pytest.approx(1.1)
    assert table["guarded"]["steps_to_recover"] == 0
    assert table["guarded"]["interventions_in_window"] == 1 and table["guarded"]["skips"] == 1


def test_format_table_aligns_measured_values():
    text = report.format_table({"a": {"x": 1.23456, "y": math.inf}, "bb": {"x": 12345.0, "y": math.nan}},
                               key="arm")
    lines = text.splitlines()
    assert len({len(line) for line in lines}) == 1
    assert "1.235" in text and "1.23e+04" in text and "inf" in text and " -" in text


def test_resnet18_is_the_standard_architecture():
    import torch

    from guarded_optim.bench.models import ResNet18
    model = ResNet18(in_channels=3, classes=10)
    # torchvision's resnet18 with a 3x3 stem and 10 classes has 11,173,962 parameters
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_identical_arms_are_drawn_once_and_named_together():
    def run(arm, seed, curve):
        return Run(arm, seed, curve, [1.0] * len(curve))
    runs = [run("bare", 0, [3.0, 2.0, 5.0]), run("bare", 1, [3.0, 2.0, 6.0]),
            run("guarded", 0, [3.0, 2.0, 1.0]), run("guarded", 1, [3.0, 2.0, 1.5]),
            run("naive", 0, [3.0, 2.0, 5.0]), run("naive", 1, [3.0, 2.0, 6.0]),
            run("almost", 0, [3.0, 2.0, 5.0]), run("almost", 1, [3.0, 2.0, 6.000001]),
            run("crashed", 0, [3.0, math.nan]), run("crashed2", 0, [3.0, math.nan])]
    groups = report.same_arms(runs)
    assert groups == {"bare": ["bare", "naive"], "guarded": ["guarded"], "almost": ["almost"],
                      "crashed": ["crashed", "crashed2"]}
    assert report._group_label(groups["bare"]) == "bare (= naive)"


def test_innovation_figure_plots_the_ratio_and_labels_only_what_is_drawn():
    plt = pytest.importorskip("matplotlib.pyplot",
                              reason="figures need matplotlib (the bench extra)")
    import numpy as np

    def legend(events):
        fig = report._innovation_figure(plt, np, "mlp", Run("guarded_probe", 0, [], [], events),
                                        start=2, length=1, fault="lr_x1000")
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        ys = fig.axes[0].get_lines()[2].get_ydata()     # after the zero and decision lines
        plt.close(fig)
        return labels, ys

    def ev(t, decision, nu=None, eps=None):
        return StepEvent(t, decision, innovation=nu, threshold=eps)

    labels, ys = legend([ev(0, "accept", -0.5, 2.0), ev(1, "accept", 1.0, 2.0),
                         ev(2, "accept", -4.0, 2.0)])
    assert not any("rollback" in x or "skip" in x or "non-finite" in x for x in labels)
    assert any("below -1" in x for x in labels)
    assert list(ys) == [-0.25, 0.5, -1.0]                  # nu / epsilon, clipped at -1
    labels, ys = legend([ev(0, "accept", 0.1, 1.0), ev(1, "skip"),
                         ev(2, "rollback", 50.0, 1.0), ev(3, "rollback", math.inf, 1.0)])
    assert {"rollback", "skip (nothing proposed: not measured)",
            "non-finite, drawn at the top"} <= set(labels)
    assert ys[0] == pytest.approx(0.1) and math.isnan(ys[1]) and ys[2] == 50.0   # a gap at 1
