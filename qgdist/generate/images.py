"""CMS-style 3x125x125 jet images from generator-level particles (no detector simulation).

The CMS End-to-End images (arXiv:1902.08276) are 125x125 windows of ECAL crystals (2 pi / 360 rad per pixel in
eta and phi) around the jet axis with three channels: track pT, ECAL energy, HCAL energy (HCAL towers are 5x5
crystals, upsampled). Here the same window is filled from the event's visible final-state particles:

* channel 0: pT of charged particles (the "tracks"; electrons and muons included),
* channel 1: energy of photons and electrons (the "ECAL"),
* channel 2: energy of neutral hadrons (K0L, neutrons, ...) summed in 5x5-pixel towers, each tower's sum spread
  evenly over its 25 pixels (the "HCAL"; upsampling conserves the energy, so the E2E preprocessing x25 restores
  tower-sized values).
"""

from __future__ import annotations

import numpy as np

PIXELS = 125
PIXEL_SIZE = 2.0 * np.pi / 360.0
TOWER = 5
WINDOW_HALF_WIDTH = PIXELS * PIXEL_SIZE / 2.0


def jet_image(window: np.ndarray) -> np.ndarray:
    """A (3, 125, 125) float64 image (channel, eta, phi) from ``Jet.window`` rows (deta, dphi, pt, E, charged, em)."""
    image = np.zeros((3, PIXELS, PIXELS), dtype=np.float64)
    if len(window) == 0:
        return image
    deta, dphi, pt, energy, charged, em = window.T
    ieta = np.floor(deta / PIXEL_SIZE + PIXELS / 2).astype(np.int64)
    iphi = np.floor(dphi / PIXEL_SIZE + PIXELS / 2).astype(np.int64)
    inside = (ieta >= 0) & (ieta < PIXELS) & (iphi >= 0) & (iphi < PIXELS)
    is_charged, is_em = charged.astype(bool), em.astype(bool)
    neutral_hadron = ~is_charged & ~is_em & inside
    charged, em = is_charged & inside, is_em & inside
    np.add.at(image[0], (ieta[charged], iphi[charged]), pt[charged])
    np.add.at(image[1], (ieta[em], iphi[em]), energy[em])
    towers = np.zeros((PIXELS // TOWER, PIXELS // TOWER), dtype=np.float64)
    np.add.at(towers, (ieta[neutral_hadron] // TOWER, iphi[neutral_hadron] // TOWER), energy[neutral_hadron])
    image[2] = np.kron(towers, np.ones((TOWER, TOWER))) / (TOWER * TOWER)
    return image
