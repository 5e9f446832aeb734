"""Batched k-nearest-neighbour graphs on dense padded point clouds, on any device.

PyG's ``knn_graph`` needs pyg-lib (not installable here), and the reference ParticleNet kNN (weaver-core) shifts
padded points "far away" by a constant that has to shrink to 99 under float16 autocast, where it stops being far.
This module avoids both:

* Distances are computed in float32 with autocast disabled, whatever the caller's autocast dtype, after centring
  each jet on the mean of its real points (the ``|a|^2 + |b|^2 - 2 a.b`` form loses precision far from the origin).
* Padded points and the query itself are excluded by setting their distance to +inf, never by moving points.
* Ties are broken deterministically, lowest index first: the float32 distance bits (monotone for non-negative
  floats) and the candidate index are packed into one int64 key, and ``topk`` runs on the unique keys.
* A real point with fewer than ``k`` real neighbours (jets of <= k particles) gets **self-loops** in the slots it
  cannot fill: index ``i`` itself, i.e. edge feature ``(x_i, 0)``. Padded query rows point at themselves too, so
  every index is a valid position of the same jet and the output shape is static.
* Memory is bounded by processing queries in chunks of ``B * chunk * P <= max_elements`` (a static loop, no sync).

Nothing here reads a value back to the host, so it runs asynchronously on a GPU and under ``torch.compile``;
the only host synchronisation in the cloud path is :func:`trim_padding`, which needs the batch's longest jet as a
Python int. The loader already trims on the host (docs/ARCHITECTURE.md), so models do not call it by default.
"""

from __future__ import annotations

import torch

#: float32 +inf reinterpreted as int32: every key at or above ``_INF_BITS * P`` is an excluded candidate.
_INF_BITS = 0x7F800000
#: Default bound on the number of distance entries held at once (int64 keys: 8 bytes each, so 512 MiB).
DEFAULT_MAX_ELEMENTS = 1 << 26


def _centred_float32(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, P, C) as float32, each jet shifted by the mean of its real points, padded rows zeroed."""
    x = x.float()
    m = mask.unsqueeze(-1).float()
    centre = (x * m).sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
    return (x - centre) * m


def knn(x: torch.Tensor, k: int, mask: torch.Tensor | None = None, *,
        max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Indices (B, P, k) int64 of each point's ``k`` nearest real neighbours in the same jet, nearest first.

    Args:
        x: (B, P, C) coordinates; any float dtype (converted to float32 for the distances).
        k: neighbours per point (self excluded).
        mask: (B, P) bool, True for real points; None means all points are real.
        max_elements: bound on ``B * chunk * P`` distance entries computed at once.

    Padded points are never chosen as neighbours; slots that cannot be filled with a real neighbour hold the
    query's own index (self-loop). Ties in distance go to the lower index. Distances must be finite.
    """
    if x.dim() != 3:
        raise ValueError(f"knn expects x of shape (B, P, C), got {tuple(x.shape)}")
    b, p, _ = x.shape
    if mask is None:
        mask = torch.ones(b, p, dtype=torch.bool, device=x.device)
    mask = mask.bool()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kk = min(k, p)  # topk cannot return more than P candidates; extra slots are self-loops (below)
    arange = torch.arange(p, device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False):
        xc = _centred_float32(x, mask)
        sq = (xc * xc).sum(-1)  # (B, P)
        # +inf on padded columns rides along in the GEMM's additive term: no separate masking pass.
        col = (sq + torch.zeros_like(sq).masked_fill(~mask, float("inf"))).unsqueeze(1)
        xt = xc.transpose(1, 2)
        chunk = max(1, min(p, max_elements // max(1, b * p)))
        parts = []
        for q0 in range(0, p, chunk):  # static Python loop: shapes only, no data-dependent control flow
            q1 = min(p, q0 + chunk)
            base = sq[:, q0:q1, None] + col  # (B, q, P) = |x_i|^2 + |x_j|^2 (+inf if j is padding)
            base.diagonal(offset=q0, dim1=1, dim2=2).fill_(float("inf"))  # exclude self
            d = torch.baddbmm(base, xc[:, q0:q1], xt, alpha=-2.0)
            # Non-negative float32 bit patterns sort like the floats; rounding can make d slightly negative (sign
            # bit set, negative as int32), so clamp those to +0. Then key = bits * P + j: unique, ties -> lower j.
            bits = d.view(torch.int32).clamp_min(0)
            key = torch.add(arange, bits, alpha=p)  # int64
            best = torch.topk(key, kk, dim=-1, largest=False, sorted=True).values
            idx = best % p
            ok = (best < _INF_BITS * p) & mask[:, q0:q1, None]
            self_idx = arange[q0:q1].view(1, -1, 1)
            parts.append(torch.where(ok, idx, self_idx))
        idx = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    if kk < k:
        idx = torch.cat([idx, arange.view(1, p, 1).expand(b, p, k - kk)], dim=-1)
    return idx


def knn_reference(x: torch.Tensor, k: int, mask: torch.Tensor) -> torch.Tensor:
    """Brute-force reference for tests: explicit per-jet loops over exact float64 distances, same conventions."""
    b, p, _ = x.shape
    out = torch.empty(b, p, k, dtype=torch.int64)
    xd, md = x.detach().double().cpu(), mask.bool().cpu()
    for j in range(b):
        for i in range(p):
            cands = [(float(((xd[j, i] - xd[j, n]) ** 2).sum()), n) for n in range(p) if md[j, n] and n != i]
            chosen = [n for _, n in sorted(cands)[:k]] if md[j, i] else []
            out[j, i] = torch.tensor(chosen + [i] * (k - len(chosen)))
    return out


def trim_padding(mask: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cut the particle axis (dim 1) of ``mask`` and ``tensors`` after the last column holding any real point.

    Needs the column count on the host: one synchronisation on a GPU (``.item()``). Call it once per batch,
    in the loader or at model entry, not per block.
    """
    cols = mask.any(0)
    last = int((cols * torch.arange(1, cols.numel() + 1, device=mask.device)).max().item())
    last = max(last, 1)
    return (mask[:, :last],) + tuple(t[:, :last] for t in tensors)


def edge_index_from_knn(idx: torch.Tensor, mask: torch.Tensor,
                        flat_real: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PyG ``edge_index`` (2, E) over the packed real points, from dense kNN indices (B, P, k).

    Packed order is ``mask``'s row-major order of True entries (``features[mask]``). Edges point from neighbour
    (source, ``x_j``) to query (target, ``x_i``), PyG's ``source_to_target`` flow; every real point gets exactly
    ``k`` incoming edges. Also returns ``flat_real`` (N,), the flat dense position of each packed point; pass it
    in when already known to skip the ``nonzero`` (a host sync on a GPU).
    """
    b, p, k = idx.shape
    flat_mask = mask.reshape(-1)
    if flat_real is None:
        flat_real = flat_mask.nonzero().squeeze(1)  # host sync on GPU: the number of real points sets E
    packed_pos = torch.cumsum(flat_mask.long(), 0) - 1  # dense flat position -> packed row
    offsets = (torch.arange(b, device=idx.device) * p).view(b, 1, 1)
    src_flat = (idx + offsets).reshape(-1, k)[flat_real]  # (N, k) dense flat positions of neighbours
    dst = torch.arange(flat_real.numel(), device=idx.device).repeat_interleave(k)
    src = packed_pos[src_flat.reshape(-1)]
    return torch.stack([src, dst]), flat_real
