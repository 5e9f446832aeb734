"""Settings of the Pythia 8 quark/gluon generator: the typed config, the Pythia command strings, derived seeds.

The recipe is the one behind the EnergyFlow / ParticleNet quark-gluon files (Komiske, Metodiev, Thaler; zenodo
3164691): pp at 14 TeV, quark jets from ``qg -> Z(->nu nu) + q`` (q = u, d, s), gluon jets from
``qqbar -> Z(->nu nu) + g``, the default tune with hadronisation and MPI on.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

import numpy as np

from qgdist.core.config import option

#: Pythia process switch for each jet class.
PROCESS = {"quark": "WeakBosonAndParton:qg2gmZq = on", "gluon": "WeakBosonAndParton:qqbar2gmZg = on"}

#: Pythia's ``Random:seed`` must lie in [0, 900000000]; 0 would mean "seed from the clock".
_PYTHIA_SEED_MAX = 900_000_000

Format = Literal["energyflow", "cms", "both", "root", "parquet-jagged", "h5"]
FORMATS: tuple[str, ...] = typing.get_args(Format)


@dataclass(frozen=True)
class PythiaConfig:
    """One ``qgdist generate pythia`` run: N balanced quark/gluon jets split into fixed-size Ray tasks."""

    out: str = option(help="output directory (energyflow/, cms/, tasks/, summary.json)")
    jets: int = option(1000, "total jets, even: half quark, half gluon", min=2)
    format: Format = option("both", "files to write: EnergyFlow npz, CMS parquet, both, or the clouds in the "
                                    "weaver/ParT columnar layout (root, parquet-jagged, h5)")
    workers: int = option(1, "tasks running at once (CPUs of a private local Ray)", min=1)
    seed: int = option(0, "run seed; task i derives its own seeds from (seed, i)", min=0)
    # Below ~450 GeV the [500, 550] window fills with low-pTHat events (REFERENCE 3).
    pthat_min: float = option(450.0, "Pythia PhaseSpace:pTHatMin in GeV", min=0)
    # Fixed, so the same seed gives the same files whatever --workers is.
    jets_per_task: int = option(500, "jets per task and per output file (even)", min=2)
    ecm: float = option(14000.0, "centre-of-mass energy in GeV (Beams:eCM)", gt=0)
    jet_r: float = option(0.4, "anti-kT jet radius R", gt=0)
    pt_min: float = option(500.0, "lowest leading-jet pT kept, GeV", min=0)
    pt_max: float = option(550.0, "highest leading-jet pT kept, GeV", gt=0)
    max_abs_y: float = option(1.7, "largest leading-jet |rapidity| kept", gt=0)
    batch_events: int = option(100, "events per Pythia nextBatch call (also the progress granularity)", min=1)
    compress: bool = option(True, "deflate the npz members (np.savez_compressed), like the public files")
    use_ray: bool = option(True, "run the tasks as Ray tasks (--no-ray: one after another in this process)",
                           flag="--ray")
    address: str | None = option(None, "Ray cluster to join (default: start a private local one)")

    def validate(self) -> None:
        """Raise ValueError naming the bad field."""
        if self.format not in FORMATS:
            raise ValueError(f"format: expected one of {FORMATS}, got {self.format!r}")
        if self.jets <= 0 or self.jets % 2:
            raise ValueError(f"jets: need a positive even number (half quark, half gluon), got {self.jets}")
        if self.jets_per_task <= 0 or self.jets_per_task % 2:
            raise ValueError(f"jets_per_task: need a positive even number, got {self.jets_per_task}")
        if self.workers < 1:
            raise ValueError(f"workers: need at least 1, got {self.workers}")
        if not self.pt_min < self.pt_max:
            raise ValueError(f"pt_min/pt_max: empty window [{self.pt_min}, {self.pt_max}]")
        if self.seed < 0:
            raise ValueError(f"seed: need a non-negative integer, got {self.seed}")

    def task_sizes(self) -> list[int]:
        """Jets per task: full tasks of ``jets_per_task`` and an even remainder."""
        full, rest = divmod(self.jets, self.jets_per_task)
        return [self.jets_per_task] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class TaskSeeds:
    """Seeds of one task, all derived from (run seed, task index)."""

    quark: int
    gluon: int
    shuffle: int


def task_seeds(seed: int, task_index: int) -> TaskSeeds:
    """Seeds for task ``task_index`` of a run with ``seed``.

    ``SeedSequence(seed, spawn_key=(task_index,))`` is exactly the ``task_index``-th child of
    ``SeedSequence(seed).spawn(...)``: tasks get independent streams and a task's seeds do not depend on how many
    tasks the run has. Its first two 32-bit words seed the two Pythia instances, the third the per-file shuffle.
    """
    words = np.random.SeedSequence(seed, spawn_key=(task_index,)).generate_state(3, dtype=np.uint32)
    quark, gluon, shuffle = (int(w) for w in words)
    return TaskSeeds(quark % _PYTHIA_SEED_MAX + 1, gluon % _PYTHIA_SEED_MAX + 1, shuffle)


def pythia_settings(cfg: PythiaConfig, kind: str, pythia_seed: int) -> list[str]:
    """The ``readString`` lines for one jet class."""
    return [
        f"Beams:eCM = {cfg.ecm}",
        "HardQCD:all = off",
        PROCESS[kind],
        "WeakZ0:gmZmode = 2",          # pure Z, no gamma* (the recipe's Z -> nu nu)
        "23:onMode = off",
        "23:onIfAny = 12 14 16",
        f"PhaseSpace:pTHatMin = {cfg.pthat_min}",
        "Next:numberCount = 0",
        "Next:numberShowEvent = 0",
        "Next:numberShowInfo = 0",
        "Next:numberShowProcess = 0",
        "Print:quiet = on",            # else ~1500 lines of settings and statistics per instance
        "Random:setSeed = on",
        f"Random:seed = {pythia_seed}",
    ]
