"""Normalisation statistics as mergeable sums: each conversion task sums its train rows, the driver adds them up.

Sums of x and x^2 with a count (float64) are enough for means and standard deviations, and they add across tasks
in any order. ``finish()`` turns them into the manifest's ``stats`` layout (see ``shards/manifest.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qgdist.data.features import CONTINUOUS, KIN_FEATURES, feature_columns
from qgdist.data.shards.schema import ImageChunk, JetChunk


def _moments(values: np.ndarray, axis: Any = None) -> list:
    v = np.asarray(values, dtype=np.float64)
    return [np.sum(v, axis=axis).tolist(), np.sum(v * v, axis=axis).tolist()]


def _mean_std(s: Any, ss: Any, n: float) -> tuple[Any, Any]:
    mean = np.asarray(s, dtype=np.float64) / max(n, 1.0)
    var = np.maximum(np.asarray(ss, dtype=np.float64) / max(n, 1.0) - mean**2, 0.0)
    return mean.tolist(), np.sqrt(var).tolist()


class StatSums:
    """Running sums for jets (log pt, mass), image channels and particle features (``kin`` preset)."""

    def __init__(self, sums: dict[str, Any] | None = None):
        self.sums: dict[str, Any] = sums or {}

    def _add(self, name: str, count: float, moments: list) -> None:
        old = self.sums.get(name)
        if old is None:
            self.sums[name] = [count] + moments
        else:
            self.sums[name] = [old[0] + count] + [(np.asarray(a) + np.asarray(b)).tolist()
                                                  for a, b in zip(old[1:], moments)]

    def add(self, block: JetChunk) -> None:
        """Add the statistics of some (train-split) jets, all at once."""
        if not len(block):
            return
        jets = block.jets
        self._add("log_pt", len(block), _moments(np.log(jets["pt"])))
        self._add("mass", len(block), _moments(jets["mass"]))
        if isinstance(block, ImageChunk):
            self._add_images(block)
        else:
            self._add_clouds(block)

    def _add_images(self, block: ImageChunk) -> None:
        c, h, w = block.image_shape
        channel = block.pix.astype(np.int64) // (h * w)   # zeros add nothing to the sums: the sparse values suffice
        v = block.val.astype(np.float64)
        s = np.bincount(channel, v, minlength=c)
        ss = np.bincount(channel, v * v, minlength=c)
        self._add("channel", len(block) * h * w, [s.tolist(), ss.tolist()])

    def _add_clouds(self, block: JetChunk) -> None:
        jets = block.jets
        jet = np.repeat(np.arange(len(block), dtype=np.int64), jets["n"])
        # float32 features, as the loader computes them; sums in float64
        kin, pid = block.kin, block.pid  # type: ignore[attr-defined]
        cols = feature_columns(kin, pid, jet, jets["jet_y"], jets["jet_phi"], "kin", np.float32)[:CONTINUOUS]
        wide = [c.astype(np.float64) for c in cols]
        self._add("particle", len(jet), [[float(c.sum()) for c in wide], [float((c * c).sum()) for c in wide]])

    def merge(self, other: "StatSums") -> None:
        for name, (count, *moments) in other.sums.items():
            self._add(name, count, moments)

    def finish(self) -> dict[str, Any]:
        """The manifest's ``stats`` dict."""
        if "log_pt" not in self.sums:
            return {"samples": 0}
        out: dict[str, Any] = {"samples": int(self.sums["log_pt"][0]), "jet": {}}
        for name in ("log_pt", "mass"):
            mean, std = _mean_std(self.sums[name][1], self.sums[name][2], self.sums[name][0])
            out["jet"][name] = {"mean": mean, "std": std}
        if "channel" in self.sums:
            mean, std = _mean_std(self.sums["channel"][1], self.sums["channel"][2], self.sums["channel"][0])
            out["image"] = {"channel_mean": mean, "channel_std": std}
        if "particle" in self.sums:
            mean, std = _mean_std(self.sums["particle"][1], self.sums["particle"][2], self.sums["particle"][0])
            out["particle"] = {"features": KIN_FEATURES[:CONTINUOUS], "mean": mean, "std": std,
                               "particles": int(self.sums["particle"][0])}
        return out
