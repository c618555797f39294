"""Bundled, offline data sets for the benchmark and the integration tests.

Nothing here downloads: the images ship with scikit-learn (``load_digits``) and the
text is the docstrings of Python's own standard library. Every split is deterministic
for a given seed, so guarded and bare runs see identical batches.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass

import torch

__all__ = ["Split", "digits", "stdlib_text", "char_corpus", "teacher", "batches"]


@dataclass(frozen=True)
class Split:
    """Train tensors, a small fixed probe set and a held-out test set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_probe: torch.Tensor
    y_probe: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def digits(probe_size: int = 16, test_size: int = 300, seed: int = 0, flat: bool = False) -> Split:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1].

    Returns images shaped ``(N, 1, 8, 8)`` (``(N, 64)`` with ``flat=True``) and int64
    labels. The probe and test sets are disjoint from training and fixed by ``seed``.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the digits data set needs scikit-learn: pip install 'guarded-optim[bench]'"
        ) from exc
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    x = x.reshape(len(x), 64) if flat else x.unsqueeze(1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    p, t = probe_size, probe_size + test_size
    return Split(x[t:], y[t:], x[:p], y[:p], x[p:t], y[p:t])


#: Standard-library modules whose docstrings make the text corpus. All ship with CPython.
STDLIB_MODULES = (
    "collections", "functools", "itertools", "json", "re", "string", "textwrap",
    "argparse", "pathlib", "os", "typing", "dataclasses", "inspect", "logging",
    "unittest", "datetime", "decimal", "fractions", "statistics", "random", "heapq",
    "bisect", "contextlib", "abc", "enum", "copy", "pickle", "csv", "shutil", "tempfile",
)


def stdlib_text(modules: tuple[str, ...] = STDLIB_MODULES) -> str:
    """The docstrings of ``modules`` and their public members, joined, printable ASCII only."""
    parts: list[str] = []
    with warnings.catch_warnings():   # some stdlib attributes warn when touched (typing.io)
        warnings.simplefilter("ignore", DeprecationWarning)
        return _docstrings(modules, parts)


def _docstrings(modules: tuple[str, ...], parts: list[str]) -> str:
    for name in modules:
        mod = importlib.import_module(name)
        if mod.__doc__:
            parts.append(mod.__doc__)
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(mod, attr, None))
            if doc and doc not in parts:
                parts.append(doc)
    text = "\n\n".join(parts)
    return "".join(c for c in text if c == "\n" or 32 <= ord(c) < 127)


def char_corpus(seq_len: int = 64, probe_size: int = 16, test_size: int = 128, seed: int = 0,
                max_chars: int = 400_000) -> tuple[Split, int]:
    """Next-character prediction windows over :func:`stdlib_text`.

    Returns a :class:`Split` of ``(N, seq_len)`` int64 inputs and ``(N, seq_len)`` targets
    (the input shifted by one), and the vocabulary size.
    """
    text = stdlib_text()[:max_chars]
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    n = (len(ids) - 1) // seq_len
    x = ids[: n * seq_len].reshape(n, seq_len)
    y = ids[1 : n * seq_len + 1].reshape(n, seq_len)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    p, t = probe_size, probe_size + test_size
    return Split(x[t:], y[t:], x[:p], y[:p], x[p:t], y[p:t]), len(vocab)


def teacher(n: int = 4096, inputs: int = 256, classes: int = 10, probe_size: int = 16,
            seed: int = 0) -> Split:
    """Synthetic classification: gaussian inputs labelled by a random linear teacher.

    For the scaling run, where the model's width, not the data, is the point; generated
    from ``seed`` alone (no global RNG, no files).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inputs, generator=g)
    y = (x @ torch.randn(inputs, classes, generator=g)).argmax(1)
    p, t = probe_size, probe_size + n // 8
    return Split(x[t:], y[t:], x[:p], y[:p], x[p:t], y[p:t])


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, seed: int):
    """Yield ``steps`` mini-batches drawn by a generator of its own (fixed by ``seed``).

    The order depends only on ``seed``, never on the global RNG, so two arms of an
    experiment (or a rollback that restores the RNG) see the same batches.
    """
    g = torch.Generator().manual_seed(seed)
    perm, pos = torch.randperm(len(x), generator=g), 0
    for _ in range(steps):
        if pos + batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        yield x[idx], y[idx]
