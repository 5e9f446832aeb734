"""Particle-level input features for the GNN family, computed from (pt, rapidity, phi, pdgid).

Presets follow ParT's quark/gluon configs (Qu, Li, Qian, arXiv:2202.03772, ``qg_kin`` / ``qg_kinpid``):

* ``kin``:    deta, dphi, log pt, log E, log(pt/pt_jet), log(E/E_jet), dR  (relative to the jet axis)
* ``kinpid``: ``kin`` + charge, isChargedHadron, isNeutralHadron, isPhoton, isElectron, isMuon

Energies need a mass hypothesis: it comes from the PDG id through the ``particle`` package (PDG data tables),
looked up once per distinct id. The first two features (deta, dphi) are also the coordinates of the first
EdgeConv block's kNN graph.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

KIN_FEATURES = ["deta", "dphi", "log_pt", "log_e", "log_pt_rel", "log_e_rel", "dr"]
PID_FEATURES = ["charge", "is_charged_hadron", "is_neutral_hadron", "is_photon", "is_electron", "is_muon"]
PRESETS: dict[str, list[str]] = {"kin": KIN_FEATURES, "kinpid": KIN_FEATURES + PID_FEATURES}
#: Features that are standardised with the manifest's train-split mean/std; the PID flags stay 0/1.
CONTINUOUS = len(KIN_FEATURES)

_CHARGED_HADRONS = {211, 321, 2212}
_NEUTRAL_HADRONS = {130, 2112, 310, 3122}


@lru_cache(maxsize=None)
def _mass_charge(pid: int) -> tuple[float, float]:
    """(mass in GeV, charge in e) of a PDG id; 0/0 for padding and ids the PDG table does not know."""
    if pid == 0:
        return 0.0, 0.0
    from particle import Particle  # imported lazily: building its tables costs ~0.3 s
    from particle.particle import ParticleNotFound

    try:
        p = Particle.from_pdgid(pid)
    except ParticleNotFound:
        return 0.0, 0.0
    return (p.mass or 0.0) / 1000.0, float(p.charge or 0.0)


def mass_and_charge(pid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise mass (GeV) and charge for an array of PDG ids, via one lookup per distinct id."""
    pid = np.asarray(pid).astype(np.int64)
    ids, inverse = np.unique(pid, return_inverse=True)
    table = np.array([_mass_charge(int(i)) for i in ids], dtype=np.float64).reshape(-1, 2)
    return table[inverse, 0].reshape(pid.shape), table[inverse, 1].reshape(pid.shape)


def four_momenta(kin: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """(..., 4) = (E, px, py, pz) from (..., 3) = (pt, rapidity, phi) and PDG ids (padding pt = 0 gives zeros)."""
    pt, rap, phi = (kin[..., i].astype(np.float64) for i in range(3))
    mass, _ = mass_and_charge(pid)
    mt = np.sqrt(pt**2 + mass**2) * (pt > 0)
    return np.stack([mt * np.cosh(rap), pt * np.cos(phi), pt * np.sin(phi), mt * np.sinh(rap)], axis=-1)


def jet_kinematics(kin: np.ndarray, pid: np.ndarray) -> dict[str, float]:
    """The jet's pt, mass, rapidity and phi from its constituents ``kin`` (n, 3) and ``pid`` (n,)."""
    e, px, py, pz = four_momenta(kin, pid).sum(axis=0)
    pt = float(np.hypot(px, py))
    mass = float(np.sqrt(max(e * e - px * px - py * py - pz * pz, 0.0)))
    rap = float(0.5 * np.log((e + pz) / (e - pz))) if e > abs(pz) else 0.0
    return {"pt": pt, "mass": mass, "jet_y": rap, "jet_phi": float(np.arctan2(py, px))}


def particle_features(
    kin: np.ndarray,
    pid: np.ndarray,
    mask: np.ndarray,
    jet_y: np.ndarray,
    jet_phi: np.ndarray,
    preset: str = "kin",
) -> tuple[np.ndarray, np.ndarray]:
    """Features of padded clouds.

    Args:
        kin: (B, P, 3) particle (pt, rapidity, phi); padded entries anything.
        pid: (B, P) PDG ids.
        mask: (B, P) bool, True for real particles.
        jet_y, jet_phi: (B,) jet axis.
        preset: ``kin`` or ``kinpid``.

    Returns:
        points (B, P, 2) float32 = (deta, dphi) and features (B, P, C) float32, both zero where ``mask`` is False.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown feature preset {preset!r}; choose from {sorted(PRESETS)}")
    pt = np.where(mask, kin[..., 0], 1.0).astype(np.float64)
    rap, phi = kin[..., 1].astype(np.float64), kin[..., 2].astype(np.float64)
    mass, charge = mass_and_charge(np.where(mask, pid, 0))
    energy = np.sqrt(pt**2 + mass**2) * np.cosh(rap)
    deta = rap - jet_y[:, None]
    dphi = (phi - jet_phi[:, None] + np.pi) % (2 * np.pi) - np.pi
    m = mask.astype(np.float64)
    jet_pt = (pt * m).sum(axis=1, keepdims=True)
    jet_e = (energy * m).sum(axis=1, keepdims=True)
    cols = [deta, dphi, np.log(pt), np.log(energy), np.log(pt / np.maximum(jet_pt, 1e-9)),
            np.log(energy / np.maximum(jet_e, 1e-9)), np.hypot(deta, dphi)]
    if preset == "kinpid":
        apid = np.abs(np.where(mask, pid, 0)).astype(np.int64)
        cols += [charge,
                 np.isin(apid, list(_CHARGED_HADRONS)), np.isin(apid, list(_NEUTRAL_HADRONS)),
                 apid == 22, apid == 11, apid == 13]
    features = np.stack([np.asarray(c, dtype=np.float64) for c in cols], axis=-1) * m[..., None]
    points = np.stack([deta, dphi], axis=-1) * m[..., None]
    return points.astype(np.float32), features.astype(np.float32)
