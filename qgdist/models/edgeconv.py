"""Dense EdgeConv (Wang et al., DGCNN; as used in ParticleNet) on padded (B, P, C) clouds with a mask.

One EdgeConv block (ParticleNet paper, Fig. 2): build the kNN graph in the block's coordinate space, form edge
features ``(x_i, x_j - x_i)`` for the ``k`` neighbours ``j`` of each point ``i``, apply three shared
Linear(no bias) + BatchNorm + ReLU layers, average over the neighbours, add a (Linear + BatchNorm) shortcut of
``x_i`` and apply ReLU.

Two details matter for padded batches:

* Batch-norm statistics are taken over **real** points (and their edges) only (:class:`MaskedBatchNorm`), so the
  output does not depend on how much padding a batch carries, in training mode too, and equals the PyG path,
  which never sees padding. Parameter and buffer names match ``torch.nn.BatchNorm1d``.
* The first edge layer is computed per point, not per edge: ``W [x_i, x_j - x_i] = (W_a - W_b) x_i + W_b x_j``
  with ``W = [W_a | W_b]``, so the (B, P, k, 2C) edge tensor is never built. Same weights, same result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qgdist.models.knn import DEFAULT_MAX_ELEMENTS, knn


class MaskedBatchNorm(nn.Module):
    """BatchNorm over the last (channel) dimension, with statistics from the real entries only.

    ``x`` is (..., C) and must be **zero wherever** ``mask`` is False; ``mask`` is a bool tensor broadcastable to
    ``x.shape[:-1]`` (or None: every entry is real, and this is ``nn.BatchNorm1d`` on ``x.reshape(-1, C)``). The
    output is zero where ``mask`` is False again, so a following bias-free Linear keeps the invariant. Zero padding
    lets the statistics come from plain sums (sum and sum of squares, accumulated in float32 under autocast) divided
    by the real count: two reductions and one fused scale-and-shift, instead of a mask multiply per pass.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.training:
            dims = tuple(range(x.dim() - 1))
            rows = x.numel() // x.shape[-1]
            if mask is None:
                n = torch.tensor(float(rows), device=x.device)
            else:  # real entries: mask count times the broadcast factor (e.g. k edges per point)
                n = mask.sum(dtype=torch.float32) * (rows / mask.numel())
            n_safe = n.clamp_min(1.0)
            mean = x.sum(dims, dtype=torch.float32) / n_safe
            mean_sq = torch.linalg.vector_norm(x, dim=dims, dtype=torch.float32).square() / n_safe
            var = (mean_sq - mean.square()).clamp_min(0.0)
            with torch.no_grad():
                unbiased = var * (n / (n - 1.0).clamp_min(1.0))
                self.running_mean.lerp_(mean, self.momentum)
                self.running_var.lerp_(unbiased, self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            mean, var = self.running_mean, self.running_var
        scale = self.weight * torch.rsqrt(var + self.eps)
        shift = self.bias - mean * scale
        y = torch.addcmul(shift.to(x.dtype), x, scale.to(x.dtype))
        if mask is not None:
            y = y * mask.unsqueeze(-1).to(y.dtype)
        return y


class EdgeMLP(nn.Module):
    """The shared edge network: [Linear(no bias) -> BatchNorm -> ReLU] x len(channels), input 2 * in_channels."""

    def __init__(self, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        dims = [2 * in_channels, *channels]
        self.in_channels = in_channels
        self.linears = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))
        self.norms = nn.ModuleList(MaskedBatchNorm(c) for c in channels)

    def forward(self, edges: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Edge features (..., 2C) = cat(x_i, x_j - x_i) -> (..., C_out). Used as-is by PyG's EdgeConv."""
        return self.rest(torch.relu(self.norms[0](self.linears[0](edges), mask)), mask)

    def rest(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layers 2.. of the network on already activated first-layer outputs."""
        for linear, norm in zip(self.linears[1:], self.norms[1:]):
            h = torch.relu(norm(linear(h), mask))
        return h

    def first_layer_per_point(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with ``first_linear(cat(x_i, x_j - x_i)) = a_i + b_j``; each (..., C_out)."""
        w_self, w_diff = self.linears[0].weight.split(self.in_channels, dim=1)
        return nn.functional.linear(x, w_self - w_diff), nn.functional.linear(x, w_diff)


def gather_neighbours(values: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """values (B, P, C), idx (B, P, k) -> (B, P, k, C): ``out[b, i, n] = values[b, idx[b, i, n]]``."""
    b, p, c = values.shape
    offsets = (torch.arange(b, device=idx.device) * p).view(b, 1, 1)
    return values.reshape(b * p, c)[idx + offsets]


class EdgeConvBlock(nn.Module):
    """One dense ParticleNet EdgeConv block: (points (B,P,D), features (B,P,C), mask) -> features (B,P,C_out)."""

    def __init__(self, k: int, in_channels: int, channels: Sequence[int],
                 knn_max_elements: int = DEFAULT_MAX_ELEMENTS) -> None:
        super().__init__()
        self.k, self.knn_max_elements = k, knn_max_elements
        self.edge_mlp = EdgeMLP(in_channels, channels)
        out = channels[-1]
        # Shortcut: a projection when the width changes (always, in ParticleNet), else identity.
        self.shortcut = nn.Linear(in_channels, out, bias=False) if in_channels != out else None
        self.shortcut_norm = MaskedBatchNorm(out) if in_channels != out else None

    def forward(self, points: torch.Tensor, features: torch.Tensor, mask: torch.Tensor,
                idx: torch.Tensor | None = None) -> torch.Tensor:
        if idx is None:
            idx = knn(points, self.k, mask, max_elements=self.knn_max_elements)
        edge_mask = mask.unsqueeze(-1)  # (B, P, 1): broadcast over the k edges of each point
        # Padded rows stay exactly zero through every layer: padded features are zero, their kNN row points at
        # themselves, the Linears have no bias and MaskedBatchNorm re-zeroes them. Its statistics rely on that.
        a, b = self.edge_mlp.first_layer_per_point(features)
        h = a.unsqueeze(2) + gather_neighbours(b, idx)
        h = torch.relu(self.edge_mlp.norms[0](h, edge_mask))
        h = self.edge_mlp.rest(h, edge_mask).mean(dim=2)
        sc = features if self.shortcut is None else self.shortcut_norm(self.shortcut(features), mask)
        return torch.relu(h + sc)  # zero on padding: both terms are
