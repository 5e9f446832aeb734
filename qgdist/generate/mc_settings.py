"""Settings of the Pythia 8 quark/gluon generator: the typed config, the Pythia command strings, derived seeds.

The recipe is the one behind the EnergyFlow / ParticleNet quark-gluon files (Komiske, Metodiev, Thaler; zenodo
3164691): pp at 14 TeV, quark jets from ``qg -> Z(->nu nu) + q`` (q = u, d, s), gluon jets from
``qqbar -> Z(->nu nu) + g``, the default tune with hadronisation and MPI on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Pythia process switch for each jet class.
PROCESS = {"quark": "WeakBosonAndParton:qg2gmZq = on", "gluon": "WeakBosonAndParton:qqbar2gmZg = on"}

#: Pythia's ``Random:seed`` must lie in [0, 900000000]; 0 would mean "seed from the clock".
_PYTHIA_SEED_MAX = 900_000_000

FORMATS = ("energyflow", "cms", "both")


@dataclass
class PythiaConfig:
    """One ``qgdist generate pythia`` run: N balanced quark/gluon jets split into fixed-size Ray tasks."""

    out: str
    jets: int = 1000
    format: str = "both"            # energyflow | cms | both
    workers: int = 1                # tasks running at once (and CPUs of a private local Ray)
    seed: int = 0
    pthat_min: float = 450.0        # below ~450 GeV the [500, 550] window fills with low-pTHat events (REFERENCE 3)
    jets_per_task: int = 500        # fixed, so the same seed gives the same files whatever --workers is
    ecm: float = 14000.0
    jet_r: float = 0.4
    pt_min: float = 500.0
    pt_max: float = 550.0
    max_abs_y: float = 1.7
    batch_events: int = 100         # events per Pythia nextBatch call (also the progress granularity)
    compress: bool = True           # npz members deflated (np.savez_compressed), like the public files
    use_ray: bool = True            # False: run the tasks one after another in this process
    address: str | None = None      # Ray cluster to join; None = private local instance

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
