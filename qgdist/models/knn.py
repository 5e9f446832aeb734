"""Batched k-nearest-neighbour graphs on particle clouds, padded (B, P, C) or packed (N, C), on any device.

PyG's ``knn_graph`` needs pyg-lib (not installable here), and the reference ParticleNet kNN (weaver-core) shifts
padded points "far away" by a constant that has to shrink to 99 under float16 autocast, where it stops being far.
This module avoids both:

* Distances are computed in float32 with autocast disabled, whatever the caller's autocast dtype, after centring
  each jet on the mean of its real points (the ``|a|^2 + |b|^2 - 2 a.b`` form loses precision far from the origin).
  Reduced-precision float32 GEMMs (TF32 on CUDA, bf16/TF32 in oneDNN on CPU, which ``set_float32_matmul_precision``
  or ``torch.backends.*.matmul.fp32_precision`` enable) are switched off for the distance GEMM and restored after.
* Padded points and the query itself are excluded by setting their distance to +inf, never by moving points.
* Ties are broken deterministically, lowest index first: order by (float32 distance, index). Two ways, the same
  result (tested): on CUDA and under ``torch.compile`` the float32 distance bits (monotone for non-negative floats)
  and the candidate index are packed into one int64 key and ``topk`` runs on the unique keys (no host sync); on
  the CPU a float ``topk`` of k + 1 candidates is re-ordered by the same keys, and the rare rows whose k-th and
  (k+1)-th distances tie are redone with the int64 keys (measured 1.5-2x faster on CPU; one host sync).
* A real point with fewer than ``k`` real neighbours (jets of <= k particles) gets **self-loops** in the slots it
  cannot fill: index ``i`` itself, i.e. edge feature ``(x_i, 0)``. Padded query rows point at themselves too, so
  every index is a valid position of the same jet and the output shape is static.
* Memory is bounded by processing queries in chunks of ``B * chunk * P <= max_elements``.

On CUDA nothing here reads a value back to the host, so it runs asynchronously and traces into one graph under
``torch.compile``; the host synchronisations of the cloud path are :func:`trim_padding` (the batch's longest jet as
a Python int; the loader already trims on the host, so models do not call it by default) and packing
(:func:`pack`, the packed layout's one sync per batch).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

#: float32 +inf reinterpreted as int32: every key at or above ``_INF_BITS * P`` is an excluded candidate.
_INF_BITS = 0x7F800000
#: Default bound on the number of distance entries held at once (int64 keys: 8 bytes each, so 512 MiB).
DEFAULT_MAX_ELEMENTS = 1 << 26


def _matmul_precision_backend(device_type: str):
    return {"cuda": torch.backends.cuda.matmul, "cpu": torch.backends.mkldnn.matmul}.get(device_type)


@contextlib.contextmanager
def full_precision_matmul(device_type: str) -> Iterator[None]:
    """Inside: float32 GEMMs on ``device_type`` in IEEE float32 (no TF32 / bf16 inner products); restored after.

    Uses the ``fp32_precision`` API (``torch.backends.cuda.matmul`` / ``torch.backends.mkldnn.matmul``), which is
    what the GEMM kernels read; the legacy flags are left alone. Under ``torch.compile`` nothing is switched
    (that is Python state, not graph): the compiled kNN avoids GEMMs on CUDA instead (see :func:`knn`).
    """
    backend = _matmul_precision_backend(device_type)
    if backend is None or torch.compiler.is_compiling():
        yield
        return
    previous = backend.fp32_precision
    if previous in ("ieee", "none"):
        yield
        return
    backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        backend.fp32_precision = previous


def _centred_float32(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, P, C) as float32, each jet shifted by the mean of its real points, padded rows zeroed."""
    x = x.float()
    m = mask.unsqueeze(-1).to(x.dtype)
    xm = x * m
    centre = xm.sum(1, keepdim=True) / m.sum(1, keepdim=True).clamp_min(1.0)
    return xm.sub_(centre).mul_(m)


def _key_topk(d: torch.Tensor, kk: int, p: int, arange: torch.Tensor) -> torch.Tensor:
    """The ``kk`` smallest (distance, index) keys of each row of d (..., P): int64 ``bits * P + j``, sorted."""
    # Non-negative float32 bit patterns sort like the floats; rounding can make d slightly negative (sign bit
    # set, negative as int32), so clamp those to +0. Then key = bits * P + j: unique, ties -> lower j.
    bits = d.view(torch.int32).clamp_min(0)
    key = torch.add(arange, bits, alpha=p)  # int64
    return torch.topk(key, kk, dim=-1, largest=False, sorted=True).values


def _float_topk(d: torch.Tensor, kk: int, p: int, arange: torch.Tensor) -> torch.Tensor:
    """Same keys as :func:`_key_topk`, from a float ``topk`` of kk + 1 candidates (host sync for tied rows)."""
    d = d.clamp_min_(0.0)  # as the int keys do: rounding below zero counts as +0
    cand = min(kk + 1, p)
    values, index = torch.topk(d, cand, dim=-1, largest=False, sorted=True)
    keys = torch.add(index, values.view(torch.int32), alpha=p).sort(dim=-1).values[..., :kk]
    if cand == kk:  # every candidate is taken: the set is exact, the sort fixed the order
        return keys
    last, nxt = values[..., kk - 1], values[..., kk]
    tied = (last == nxt) & (last < float("inf"))  # the k-th place is shared: which index wins needs all keys
    if bool(tied.any()):
        rows = tied.reshape(-1).nonzero().squeeze(1)
        flat = keys.view(-1, kk)
        flat[rows] = _key_topk(d.reshape(-1, p)[rows], kk, p, arange)
    return keys


def knn(x: torch.Tensor, k: int, mask: torch.Tensor | None = None, *,
        max_elements: int = DEFAULT_MAX_ELEMENTS, method: str = "auto", distance: str = "auto") -> torch.Tensor:
    """Indices (B, P, k) int64 of each point's ``k`` nearest real neighbours in the same jet, nearest first.

    Args:
        x: (B, P, C) coordinates; any float dtype (converted to float32 for the distances).
        k: neighbours per point (self excluded).
        mask: (B, P) bool, True for real points; None means all points are real.
        max_elements: bound on ``B * chunk * P`` distance entries computed at once.
        method: "keys" (int64 keys, no host sync), "float" (float topk re-ordered by the keys, a host sync when the
            k-th place is tied) or "auto": "float" on the CPU in eager mode, "keys" otherwise. Same result.
        distance: "gemm" (``|a|^2 + |b|^2 - 2 a.b``, one batched GEMM), "direct" (``sum (a - b)^2`` as a
            broadcast-reduce: no GEMM, so TF32 cannot touch it; fused by torch.compile, memory-hungry in eager) or
            "auto": "direct" when compiling for CUDA, "gemm" otherwise.

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
    compiling = torch.compiler.is_compiling()
    if method not in ("auto", "keys", "float"):
        raise ValueError(f"method must be 'auto', 'keys' or 'float', got {method!r}")
    if method == "auto":  # CPU eager: float topk + exact re-ordering (measured faster); else keys, no sync
        method = "float" if x.device.type == "cpu" and not compiling else "keys"
    select = _float_topk if method == "float" else _key_topk
    if distance not in ("auto", "gemm", "direct"):
        raise ValueError(f"distance must be 'auto', 'gemm' or 'direct', got {distance!r}")
    # Compiled on CUDA: a fused broadcast-reduce (the TF32 switch is Python state, which a graph does not replay).
    direct = distance == "direct" or (distance == "auto" and compiling and x.device.type == "cuda")
    arange = torch.arange(p, device=x.device)
    with torch.autocast(device_type=x.device.type, enabled=False), full_precision_matmul(x.device.type):
        xc = _centred_float32(x, mask)
        sq = (xc * xc).sum(-1)  # (B, P)
        # +inf on padded columns rides along in the additive term: no separate masking pass.
        col = sq.masked_fill(~mask, float("inf")).unsqueeze(1)

        def rows(q0: int, q1: int | None) -> torch.Tensor:
            """Neighbours of queries q0:q1 (q1 None: all, without slicing by P)."""
            xq, sqq, mq = (xc, sq, mask) if q1 is None else (xc[:, q0:q1], sq[:, q0:q1], mask[:, q0:q1])
            if direct:
                diff = xq[:, :, None, :] - xc[:, None, :, :]
                d = (diff * diff).sum(-1).masked_fill(~mask[:, None, :], float("inf"))
            else:  # (B, q, P) = |x_i|^2 + |x_j|^2 (+inf if j is padding) - 2 x_i.x_j
                d = torch.baddbmm(sqq.unsqueeze(-1) + col, xq, xc.transpose(1, 2), alpha=-2.0)
            d.diagonal(offset=q0, dim1=1, dim2=2).fill_(float("inf"))  # exclude self
            best = select(d, kk, p, arange)
            ok = (best < _INF_BITS * p) & mq.unsqueeze(-1)
            self_idx = (arange if q1 is None else arange[q0:q1]).view(1, -1, 1)
            return torch.where(ok, best % p, self_idx)

        if b * p * p <= max_elements:
            # One pass and no Python loop over P: under torch.compile with dynamic shapes the graph stays
            # generic in B and P (a loop ``range(0, P, chunk)`` would fix P into every graph: one per length).
            idx = rows(0, None)
        else:  # queries in chunks of B * chunk * P <= max_elements (shapes only, no data-dependent control)
            chunk = max(1, max_elements // max(1, b * p))
            idx = torch.cat([rows(q0, min(p, q0 + chunk)) for q0 in range(0, p, chunk)], dim=1)
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


@dataclass(frozen=True)
class Packing:
    """Where the real particles of a padded (B, P) batch go when packed into (N, ...) rows (:func:`pack`).

    Packed order is the mask's row-major order of True entries (``features[mask]``), so each jet's particles are
    consecutive and keep their order. ``groups`` are the jets sorted by length and cut into a few groups, each
    with its own padded width (host ints), for :func:`knn_packed`.
    """

    rows: torch.Tensor  #: (N,) flat dense position ``b * P + i`` of each packed row
    batch: torch.Tensor  #: (N,) jet of each packed row
    counts: torch.Tensor  #: (B,) real particles per jet
    starts: torch.Tensor  #: (B,) first packed row of each jet
    position: torch.Tensor  #: (B * P,) packed row of each flat dense position (meaningless on padding)
    shape: tuple[int, int]  #: (B, P)
    groups: tuple[tuple[torch.Tensor, int], ...]  #: (jets (G,), width) per kNN group; empty jets left out

    @property
    def n(self) -> int:
        return int(self.rows.numel())


def pack(mask: torch.Tensor, knn_groups: int = 4) -> Packing:
    """The :class:`Packing` of ``mask`` (B, P). Reads the jet lengths on the host: one device-to-host copy (a sync
    on a GPU), and no host-to-device copy."""
    b, p = mask.shape
    mask = mask.bool()
    flat = mask.reshape(-1)
    counts = mask.sum(1)
    lengths = counts.cpu()  # the sync; everything below that needs numbers reads them from here
    rows = torch.nonzero_static(flat, size=int(lengths.sum())).squeeze(1)
    starts = torch.cumsum(counts, 0) - counts
    # A stable sort's permutation is unique, so the device's order and the host's sorted lengths agree.
    order = torch.argsort(counts, stable=True)
    sorted_lengths = torch.sort(lengths, stable=True).values.tolist()
    first = sum(1 for n in sorted_lengths if n == 0)  # empty jets: no rows, no kNN
    jets = b - first
    cuts = [first + round(i * jets / max(1, min(knn_groups, jets))) for i in range(max(1, min(knn_groups, jets)) + 1)]
    groups = tuple((order[lo:hi], int(sorted_lengths[hi - 1])) for lo, hi in itertools.pairwise(cuts) if hi > lo)
    position = torch.cumsum(flat, 0) - 1
    return Packing(rows=rows, batch=rows // p, counts=counts, starts=starts, position=position, shape=(b, p),
                   groups=groups)


def knn_packed(x: torch.Tensor, k: int, packing: Packing, *,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """:func:`knn` on packed points: x (N, C) -> (N, k) int64 packed rows of each point's neighbours.

    Jets are taken in the groups of ``packing`` (sorted by length, each group padded only to its own longest
    jet), so the distance matrices cover far fewer padded slots than the batch's (B, P, P). Same neighbours as
    :func:`knn` on the padded batch, up to float32 rounding of each jet's centre.
    """
    out = torch.empty(x.shape[0], k, dtype=torch.int64, device=x.device)
    for jets, width in packing.groups:
        local = torch.arange(width, device=x.device)
        counts, starts = packing.counts[jets], packing.starts[jets]
        gmask = local < counts[:, None]
        src = starts[:, None] + torch.minimum(local, counts[:, None] - 1)  # padded slots repeat a real row
        idx = knn(x[src], k, gmask, max_elements=max_elements)
        real = src[gmask]
        out.index_copy_(0, real, (idx + starts[:, None, None])[gmask])
    return out


def packed_neighbours(idx: torch.Tensor, packing: Packing) -> torch.Tensor:
    """Padded kNN indices (B, P, k) -> (N, k) packed rows of the real points' neighbours."""
    b, p, k = idx.shape
    offsets = torch.arange(0, b * p, p, device=idx.device).view(b, 1, 1)
    dense = (idx + offsets).reshape(b * p, k).index_select(0, packing.rows)  # flat dense positions
    return packing.position[dense]


def packed_edge_index(neighbours: torch.Tensor) -> torch.Tensor:
    """PyG ``edge_index`` (2, N k) from packed neighbours (N, k): edges neighbour -> query (``source_to_target``)."""
    n, k = neighbours.shape
    dst = torch.arange(n, device=neighbours.device).repeat_interleave(k)
    return torch.stack([neighbours.reshape(-1), dst])
