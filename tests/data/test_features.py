import numpy as np
import pytest

from qgdist.data.features import PRESETS, jet_kinematics, mass_and_charge, particle_features


def test_masses_and_charges_come_from_the_pdg_table():
    mass, charge = mass_and_charge(np.array([211, -211, 22, 2212, 130, 11, 0]))
    np.testing.assert_allclose(mass, [0.13957, 0.13957, 0.0, 0.93827, 0.49761, 0.000511, 0.0], atol=1e-4)
    np.testing.assert_array_equal(charge, [1, -1, 0, 1, 0, -1, 0])


def test_features_are_relative_to_the_jet_axis_and_zero_on_padding():
    kin = np.array([[[100.0, 0.1, 0.2], [50.0, -0.1, -0.2], [0.0, 0.0, 0.0]]])
    pid = np.array([[211, 22, 0]])
    mask = pid != 0
    jet = jet_kinematics(kin[0][:2], pid[0][:2])
    points, feats = particle_features(kin, pid, mask, np.array([jet["jet_y"]]), np.array([jet["jet_phi"]]), "kinpid")
    assert feats.shape == (1, 3, len(PRESETS["kinpid"]))
    assert np.all(feats[0, 2] == 0) and np.all(points[0, 2] == 0)
    # pt-weighted centroid of deta/dphi sits near the axis; log(pt/pt_jet) sums to log of fractions
    np.testing.assert_allclose(np.exp(feats[0, :2, 4]).sum(), 1.0, rtol=1e-6)
    assert feats[0, 0, 7] == 1 and feats[0, 0, 8] == 1 and feats[0, 1, 10] == 1  # charge, charged hadron, photon
    with pytest.raises(ValueError, match="preset"):
        particle_features(kin, pid, mask, np.zeros(1), np.zeros(1), "nope")
