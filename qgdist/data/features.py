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
def pdg_lookup(pid: int) -> tuple[float, float] | None:
    """(mass in GeV, charge in e) of a PDG id; None when the PDG table knows no such particle; (0, 0) for 0
    (padding).

    Only the ``particle`` package's own answers "no such particle" -- ``ParticleNotFound`` (a valid id the table
    lacks, e.g. 12345) and ``InvalidParticle`` (a number that is no PDG id at all) -- mean unknown. Any other
    failure (the package missing or broken, its tables unreadable) is raised: it says nothing about the id, and
    treating it as "unknown" would reject every particle of every jet.
    """
    if pid == 0:
        return 0.0, 0.0
    from particle import Particle  # imported lazily: building its tables costs ~0.3 s
    from particle.particle import InvalidParticle, ParticleNotFound

    try:
        p = Particle.from_pdgid(pid)
    except (ParticleNotFound, InvalidParticle):
        return None
    return (p.mass or 0.0) / 1000.0, float(p.charge or 0.0)


#: Dense (mass, charge, known) table for PDG ids in (-_LIMIT, _LIMIT), filled lazily (NaN = not looked up yet).
_LIMIT = 1 << 13
_TABLE = np.full((3, 2 * _LIMIT), np.nan)


def _fill(ids: np.ndarray) -> None:
    for i in ids.tolist():
        found = pdg_lookup(int(i))
        _TABLE[:, i + _LIMIT] = (*found, 1.0) if found is not None else (0.0, 0.0, 0.0)


def _lookup(pid: np.ndarray) -> np.ndarray:
    """(3, *pid.shape): mass, charge and known (1/0) of integral PDG ids."""
    pid = np.asarray(pid)
    pid = pid if pid.dtype == np.int64 else pid.astype(np.int64)
    if pid.size and np.abs(pid).max() < _LIMIT:
        idx = pid + _LIMIT
        if np.isnan(_TABLE[0][idx]).any():
            _fill(np.unique(pid[np.isnan(_TABLE[0][idx])]))
        return _TABLE[:, idx]
    ids, inverse = np.unique(pid, return_inverse=True)
    found = [pdg_lookup(int(i)) for i in ids]
    table = np.array([(*f, 1.0) if f is not None else (0.0, 0.0, 0.0) for f in found], np.float64).reshape(-1, 3)
    return table[inverse].T.reshape((3, *pid.shape))


def mass_and_charge(pid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise mass (GeV) and charge for an array of PDG ids: one table gather (ids below 8192 in magnitude,
    i.e. every hadron, lepton and photon of a jet), else one lookup per distinct id. An unknown id gives 0 and 0:
    ingest rejects such particles (``known_pdg_ids``), so shards never hold one."""
    table = _lookup(pid)
    return table[0], table[1]


def known_pdg_ids(pid: np.ndarray) -> np.ndarray:
    """Element-wise: is this value an integral PDG id of a particle the PDG table knows (0, padding, counts)?"""
    pid = np.asarray(pid, dtype=np.float64)
    integral = np.isfinite(pid) & (pid == np.round(pid)) & (np.abs(pid) < 2**31)
    out = np.zeros(pid.shape, dtype=bool)
    out[integral] = _lookup(pid[integral].astype(np.int64))[2] > 0
    return out


def four_momenta(kin: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """(..., 4) = (E, px, py, pz) from (..., 3) = (pt, rapidity, phi) and PDG ids (padding pt = 0 gives zeros)."""
    pt, rap, phi = (kin[..., i].astype(np.float64) for i in range(3))
    mass, _ = mass_and_charge(pid)
    mt = np.sqrt(pt * pt + mass * mass) * (pt > 0)
    ey = np.exp(rap)            # cosh and sinh from one exp (|rapidity| <= 10 here, so no overflow)
    half_inv = 0.5 / ey
    out = np.empty(pt.shape + (4,))
    out[..., 0] = mt * (0.5 * ey + half_inv)
    out[..., 1] = pt * np.cos(phi)
    out[..., 2] = pt * np.sin(phi)
    out[..., 3] = mt * (0.5 * ey - half_inv)
    return out


def jet_kinematics(kin: np.ndarray, pid: np.ndarray) -> dict[str, float]:
    """The jet's pt, mass, rapidity and phi from its constituents ``kin`` (n, 3) and ``pid`` (n,)."""
    e, px, py, pz = four_momenta(kin, pid).sum(axis=0)
    pt = float(np.hypot(px, py))
    mass = float(np.sqrt(max(e * e - px * px - py * py - pz * pz, 0.0)))
    rap = float(0.5 * np.log((e + pz) / (e - pz))) if e > abs(pz) else 0.0
    return {"pt": pt, "mass": mass, "jet_y": rap, "jet_phi": float(np.arctan2(py, px))}


def feature_columns(
    kin: np.ndarray,
    pid: np.ndarray,
    jet: np.ndarray,
    jet_y: np.ndarray,
    jet_phi: np.ndarray,
    preset: str = "kin",
    dtype: type = np.float64,
) -> list[np.ndarray]:
    """The preset's features of the real particles of several jets, one (N,) array per feature.

    Args:
        kin: (N, 3) particle (pt, rapidity, phi) of all jets, concatenated.
        pid: (N,) PDG ids.
        jet: (N,) index of each particle's jet into ``jet_y`` / ``jet_phi`` (B,).
        preset: ``kin`` or ``kinpid``.
        dtype: arithmetic precision.

    Jet sums (pt, energy) run over the particles given, so pass only the particles a model sees (e.g. after
    ``max_particles``).
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown feature preset {preset!r}; choose from {sorted(PRESETS)}")
    kin = np.asarray(kin)
    pt, rap, phi = (kin[:, i].astype(dtype) for i in range(3))
    mass, charge = mass_and_charge(pid)
    mass = mass.astype(dtype)
    ey = np.exp(rap)                                    # cosh from one exp (|rapidity| <= 10)
    energy = np.sqrt(pt * pt + mass * mass) * (dtype(0.5) * ey + dtype(0.5) / ey)
    n_jets = len(jet_y)
    deta = rap - np.asarray(jet_y, dtype)[jet]
    dphi = np.mod(phi - np.asarray(jet_phi, dtype)[jet] + dtype(np.pi), dtype(2 * np.pi)) - dtype(np.pi)
    tiny = 1e-9
    log_jet_pt = np.log(np.maximum(np.bincount(jet, weights=pt, minlength=n_jets), tiny)).astype(dtype)
    log_jet_e = np.log(np.maximum(np.bincount(jet, weights=energy, minlength=n_jets), tiny)).astype(dtype)
    log_pt, log_e = np.log(pt), np.log(energy)
    cols = [deta, dphi, log_pt, log_e, log_pt - log_jet_pt[jet], log_e - log_jet_e[jet],
            np.sqrt(deta * deta + dphi * dphi)]
    if preset == "kinpid":
        apid = np.abs(np.asarray(pid)).astype(np.int64)
        cols += [charge.astype(dtype), np.isin(apid, list(_CHARGED_HADRONS)).astype(dtype),
                 np.isin(apid, list(_NEUTRAL_HADRONS)).astype(dtype), (apid == 22).astype(dtype),
                 (apid == 11).astype(dtype), (apid == 13).astype(dtype)]
    return cols


def flat_features(
    kin: np.ndarray,
    pid: np.ndarray,
    jet: np.ndarray,
    jet_y: np.ndarray,
    jet_phi: np.ndarray,
    preset: str = "kin",
    dtype: type = np.float64,
) -> tuple[np.ndarray, np.ndarray]:
    """``feature_columns`` as arrays: points (N, 2) = (deta, dphi) and features (N, C), both ``dtype``
    (the loader's path, on real particles only: no padding)."""
    cols = feature_columns(kin, pid, jet, jet_y, jet_phi, preset, dtype)
    features = np.empty((len(cols[0]), len(cols)), dtype)
    for i, c in enumerate(cols):
        features[:, i] = c
    return features[:, :2].copy(), features


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
    b, p = mask.shape
    where = np.flatnonzero(mask.reshape(-1))
    points_flat, feats_flat = flat_features(
        np.asarray(kin).reshape(b * p, -1)[where], np.asarray(pid).reshape(-1)[where], where // p,
        np.asarray(jet_y, np.float64), np.asarray(jet_phi, np.float64), preset)
    features = np.zeros((b * p, feats_flat.shape[1]), np.float32)
    points = np.zeros((b * p, 2), np.float32)
    features[where], points[where] = feats_flat, points_flat
    return points.reshape(b, p, 2), features.reshape(b, p, -1)
