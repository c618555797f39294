"""Shared fixtures (seeded torch RNG, one intra-op thread) and the hypothesis profiles."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import settings
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

torch.set_num_threads(min(2, torch.get_num_threads()))

# Hypothesis profiles. Under CI (``CI`` set to anything but "", 0, false, no, off) every run
# draws the same examples (``derandomize``: the seed comes from each test's source) and no
# example database is read or written, so a clean clone passes or fails the same way every
# time; a failure prints its ``@reproduce_failure`` blob. Locally ("dev") examples are drawn
# afresh each run (``--hypothesis-seed=N`` replays a run) and nothing is written to
# ``.hypothesis/``. ``HYPOTHESIS_PROFILE=ci|dev`` overrides the choice. Per-test
# ``@settings(...)`` only set ``max_examples``, ``deadline`` and health checks; every other
# setting (``derandomize``, ``database``) is inherited from the profile loaded here, which
# is why it is loaded before any test module is imported (tests/test_determinism.py checks).
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("dev", database=None, print_blob=True, deadline=None)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no", "off")


settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _ci() else "dev"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is fastest, and far faster on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
