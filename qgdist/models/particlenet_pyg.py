"""ParticleNet through PyTorch Geometric: ``torch_geometric.nn.EdgeConv`` on an ``edge_index`` from our kNN.

Same layers, same parameter names as :mod:`qgdist.models.particlenet` (``state_dict`` loads across directly), but
the message passing runs on the packed real particles (N, C) with PyG's gather/scatter instead of dense (B, P, k)
tensors, so padding costs nothing after the kNN. PyG's ``knn_graph`` / ``DynamicEdgeConv`` need pyg-lib, which is
not available, so each block builds its graph with the dense batched :func:`qgdist.models.knn.knn` and converts it
(:func:`qgdist.models.knn.edge_index_from_knn`).

Packing the real particles (``features[mask]``) needs their count on the host: one synchronisation per batch on a
GPU. The dense path has none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qgdist.models.edgeconv import EdgeMLP, MaskedBatchNorm
from qgdist.models.knn import DEFAULT_MAX_ELEMENTS, edge_index_from_knn, knn, trim_padding
from qgdist.models.particlenet import FULL_CONV, ParticleNetBase, ParticleNetConfig


class PygEdgeConvBlock(nn.Module):
    """ParticleNet EdgeConv block on packed points; parameter names as in the dense ``EdgeConvBlock``."""

    def __init__(self, k: int, in_channels: int, channels: Sequence[int],
                 knn_max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        super().__init__()
        from torch_geometric.nn import EdgeConv

        self.k, self.knn_max_elements = k, knn_max_elements
        self.edge_mlp = EdgeMLP(in_channels, channels)
        # EdgeConv would register edge_mlp a second time under its own name; keep it out of the module tree.
        object.__setattr__(self, "_conv", EdgeConv(self.edge_mlp, aggr="mean"))
        out = channels[-1]
        self.shortcut = nn.Linear(in_channels, out, bias=False) if in_channels != out else None
        self.shortcut_norm = MaskedBatchNorm(out) if in_channels != out else None

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        """x (N, C) packed real points, edge_index (2, E) -> (N, C_out)."""
        h = self._conv(x, edge_index)
        sc = x if self.shortcut is None else self.shortcut_norm(self.shortcut(x))
        return torch.relu(h + sc)


class ParticleNetPyG(ParticleNetBase):
    """PyG ParticleNet with the dense model's contract: ``model(points, features, mask) -> logits (B,)``."""

    def __init__(self, config: ParticleNetConfig) -> None:
        super().__init__(config, PygEdgeConvBlock)

    def forward(self, points: torch.Tensor, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from torch_geometric.nn import global_mean_pool

        self._check(points, features, mask)
        mask = mask.bool()
        if self.config.trim_padding:
            mask, points, features = trim_padding(mask, points, features)
        b, p = mask.shape
        flat_real = mask.reshape(-1).nonzero().squeeze(1)  # host sync: N real particles
        batch = flat_real // p
        x = self.input_norm(features.reshape(b * p, -1)[flat_real])
        coords = points
        for block in self.blocks:
            idx = knn(coords, block.k, mask, max_elements=self.knn_max_elements)
            edge_index, _ = edge_index_from_knn(idx, mask, flat_real)
            x = block(x, edge_index)
            coords = x.new_zeros(b * p, x.shape[-1]).index_copy(0, flat_real, x).view(b, p, -1)
        if self.config.pooling == "all":
            pooled = coords.mean(1)
        else:
            pooled = global_mean_pool(x, batch, size=b)
        return self.head(pooled).squeeze(-1).float()

    @property
    def knn_max_elements(self) -> int:
        return self.config.knn_max_elements


def particlenet_lite_pyg(**cfg) -> ParticleNetPyG:
    """ParticleNet-Lite through PyG's EdgeConv."""
    return ParticleNetPyG(ParticleNetConfig(**cfg))


def particlenet_pyg(**cfg) -> ParticleNetPyG:
    """ParticleNet through PyG's EdgeConv."""
    cfg = {"conv_params": FULL_CONV, "fc_params": ((256, 0.1),), **cfg}
    return ParticleNetPyG(ParticleNetConfig(**cfg))
