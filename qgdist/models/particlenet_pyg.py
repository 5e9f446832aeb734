"""ParticleNet through PyTorch Geometric: ``torch_geometric.nn.EdgeConv`` on an ``edge_index`` from our kNN.

Same layers, same parameter names as :mod:`qgdist.models.particlenet` (``state_dict`` loads across directly), but
the message passing runs on the packed real particles (N, C) with PyG's gather/scatter instead of dense (B, P, k)
tensors, so padding costs nothing after the kNN. PyG's ``knn_graph`` / ``DynamicEdgeConv`` need pyg-lib, which is
not available, so each block builds its graph with our batched kNN on the packed points
(:func:`qgdist.models.knn.knn_packed`, the same neighbours as the dense model's) and turns the (N, k) neighbour
table into an ``edge_index`` (:func:`qgdist.models.knn.packed_edge_index`). All rows are real, so the batch norms are
the native kernels.

Packing the real particles (``features[mask]``) needs their count on the host: one synchronisation per batch on a
GPU. The dense model packs the same way in its ``packed`` layout (the CPU default) and has no sync in its
``padded`` one. ``ParticleNetConfig.layout`` does not apply here: this model always runs packed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qgdist.models.edgeconv import EdgeMLP, MaskedBatchNorm
from qgdist.models.knn import DEFAULT_MAX_ELEMENTS, packed_edge_index, trim_padding
from qgdist.models.particlenet import FULL_CONV, ParticleNetBase, ParticleNetConfig, _pack


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
        if self.shortcut is None:
            return torch.relu(h + x)
        return self.shortcut_norm(self.shortcut(x)).add_(h).relu_()


class ParticleNetPyG(ParticleNetBase):
    """PyG ParticleNet with the dense model's contract: ``model(points, features, mask) -> logits (B,)``."""

    def __init__(self, config: ParticleNetConfig) -> None:
        super().__init__(config, PygEdgeConvBlock)

    def forward(self, points: torch.Tensor, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check(points, features, mask)
        mask = mask.bool()
        if self.config.trim_padding:
            mask, points, features = trim_padding(mask, points, features)
        b, p = mask.shape
        packing = _pack(mask)  # host sync: N real particles
        x = self.input_norm(features.reshape(b * p, -1).index_select(0, packing.rows))
        for i, block in enumerate(self.blocks):
            x = block(x, packed_edge_index(self._packed_graph(i, points, x, mask, packing)))
        return self.head(self._pool_packed(x, packing)).squeeze(-1).float()


def particlenet_lite_pyg(**cfg) -> ParticleNetPyG:
    """ParticleNet-Lite through PyG's EdgeConv."""
    return ParticleNetPyG(ParticleNetConfig(**cfg))


def particlenet_pyg(**cfg) -> ParticleNetPyG:
    """ParticleNet through PyG's EdgeConv."""
    cfg = {"conv_params": FULL_CONV, "fc_params": ((256, 0.1),), **cfg}
    return ParticleNetPyG(ParticleNetConfig(**cfg))
