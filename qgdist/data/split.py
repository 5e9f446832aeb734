"""Deterministic train/val/test assignment by a hash of (source file name, row).

The hash depends only on the file's base name and the row index, never on the order of work, the number of
workers or the shard size, so a dataset re-converted anywhere lands every jet in the same split. A jet's split is
found by mapping the hash to [0, 1) and comparing it with the cumulative fractions.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def fractions_problem(parts: Sequence[float]) -> str | None:
    """Why ``parts`` are not train/val/test fractions (three, each in [0, 1], summing to 1), or None."""
    if len(parts) != 3:
        return "wants three fractions train,val,test"
    if not all(isinstance(p, (int, float)) and 0.0 <= p <= 1.0 for p in parts):
        return "each fraction must lie in [0, 1]"
    if abs(sum(parts) - 1.0) > 1e-6:
        return f"the three fractions must sum to 1 (they sum to {sum(parts):g})"
    return None


def parse_fractions(text: str) -> tuple[float, ...]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1): numbers only; ``fractions_problem`` says whether they make a split."""
    try:
        return tuple(float(p) for p in text.split(","))
    except ValueError:
        raise ValueError(f"wants three fractions train,val,test such as 0.8,0.1,0.1, got {text!r}") from None


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a well-mixed uint64 per input (vectorised, wrapping arithmetic)."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def split_uniform(file_name: str, rows: np.ndarray) -> np.ndarray:
    """A uniform number in [0, 1) per row, fixed by (base name of ``file_name``, row)."""
    seed = int.from_bytes(hashlib.blake2b(posixpath.basename(file_name).encode(), digest_size=8).digest(), "little")
    with np.errstate(over="ignore"):
        mixed = _mix64(np.asarray(rows, dtype=np.uint64) + np.uint64(seed))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def assign_splits(file_name: str, rows: np.ndarray, fractions=DEFAULT_FRACTIONS) -> np.ndarray:
    """Split index per row: 0 = train, 1 = val, 2 = test."""
    edges = np.cumsum(np.asarray(fractions, dtype=np.float64))[:-1]
    return np.searchsorted(edges, split_uniform(file_name, rows), side="right").astype(np.int8)
