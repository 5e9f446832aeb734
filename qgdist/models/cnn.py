"""CNNs on calorimeter jet images (B, C, H, W) with the jet's (pt, mass) as side inputs (B, 2).

* ``seed-cnn``: the seed notebook's Keras model (000_*), layer for layer: Conv2D(32, 3, GELU) -> BN -> MaxPool(2) ->
  Dropout(0.3); two [DepthwiseConv2D(3, GELU) -> BN -> MaxPool(2) -> Dropout(0.5)]; Flatten; Dense(32, GELU) on
  (pt, m0); concatenate; Dense(128, GELU) -> BN -> Dropout(0.5) -> Dense(64, ReLU) -> BN -> Dropout(0.5) -> Dense(1).
  Keras defaults kept: 'valid' padding, BatchNorm eps 1e-3 / momentum 0.99, Glorot-uniform weights, zero biases.
  The sigmoid is left out (the loss takes logits). Flatten needs a fixed grid: built for ``image_size`` (125 for the
  CMS images, a 13x13x32 flatten); other input sizes are average-pooled onto that grid (identity at the built size).
* ``resnet15``: the CMS End-to-End ResNet-15 (Andrews et al., arXiv:1902.08276; E2E group's PyTorch code):
  Conv(7x7, 16) -> ReLU -> MaxPool(2); 3 residual blocks of 16; 1 down-sampling block 16->32 (stride 2,
  1x1-conv shortcut); 3 residual blocks of 32; global max pool; concat (pt, mass); Linear(34, 1). 1 + 7 x 2 = 15
  convolutions. Any image size. The E2E input transform (pixels < 1e-3 -> 0, HCAL x 25, all / 100) is on by default
  (``e2e_preprocess``); the loader hands over raw pixels (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def e2e_preprocess(image: torch.Tensor, hcal_channel: int = 2, threshold: float = 1e-3,
                   hcal_scale: float = 25.0, scale: float = 100.0) -> torch.Tensor:
    """The E2E authors' pixel transform: zero below ``threshold``, HCAL channel x ``hcal_scale``, all / ``scale``."""
    x = torch.where(image < threshold, torch.zeros_like(image), image)
    gain = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
    gain[hcal_channel] = hcal_scale
    return x * (gain / scale).view(1, -1, 1, 1)


def _seed_grid(size: int) -> int:
    """Spatial size after the seed's three [valid 3x3 conv, 2x2 max-pool] stages."""
    for _ in range(3):
        size = (size - 2) // 2
    if size < 1:
        raise ValueError("seed-cnn needs images of at least 22 x 22 pixels")
    return size


@dataclass
class SeedCNNConfig:
    in_channels: int = 3
    image_size: int = 125
    jet_features: int = 2


class SeedCNN(nn.Module):
    """The seed notebook's Keras CNN in PyTorch: ``model(image=(B,C,H,W), jet=(B,2)) -> logits (B,)``."""

    kind = "image"

    def __init__(self, config: SeedCNNConfig) -> None:
        super().__init__()
        self.config = config
        c = config.in_channels

        def bn(n: int) -> nn.Module:  # Keras BatchNormalization defaults (Keras momentum 0.99 = torch 0.01)
            return nn.BatchNorm2d(n, eps=1e-3, momentum=0.01)

        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3), nn.GELU(), bn(32), nn.MaxPool2d(2), nn.Dropout(0.3),
            nn.Conv2d(32, 32, 3, groups=32), nn.GELU(), bn(32), nn.MaxPool2d(2), nn.Dropout(0.5),
            nn.Conv2d(32, 32, 3, groups=32), nn.GELU(), bn(32), nn.MaxPool2d(2), nn.Dropout(0.5),
        )
        self.grid = _seed_grid(config.image_size)
        self.jet_dense = nn.Sequential(nn.Linear(config.jet_features, 32), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(32 * self.grid * self.grid + 32, 128), nn.GELU(),
            nn.BatchNorm1d(128, eps=1e-3, momentum=0.01), nn.Dropout(0.5),
            nn.Linear(128, 64), nn.ReLU(), nn.BatchNorm1d(64, eps=1e-3, momentum=0.01), nn.Dropout(0.5),
            nn.Linear(64, 1),
        )
        for m in self.modules():  # Keras initialisers
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, image: torch.Tensor, jet: torch.Tensor) -> torch.Tensor:
        x = self.features(image)
        if x.shape[-2:] != (self.grid, self.grid):
            x = F.adaptive_avg_pool2d(x, self.grid)
        x = torch.cat([x.flatten(1), self.jet_dense(jet)], dim=1)
        return self.head(x).squeeze(-1).float()


class ResBlock(nn.Module):
    """E2E residual block: conv3x3(stride s) -> ReLU -> conv3x3, plus identity or a 1x1 stride-s conv; ReLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        stride = out_channels // in_channels  # the E2E convention: doubling the width halves the resolution
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride) if stride > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.conv1(x)))
        return torch.relu(out + (x if self.shortcut is None else self.shortcut(x)))


@dataclass
class ResNet15Config:
    in_channels: int = 3
    fmaps: tuple[int, int] = (16, 32)
    nblocks: int = 3
    #: The E2E code has used stride 2 (older version, cheaper) and stride 1 for the first 7x7 conv.
    conv0_stride: int = 2
    jet_features: int = 2
    e2e_preprocess: bool = True
    hcal_channel: int = 2


class ResNet15(nn.Module):
    """CMS E2E ResNet-15: ``model(image=(B,C,H,W), jet=(B,2)) -> logits (B,)``, any H, W."""

    kind = "image"

    def __init__(self, config: ResNet15Config) -> None:
        super().__init__()
        self.config = config
        f0, f1 = config.fmaps
        self.conv0 = nn.Conv2d(config.in_channels, f0, 7, stride=config.conv0_stride, padding=1)
        self.layer1 = nn.Sequential(*(ResBlock(f0, f0) for _ in range(config.nblocks)))
        self.layer2 = ResBlock(f0, f1)
        self.layer3 = nn.Sequential(*(ResBlock(f1, f1) for _ in range(config.nblocks)))
        self.fc = nn.Linear(f1 + config.jet_features, 1)

    def forward(self, image: torch.Tensor, jet: torch.Tensor) -> torch.Tensor:
        if self.config.e2e_preprocess:
            image = e2e_preprocess(image, hcal_channel=self.config.hcal_channel)
        x = F.max_pool2d(torch.relu(self.conv0(image)), 2)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = torch.amax(x, dim=(2, 3))  # global max pool
        x = torch.cat([x, jet.to(x.dtype)], dim=1)
        return self.fc(x).squeeze(-1).float()


def seed_cnn(**cfg) -> SeedCNN:
    """The seed notebook's Keras CNN (baseline)."""
    return SeedCNN(SeedCNNConfig(**cfg))


def resnet15(**cfg) -> ResNet15:
    """The CMS E2E ResNet-15 with the E2E input transform."""
    return ResNet15(ResNet15Config(**cfg))
