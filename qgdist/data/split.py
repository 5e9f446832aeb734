"""Deterministic train/val/test assignment by a hash of (source file name, row).

The hash depends only on the file's base name and the row index, never on the order of work, the number of
workers or the shard size, so a dataset re-converted anywhere lands every jet in the same split. A jet's split is
found by mapping the hash to [0, 1) and comparing it with the cumulative fractions.
"""

from __future__ import annotations

import hashlib
import posixpath

import numpy as np

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


def parse_fractions(text: str) -> tuple[float, float, float]:
    """``"0.8,0.1,0.1"`` -> (0.8, 0.1, 0.1); the three must be >= 0 and sum to 1."""
    parts = [float(p) for p in text.split(",")]
    if len(parts) != 3 or min(parts) < 0 or abs(sum(parts) - 1.0) > 1e-6:
        raise ValueError(f"--split wants three fractions train,val,test that sum to 1, got {text!r}")
    return parts[0], parts[1], parts[2]


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
