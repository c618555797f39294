"""The command line a user meets first: --version, help with no arguments, plain-text help
whose every option shows its default (and choices), counts taken from the registries, and a
--quick protocol whose fault hurts bare AdamW."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import guarded_optim
from guarded_optim.bench import cli, report
from guarded_optim.bench.scenarios import ABLATIONS, ARMS, SCENARIOS
from guarded_optim.bench.suites import ABLATION_SCENARIOS, protocol
from guarded_optim.faults import FAULTS


def _bench_parser() -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["bench"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"guarded-optim {guarded_optim.__version__}"


def test_no_arguments_prints_help_and_exits_0(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: guarded-optim") and "bench" in out and "--version" in out


def test_console_entry_point_with_no_arguments():
    done = subprocess.run([sys.executable, "-m", "guarded_optim"], capture_output=True, text=True,
                          cwd=str(Path(__file__).parents[1]))
    assert done.returncode == 0 and "usage: guarded-optim" in done.stdout


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_help_is_plain_text(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for markup in ("``", ":class:", ":func:", ":data:", "* ``"):
        assert markup not in out


def test_every_bench_option_shows_its_default_and_choices():
    for action in _bench_parser()._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and "(default:" in action.help, action.dest
        if action.choices and action.metavar is not None:   # braces hidden: listed in the help
            assert all(str(c) in action.help for c in action.choices), action.dest


def test_help_counts_come_from_the_registries(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    controls = sum(s.control for s in SCENARIOS.values())
    assert (f"{len(SCENARIOS)} named scenarios ({len(SCENARIOS) - controls} faults, "
            f"{controls} clean controls)") in out
    assert f"any of the {len(SCENARIOS)} scenarios" in out
    assert f"{len(ABLATIONS) - 1} variants of it" in out
    assert f"over {len(ABLATION_SCENARIOS)} scenarios" in out
    assert f"(default: all {len(ARMS)})" in out
    assert "30+" not in out
    p = cli.PROTOCOL
    assert (f"for {p['fault_length']} steps from step {p['fault_start']} of {p['steps']}") in out
    assert all(f in out for f in FAULTS)


def _parsed(argv):
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    cli._resolve(args)
    cli._validate(parser, args)
    return args


def test_quick_defaults_and_explicit_options():
    full, quick = _parsed(["bench"]), _parsed(["bench", "--quick"])
    assert (full.steps, full.fault_start, full.fault_length) == tuple(cli.PROTOCOL.values())
    assert (quick.steps, quick.fault_start, quick.fault_length) == tuple(
        cli.QUICK_PROTOCOL.values())
    assert (quick.scenario_steps, quick.scenario_start) == tuple(cli.QUICK_SCENARIO_WINDOW.values())
    assert quick.models == ["mlp"] and quick.ablation_task == "mlp" and quick.seeds == 2
    mine = _parsed(["bench", "--quick", "--steps", "80", "--fault-start", "60", "--seeds", "3"])
    assert (mine.steps, mine.fault_start, mine.seeds) == (80, 60, 3)   # explicit options win


@pytest.mark.parametrize("argv", [["--steps", "100"],                   # fault at 120 of 100
                                  ["--fault-start", "245"],             # 245 + 10 > 250
                                  ["--scenario-start", "150"],
                                  ["--seeds", "0"],
                                  ["--fault", "no_such_fault"]])
def test_bad_options_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", *argv])
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_a_fault_that_did_not_hurt_bare_is_explained():
    note = cli.harmless_fault_note({"bare": {"final_ratio": 0.96}, "guarded_probe": {
        "final_ratio": 1.13}})
    assert note.startswith("note: this fault did not hurt bare AdamW (final 0.96x clean")
    assert "\n" not in note
    assert cli.harmless_fault_note({"bare": {"final_ratio": 6.4}}) is None
    assert cli.harmless_fault_note({"bare": {"final_ratio": float("inf")}}) is None
    assert cli.harmless_fault_note({"guarded_probe": {"final_ratio": 1.0}}) is None


@pytest.mark.slow
def test_quick_protocol_fault_hurts_bare_and_the_guard_recovers(one_thread):
    """The table --quick opens with shows the guard's use (measured on seeds 0 and 1: bare
    6.4x clean, guarded 1.08x), not a fault that happened to do no harm."""
    q = cli.QUICK_PROTOCOL
    table = protocol("cnn", range(cli.QUICK_SEEDS), q["steps"], cli.DEFAULT_FAULT,
                     q["fault_start"], q["fault_length"], ("bare", "guarded_probe"),
                     overhead_repeats=0).table
    assert cli.harmless_fault_note(table) is None
    assert table["bare"]["final_ratio"] > 2 * report.TOLERANCE
    assert table["guarded_probe"]["final_ratio"] <= report.TOLERANCE
