"""From a batch of Pythia events to accepted jets: visible final state, anti-kT clustering, leading-jet cuts.

Follows the EnergyFlow recipe: anti-kT R = 0.4 on every final-state particle except neutrinos, keep the event when
its leading (highest-pT) jet has pT in [pt_min, pt_max] and |rapidity| < max_abs_y. Each accepted jet carries its
constituents in the EnergyFlow layout (pt, rapidity, phi, pdgid) and the visible particles of the event that fall
in the image window around the jet axis (for the CMS-style images, see ``images.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import awkward as ak
import numpy as np

from qgdist.generate.images import WINDOW_HALF_WIDTH

#: PDG ids that leave no trace (neutrinos).
INVISIBLE = (12, 14, 16)
#: Quark flavours kept in the quark sample (the public files are u, d, s only; c and b events, ~4%, are dropped).
LIGHT_QUARKS = (1, 2, 3)

TWO_PI = 2.0 * np.pi


@dataclass
class Jet:
    """One accepted leading jet."""

    pt: float
    rapidity: float
    eta: float
    phi: float                  # in [0, 2 pi), FastJet's convention
    mass: float
    constituents: np.ndarray    # (n, 4) float64: pt, rapidity, phi (within pi of the jet), pdgid; pt-descending
    window: np.ndarray          # (k, 6) float64: deta, dphi, pt, E, is_charged, is_em for the event's visible particles


def _rapidity(e: np.ndarray, pz: np.ndarray) -> np.ndarray:
    return 0.5 * np.log((e + pz) / (e - pz))


def _phi(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    return np.mod(np.arctan2(py, px), TWO_PI)


def _wrap(dphi: np.ndarray) -> np.ndarray:
    """Map angle differences into [-pi, pi)."""
    return np.mod(dphi + np.pi, TWO_PI) - np.pi


def light_quark_events(prt: ak.Array) -> np.ndarray:
    """Mask of events whose outgoing hard-process parton (status -23) is a u, d or s (anti)quark."""
    outgoing = abs(prt.id[prt.status == -23])
    light = (outgoing == 1) | (outgoing == 2) | (outgoing == 3)
    return ak.to_numpy(ak.all(light, axis=1) & (ak.num(outgoing) > 0))


class JetSelector:
    """Clusters batches of events and keeps the leading jets that pass the cuts."""

    def __init__(self, jet_r: float, pt_min: float, pt_max: float, max_abs_y: float, charge_of: Callable[[int], float]):
        import fastjet

        _silence_fastjet_banner()
        self.jetdef = fastjet.JetDefinition(fastjet.antikt_algorithm, jet_r)
        self.pt_min, self.pt_max, self.max_abs_y = pt_min, pt_max, max_abs_y
        self._charge_of = charge_of
        self._charge_cache: dict[int, float] = {}
        self.dropped_heavy = 0  # quark-sample events dropped because the hard parton was c or b

    def _charged(self, pid: np.ndarray) -> np.ndarray:
        for p in np.unique(pid):
            if int(p) not in self._charge_cache:
                self._charge_cache[int(p)] = self._charge_of(int(p))
        return np.array([self._charge_cache[int(p)] != 0.0 for p in pid], dtype=bool)

    def select(self, events: ak.Array, light_quarks_only: bool = False) -> list[Jet]:
        """Accepted leading jets of ``events`` (a ``Pythia.nextBatch`` result), in event order."""
        import fastjet

        prt = events.prt
        if light_quarks_only:
            light = light_quark_events(prt)
            self.dropped_heavy += int((~light).sum())
            prt = prt[light]
        aid = abs(prt.id)
        vis = prt[(prt.status > 0) & (aid != INVISIBLE[0]) & (aid != INVISIBLE[1]) & (aid != INVISIBLE[2])]
        four = ak.zip({"px": vis.p.px, "py": vis.p.py, "pz": vis.p.pz, "E": vis.p.e})
        cs = fastjet.ClusterSequence(four, self.jetdef)
        min_pt = 0.5 * self.pt_min  # anything that could be the leading jet of an accepted event
        jets, index = cs.inclusive_jets(min_pt), cs.constituent_index(min_pt)
        jet_pt = np.hypot(jets.px, jets.py)
        lead = ak.argmax(jet_pt, axis=1, keepdims=True)
        lead_pt = ak.to_numpy(ak.fill_none(ak.firsts(jet_pt[lead]), 0.0))
        lead_jet = ak.firsts(jets[lead])
        lead_y = ak.to_numpy(ak.fill_none(0.5 * np.log((lead_jet.E + lead_jet.pz) / (lead_jet.E - lead_jet.pz)), 99.0))
        ok = (lead_pt >= self.pt_min) & (lead_pt <= self.pt_max) & (np.abs(lead_y) < self.max_abs_y)
        out = []
        for ev in np.flatnonzero(ok):
            j = lead_jet[ev]
            parts = vis[ev]
            px, py, pz, e = (ak.to_numpy(parts.p[c]) for c in ("px", "py", "pz", "e"))
            pid = ak.to_numpy(parts.id)
            members = ak.to_numpy(index[ev][int(lead[ev][0])])
            out.append(self._jet(float(j.px), float(j.py), float(j.pz), float(j.E), px, py, pz, e, pid, members))
        return out

    def _jet(self, jpx, jpy, jpz, je, px, py, pz, e, pid, members) -> Jet:
        jet_pt = float(np.hypot(jpx, jpy))
        jet_phi = float(_phi(np.array(jpx), np.array(jpy)))
        jet_eta = float(np.arcsinh(jpz / jet_pt))
        mass = float(np.sqrt(max(je**2 - jpx**2 - jpy**2 - jpz**2, 0.0)))
        pt = np.hypot(px, py)
        phi = _phi(px, py)
        dphi = _wrap(phi - jet_phi)
        # Constituents in the EnergyFlow layout: phi moved by 2 pi where needed to lie within pi of the jet.
        c = members[np.argsort(-pt[members], kind="stable")]
        cons = np.stack([pt[c], _rapidity(e[c], pz[c]), jet_phi + dphi[c], pid[c].astype(np.float64)], axis=1)
        # Visible particles in the image window, for the CMS-style images.
        deta = np.arcsinh(pz / pt) - jet_eta
        inside = (np.abs(deta) < WINDOW_HALF_WIDTH) & (np.abs(dphi) < WINDOW_HALF_WIDTH)
        ids = pid[inside]
        is_em = np.isin(np.abs(ids), (11, 22))
        window = np.stack([deta[inside], dphi[inside], pt[inside], e[inside],
                           self._charged(ids).astype(np.float64), is_em.astype(np.float64)], axis=1)
        return Jet(jet_pt, float(_rapidity(np.array(je), np.array(jpz))), jet_eta, jet_phi, mass, cons, window)


_banner_silenced = False


def _silence_fastjet_banner() -> None:
    """FastJet prints a 13-line banner on stdout at the first clustering; a null banner stream turns it off."""
    global _banner_silenced
    if _banner_silenced:
        return
    try:
        from fastjet._swig import ClusterSequence

        ClusterSequence.set_fastjet_banner_stream(None)
    except (ImportError, AttributeError, TypeError):  # a fastjet build without the hook: live with the banner
        pass
    _banner_silenced = True
