"""Label conventions: each source's raw ``y`` becomes ``is_quark`` (1 = quark), and the manifest records how in words.

A swapped convention trains a tagger that calls quarks gluons, and its metrics on its own (equally mislabelled) test
split look fine: nothing downstream can notice. So each source's mapping is pinned here to the documented values
(README, "Label conventions").
"""

from __future__ import annotations

import numpy as np
import pytest

from qgdist.data.labels import LabelConvention


@pytest.mark.parametrize("source, quark_y", [("energyflow", 1), ("columnar", 1), ("cms", 0)])
def test_each_source_marks_quarks_with_its_documented_raw_value(source: str, quark_y: int) -> None:
    labels = LabelConvention.default(source)
    assert (labels.source, labels.quark_value) == (source, quark_y)
    is_quark = labels.is_quark(np.array([quark_y, 1 - quark_y, 1 - quark_y, quark_y], dtype=np.float32))
    assert is_quark.dtype == np.uint8 and is_quark.tolist() == [1, 0, 0, 1]


def test_the_override_flips_a_source_and_takes_plain_lists() -> None:
    """``--label-quark-value 1`` on CMS files (the jetIsQuark reading): y = 1 is now the quark."""
    assert LabelConvention("cms", 1).is_quark([1, 0, 0]).tolist() == [1, 0, 0]
    assert LabelConvention.default("cms").is_quark([1, 0, 0]).tolist() == [0, 1, 1]


def test_a_source_without_a_documented_convention_has_no_default() -> None:
    with pytest.raises(KeyError):
        LabelConvention.default("delphes")


def test_the_recorded_convention_names_the_quark_and_the_gluon_value() -> None:
    """The text goes into the manifest and the dataset id: it must say which raw value was which."""
    assert LabelConvention.default("cms").describe() == "cms: y=0 is quark, y=1 is gluon"
    assert LabelConvention.default("energyflow").describe() == "energyflow: y=1 is quark, y=0 is gluon"
