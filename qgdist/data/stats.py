"""Normalisation statistics as mergeable sums: each conversion task sums its train rows, the driver adds them up.

Sums of x and x^2 with a count (float64) are enough for means and standard deviations, and they add across tasks
in any order. ``finish()`` turns them into the manifest's ``stats`` layout (see ``shards/manifest.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qgdist.data.features import CONTINUOUS, KIN_FEATURES, particle_features
from qgdist.data.shards.schema import CloudSample, ImageSample, Sample


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

    def add(self, samples: list[Sample]) -> None:
        """Add the statistics of some (train-split) samples."""
        if not samples:
            return
        self._add("log_pt", len(samples), _moments(np.log([s.meta["pt"] for s in samples])))
        self._add("mass", len(samples), _moments([s.meta["mass"] for s in samples]))
        if isinstance(samples[0], ImageSample):
            self._add_images(samples)  # type: ignore[arg-type]
        else:
            self._add_clouds(samples)  # type: ignore[arg-type]

    def _add_images(self, samples: list[ImageSample]) -> None:
        c, h, w = samples[0].shape
        s, ss = np.zeros(c), np.zeros(c)
        for sample in samples:  # zeros add nothing to the sums, so the sparse values are enough
            channel = sample.pix.astype(np.int64) // (h * w)
            v = sample.val.astype(np.float64)
            s += np.bincount(channel, v, minlength=c)
            ss += np.bincount(channel, v * v, minlength=c)
        self._add("channel", len(samples) * h * w, [s.tolist(), ss.tolist()])

    def _add_clouds(self, samples: list[CloudSample]) -> None:
        p = max(len(s.kin) for s in samples)
        kin = np.zeros((len(samples), p, 3))
        pid = np.zeros((len(samples), p), dtype=np.int64)
        mask = np.zeros((len(samples), p), dtype=bool)
        for i, s in enumerate(samples):
            kin[i, : len(s.kin)], pid[i, : len(s.pid)], mask[i, : len(s.kin)] = s.kin, s.pid, True
        jet_y = np.array([s.meta["jet_y"] for s in samples])
        jet_phi = np.array([s.meta["jet_phi"] for s in samples])
        _, feats = particle_features(kin, pid, mask, jet_y, jet_phi, "kin")
        real = feats[mask][:, :CONTINUOUS]
        self._add("particle", len(real), _moments(real, axis=0))

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
