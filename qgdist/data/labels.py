"""Label conventions of the source formats, harmonised to one field: ``is_quark``.

* EnergyFlow / ParticleNet npz (Komiske, Metodiev, Thaler; zenodo 3164691): ``y = 1`` means **quark**.
* columnar files in the weaver / ParT layout: ``label = 1`` means **quark** (the ParT converter copies the
  EnergyFlow ``y``).
* CMS End-to-End parquet (Andrews et al., arXiv:1902.08276): ``y = 1`` means **gluon** -- the seed notebook prints
  ``"Quark" if label == 0.0 else "Gluon"``. Third-party READMEs agree; the original CMS code mentions a
  ``jetIsQuark`` flag, so the value is a per-source setting (``--label-quark-value``).

Everything after ingest sees only ``is_quark`` (1 = quark, 0 = gluon). Quark jets are the positive class ("signal")
in every metric.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The ``y`` value that means "quark" in each source, by default.
DEFAULT_QUARK_VALUE: dict[str, int] = {"energyflow": 1, "cms": 0, "columnar": 1}


@dataclass(frozen=True)
class LabelConvention:
    """Which raw ``y`` value marks a quark jet in one source."""

    source: str
    quark_value: int

    @classmethod
    def default(cls, source: str) -> "LabelConvention":
        return cls(source, DEFAULT_QUARK_VALUE[source])

    def is_quark(self, y: np.ndarray) -> np.ndarray:
        """Map raw labels (already checked to be 0 or 1) to ``is_quark`` as uint8."""
        return (np.asarray(y) == self.quark_value).astype(np.uint8)

    def describe(self) -> str:
        return f"{self.source}: y={self.quark_value} is quark, y={1 - self.quark_value} is gluon"
