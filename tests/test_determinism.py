"""The suite is deterministic in CI: the hypothesis profile in force, and the exhaustive runs
behind the statistical tests whose seeds are fixed.

The profile checks always run. The exhaustive ones run every drawable example of a
fixed-seed statistical test (a few minutes on 2 cores) and only with
``GUARDED_OPTIM_EXHAUSTIVE=1``: rerun them after changing one of those tests or the code it
tests (``GUARDED_OPTIM_EXHAUSTIVE=1 python -m pytest -q -s tests/test_determinism.py``).
"""

import itertools
import os

import pytest
from hypothesis import settings

import conftest
import test_bad_input
import test_conformal
import test_curvature
import test_dynamics
import test_fisher
import test_innovation
import test_properties
import test_signals

HYPOTHESIS_MODULES = [test_bad_input, test_conformal, test_curvature, test_dynamics, test_fisher,
                      test_innovation, test_properties, test_signals]
EXHAUSTIVE = os.environ.get("GUARDED_OPTIM_EXHAUSTIVE", "").strip().lower() not in (
    "", "0", "false", "no", "off")
exhaustive = pytest.mark.skipif(not EXHAUSTIVE, reason="GUARDED_OPTIM_EXHAUSTIVE=1 runs every "
                                "drawable example of the fixed-seed statistical tests")


# -- the hypothesis profile ----------------------------------------------------------------
def test_ci_values(monkeypatch):
    for value, ci in (("true", True), ("1", True), ("yes", True), ("True", True), ("", False),
                      ("0", False), ("false", False), ("no", False), ("off", False)):
        monkeypatch.setenv("CI", value)
        assert conftest._ci() is ci, value
    monkeypatch.delenv("CI")
    assert not conftest._ci()


def test_ci_profile_is_derandomized_without_a_database():
    ci = settings.get_profile("ci")
    assert ci.derandomize and ci.database is None and ci.print_blob and ci.deadline is None
    dev = settings.get_profile("dev")
    assert dev.database is None and dev.deadline is None


def test_the_loaded_profile_follows_the_environment():
    name = os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if conftest._ci() else "dev")
    profile = settings.get_profile(name)
    for attr in ("derandomize", "database", "print_blob", "deadline"):
        assert getattr(settings.default, attr) == getattr(profile, attr), attr


def hypothesis_tests():
    return [(m.__name__, name, fn) for m in HYPOTHESIS_MODULES for name, fn in vars(m).items()
            if getattr(fn, "is_hypothesis_test", False)]


def test_per_test_settings_keep_the_profiles_determinism():
    """``@settings(max_examples=..., deadline=...)`` inherits the rest from the profile loaded
    in conftest.py (it is loaded before these modules are imported); no test pins a seed."""
    tests = hypothesis_tests()
    assert len(tests) >= 30
    for module, name, fn in tests:
        s = fn._hypothesis_internal_use_settings
        assert s.derandomize == settings.default.derandomize, (module, name)
        assert s.database == settings.default.database, (module, name)
        assert s.print_blob == settings.default.print_blob, (module, name)
        assert fn._hypothesis_internal_use_seed is None, (module, name)


# -- every drawable example of the fixed-seed statistical tests ----------------------------
@exhaustive
@pytest.mark.parametrize("alpha", test_conformal.FALSE_ALARM_ALPHAS)
def test_every_false_alarm_example(alpha):
    worst = None
    for kind, seed in itertools.product(test_conformal.KINDS, range(test_conformal.FIXED_SEEDS)):
        counts = {scale: test_conformal.false_alarms(alpha, kind, scale, seed)
                  for scale in (1e-3, 1.0, 10.0)}
        assert len(set(counts.values())) == 1, (kind, seed, counts)      # scale-free
        alarms, measured = counts[1.0]
        bound = alpha + test_conformal.binomial_tolerance(alpha, measured)
        assert measured > 3000 and alarms / measured <= bound, (kind, seed, alarms, measured)
        worst = max(worst or (0, None), (alarms / measured / bound, (kind, seed)))
    print(f"\nfalse alarms, alpha={alpha}: largest rate / bound {worst[0]:.3f} at {worst[1]}")


@exhaustive
def test_every_forecast_coverage_example():
    worst = None
    for kind, seed in itertools.product(test_conformal.KINDS, range(test_conformal.FIXED_SEEDS)):
        counts = {slope: test_conformal.forecast_hits(slope, kind, seed)
                  for slope in (-0.01, 0.0, 0.01)}
        assert len(set(counts.values())) == 1, (kind, seed, counts)      # slope-free
        hits, total = counts[0.0]
        bound = 0.9 - test_conformal.binomial_tolerance(0.1, total, sds=6)
        assert total > 1000 and hits / total >= bound, (kind, seed, hits, total)
        worst = min(worst or (1.0, None), (hits / total - bound, (kind, seed)))
    print(f"\nforecast coverage: smallest coverage - bound {worst[0]:.4f} at {worst[1]}")


@exhaustive
def test_every_phase_example():
    inner = test_dynamics.test_phase_of_synthetic_trajectories.hypothesis.inner_test
    for seed in range(test_dynamics.PHASE_SEEDS):
        for i in range(11):
            inner(noise=0.005 * i, seed=seed)
