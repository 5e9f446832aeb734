"""Synthetic batches in the loader's batch contract, for benchmarks and model tests (no files, no Ray).

Clouds have a realistic shape: multiplicities drawn around the quark / gluon means of the EnergyFlow sample
(about 34 and 53 particles, REFERENCE.md section 2), capped at ``max_particles``, real particles first, padding
zero, P trimmed to the longest jet of the batch. Quark jets are also narrower in (deta, dphi), so a model can learn
something from them. Images are sparse deposits around the centre, narrower for quarks, and quark jets are
lighter (the standardised mass side input is shifted down).
"""

from __future__ import annotations

import torch

#: Mean multiplicities of quark / gluon jets (pT 500-550 GeV, R = 0.4; measured on our Pythia sample).
QUARK_MULTIPLICITY, GLUON_MULTIPLICITY = 34.0, 53.0


def _labels(batch_size: int, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(batch_size, generator=generator) < 0.5).float()


def cloud_batch(batch_size: int, in_features: int = 7, max_particles: int = 128, *,
                generator: torch.Generator | None = None, device: str | torch.device = "cpu",
                vectors: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({"points", "features", "mask"}, label)`` for ``batch_size`` synthetic jets; with ``vectors`` also their
    massless four-momenta (B, P, 4) = (px, py, pz, E): ~500 GeV jets at rapidity 0 sharing pt unevenly."""
    g = generator or torch.Generator().manual_seed(0)
    label = _labels(batch_size, g)
    mean = torch.where(label > 0, QUARK_MULTIPLICITY, GLUON_MULTIPLICITY)
    n = (mean + 0.3 * mean * torch.randn(batch_size, generator=g)).round().clamp(1, max_particles).long()
    p = int(n.max())
    mask = torch.arange(p)[None, :] < n[:, None]
    width = torch.where(label > 0, 0.05, 0.09).view(-1, 1, 1)
    points = torch.randn(batch_size, p, 2, generator=g) * width
    features = torch.randn(batch_size, p, in_features, generator=g)
    features[..., :2] = points / 0.07  # the first two features are (deta, dphi), standardised
    m = mask.unsqueeze(-1).float()
    inputs = {"points": points * m, "features": features * m, "mask": mask}
    if vectors:
        share = torch.rand(batch_size, p, generator=g).pow(3) * mask + 1e-6 * mask
        pt = 500.0 * share / share.sum(1, keepdim=True)
        y, phi = points[..., 0], points[..., 1]
        inputs["vectors"] = torch.stack([pt * torch.cos(phi), pt * torch.sin(phi), pt * torch.sinh(y),
                                         pt * torch.cosh(y)], dim=-1) * m
    return {k: v.to(device) for k, v in inputs.items()}, label.to(device)


def image_batch(batch_size: int, image_size: int = 125, channels: int = 3, *,
                generator: torch.Generator | None = None,
                device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({"image", "jet"}, label)`` for ``batch_size`` synthetic jet images of ``image_size`` squared pixels."""
    g = generator or torch.Generator().manual_seed(0)
    label = _labels(batch_size, g)
    axis = torch.linspace(-1.0, 1.0, image_size)
    r2 = axis.view(1, 1, -1, 1) ** 2 + axis.view(1, 1, 1, -1) ** 2
    width = torch.where(label > 0, 0.08, 0.2).view(-1, 1, 1, 1)
    profile = torch.exp(-r2 / (2 * width**2))
    hits = torch.rand(batch_size, channels, image_size, image_size, generator=g) < 0.05
    energy = torch.rand(batch_size, channels, image_size, image_size, generator=g) * 5.0
    image = energy * hits * profile
    jet = torch.randn(batch_size, 2, generator=g)
    jet[:, 1] += torch.where(label > 0, -1.0, 1.0)  # standardised mass: quark jets are lighter
    return {"image": image.to(device), "jet": jet.to(device)}, label.to(device)
