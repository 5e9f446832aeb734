"""What turns a jet into model inputs, recorded once at training time and carried by the model from then on.

A model learns on standardised inputs: the jet's (log pt, mass) and, for clouds, the particle features of a
preset, each shifted and scaled by the *training* split's mean and standard deviation. Scoring any other dataset
-- a new Monte Carlo sample, collision data, the same jets converted on their own -- must apply the training
statistics, not that dataset's (a dataset converted with ``--split 0,0,1`` has no train split and hence no
statistics at all). ``Preprocessing`` is that record: it is built from the training manifest when a run starts,
saved in every checkpoint and exported model, and handed to the loader by ``evaluate``, ``predict`` and resumed
runs. The image transform (the E2E preprocessing of ResNet-15) is part of the model itself, so it travels with
the weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from qgdist.core.errors import InputError
from qgdist.data.features import CONTINUOUS, PRESETS
from qgdist.data.shards.manifest import Manifest

JET_FEATURES = ("log_pt", "mass")


#: Shard schema versions whose jets, statistics and features are the same (only the tar layout differs): schema 2
#: stores schema 1's per-jet content as chunks of columns, so a model trained on either scores the other.
_SAME_CONTENT = {1: 1, 2: 1}


def _content(version: int) -> int:
    return _SAME_CONTENT.get(version, version)


#: Sources whose shards hold the same content: columnar files (ROOT, jagged parquet, HDF5) become the same
#: (pt, rapidity, phi, pid) clouds as EnergyFlow npz files, so a model trained on either scores the other.
_SAME_SOURCE = {"columnar": "energyflow"}


def _source_content(source: str) -> str:
    return _SAME_SOURCE.get(source, source)


class PreprocessingMismatch(InputError):
    """A dataset that a model's preprocessing cannot be applied to (other kind, source or schema)."""


@dataclass(frozen=True)
class Preprocessing:
    """Everything that turns a jet into model inputs, with the training split's normalisation statistics."""

    kind: str                          # "image" | "cloud"
    source: str                        # "cms" | "energyflow": the source format the model was trained on
    schema_version: int                # shard sample schema the statistics were computed from
    preset: str                        # particle feature preset (clouds)
    max_particles: int                 # hardest particles kept per jet (clouds)
    jet_mean: tuple[float, ...]        # (log pt, mass)
    jet_std: tuple[float, ...]
    feature_names: tuple[str, ...]     # the preset's features; the first CONTINUOUS are standardised
    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    label_convention: str              # how the training data's raw labels became is_quark
    trained_on: str = ""               # the training dataset (for messages)
    vectors: bool = False              # clouds: also each particle's four-momentum (px, py, pz, E), for ParT

    @classmethod
    def from_manifest(cls, manifest: Manifest, where: str, preset: str = "kin",
                      max_particles: int = 128, vectors: bool = False) -> Preprocessing:
        """The preprocessing of a training run on ``manifest``'s dataset; its train-split statistics must exist."""
        if preset not in PRESETS:
            raise ValueError(f"unknown feature preset {preset!r}; choose from {sorted(PRESETS)}")
        stats = manifest.stats or {}
        jet = stats.get("jet") or {}
        missing = [f"stats.jet.{k}" for k in JET_FEATURES if not {"mean", "std"} <= set(jet.get(k) or {})]
        names = PRESETS[preset]
        mean, std = [0.0] * len(names), [1.0] * len(names)   # PID flags (after CONTINUOUS) stay 0/1
        if manifest.kind == "cloud":
            part = stats.get("particle") or {}
            known = {n: i for i, n in enumerate(part.get("features", []))}
            for i, name in enumerate(names[:CONTINUOUS]):
                if name not in known:
                    missing.append(f"stats.particle.{name}")
                    continue
                mean[i], std[i] = float(part["mean"][known[name]]), float(part["std"][known[name]])
        if missing:
            raise ValueError(
                f"{where}: no train-split normalisation statistics ({', '.join(missing)}): a model is trained on "
                "a dataset converted with a train split; to score data without one, use the checkpoint "
                "(qgdist evaluate / predict), which carries its training statistics")
        return cls(kind=manifest.kind, source=manifest.source, schema_version=manifest.schema_version,
                   preset=preset, max_particles=max_particles,
                   jet_mean=tuple(float(jet[k]["mean"]) for k in JET_FEATURES),
                   jet_std=tuple(float(jet[k]["std"]) or 1.0 for k in JET_FEATURES),
                   feature_names=tuple(names), feature_mean=tuple(mean),
                   feature_std=tuple(s or 1.0 for s in std), label_convention=manifest.label_convention,
                   trained_on=where, vectors=vectors and manifest.kind == "cloud")

    def check_fits(self, manifest: Manifest, where: str) -> None:
        """Refuse a dataset this preprocessing does not apply to, naming both sides."""
        problems = [f"{name}: model {mine!r}, data {theirs!r}" for name, mine, theirs in (
            ("kind", self.kind, manifest.kind),
            ("source", _source_content(self.source), _source_content(manifest.source)),
            ("schema_version", self.schema_version, manifest.schema_version))
            if (_content(mine) != _content(theirs) if name == "schema_version" else mine != theirs)]
        if problems:
            raise PreprocessingMismatch(
                f"{where} does not fit the model (trained on {self.trained_on or 'another dataset'}): "
                + "; ".join(problems))

    def check_source(self, source: str, where: str) -> None:
        """Refuse raw input files of another source format than the model was trained on."""
        if _source_content(source) != _source_content(self.source):
            raise PreprocessingMismatch(f"{where}: {source} files, but the model was trained on {self.source} "
                                        f"({self.kind}s from {self.trained_on or 'another dataset'})")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> Preprocessing:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in doc.items() if k in fields})
