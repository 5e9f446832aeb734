"""``qgdist bench knn``: batched kNN time, ours against the usual alternatives, side by side in one run.

Rows, for each coordinate width D and k (first ParticleNet block: D = 2; later blocks: D = block width):

* ``ours``: :func:`qgdist.models.knn.knn` as the device runs it (float32 distances, +inf masking; on the CPU a
  float ``topk`` re-ordered by (distance, index) keys, on CUDA int64 keys).
* ``ours int64 keys`` / ``ours float topk``: the other selection forced (same neighbours; the faster is the
  device's default).
* ``ours chunked``: the same with queries in 8 chunks (the memory bound for large P).
* ``packed groups``: :func:`qgdist.models.knn.knn_packed`, the packed layout's kNN: jets sorted by length in 4
  groups, each padded only to its own longest jet (the packing itself, once per batch, is not timed).
* ``cdist+topk``: ``torch.cdist``, padded and self set to +inf, float ``topk`` (no tie rule, no float32 guard).
* ``shift trick``: weaver-core's reference: ``-2 x.x + |x|^2`` with padded points shifted by a constant (1e9 in
  float32, 99 under reduced precision, as in weaver), ``topk(k + 1)`` minus the first column, all in ``--dtype``.
* ``+ edge_index``: ours followed by the conversion to a PyG ``edge_index`` (the PyG path's extra cost).

``agree`` is the fraction of real points whose neighbour set equals ours. Needs neither Ray nor data files.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from qgdist.bench import comma_ints
from qgdist.core.config import option


@dataclass(frozen=True)
class KnnBenchConfig:
    """``qgdist bench knn`` settings."""

    device: str = option("cpu", "cpu | cuda | cuda:N | auto (CUDA when visible)")
    dtype: Literal["fp32", "bf16", "fp16"] = option("fp32", "autocast precision")
    batch_size: int | None = option(None, "jets per batch (default 1024 on CUDA, 256 on CPU)", min=1)
    max_particles: int = option(128, "particles per jet at most (the batch is padded to its longest jet)", min=1)
    dims: tuple[int, ...] = option((2, 32, 128), "coordinate widths, comma-separated (e.g. 2,32,128)",
                                   parse=comma_ints, metavar="D,D,...", min=1)
    ks: tuple[int, ...] = option((7, 16), "neighbour counts, comma-separated (e.g. 7,16)", flag="--k",
                                 parse=comma_ints, metavar="K,K,...", min=1)
    repeats: int = option(5, "timed calls per method (after one untimed call); the median is quoted", min=1)

    def __post_init__(self) -> None:
        for name in ("dims", "ks"):  # "2,32" (or one int) from a --config file; flags are split by their parser
            value = getattr(self, name)
            if isinstance(value, (str, int)):
                object.__setattr__(self, name, comma_ints(str(value)))
        if not self.dims or not self.ks:
            raise ValueError("--dims and --k: give at least one value each")


def _time(fn: Callable[[], object], repeats: int, device: Any) -> tuple[float, object]:
    import torch

    out = fn()  # warm-up (and the result to compare)
    times = []
    for _ in range(max(1, repeats)):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def run(cfg: KnnBenchConfig) -> int:
    """Print the kNN table described in the module docstring."""
    import torch

    from qgdist.core.device import resolve_device
    from qgdist.models.knn import edge_index_from_knn, knn, knn_packed, pack
    from qgdist.models.synthetic import cloud_batch
    from qgdist.train.step import resolve_dtype

    device = resolve_device(cfg.device)
    batch_size = cfg.batch_size or (1024 if device.type == "cuda" else 256)
    dtype = resolve_dtype(cfg.dtype)
    inputs, _ = cloud_batch(batch_size, max(cfg.dims), cfg.max_particles, device=device)
    mask = inputs["mask"]
    b, p = mask.shape
    print(f"kNN on {device}, batch {b} x P {p} (mean {mask.sum(1).float().mean():.1f} real), dtype {cfg.dtype}, "
          f"{cfg.repeats} repeats; median time per call")
    print(f"{'D':>4}{'k':>4}  {'method':<16}{'ms':>9}{'jets/s':>12}{'vs ours':>9}{'agree':>8}")

    def sets(idx: torch.Tensor) -> torch.Tensor:
        return idx.sort(-1).values

    packing = pack(mask)

    def _packed_row(timed: tuple[float, torch.Tensor]) -> tuple[float, torch.Tensor]:
        """(seconds, packed neighbour rows (N, k)) -> (seconds, (B, P, k) positions in the jet) for ``agree``."""
        seconds, rows_idx = timed
        out = torch.arange(p, device=device).view(1, p, 1).repeat(b, 1, rows_idx.shape[1])
        flat_pos = packing.rows[rows_idx]  # flat dense positions of the neighbours
        out.view(b * p, -1)[packing.rows] = flat_pos - (packing.rows // p * p).unsqueeze(1)
        return seconds, out

    for d in cfg.dims:
        x = inputs["features"][..., :d] if d > 2 else inputs["points"]
        x = x * (1.0 + torch.arange(d, device=device) / d)  # anisotropic: avoid exact ties
        x_packed = x.reshape(b * p, d)[packing.rows]
        for k in cfg.ks:
            def autocast():
                return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

            def ours(chunks: int = 1, method: str = "auto"):
                with autocast():
                    return knn(x, k, mask, max_elements=b * p * max(1, p // chunks), method=method)

            def packed():
                with autocast():
                    return knn_packed(x_packed, k, packing)

            def cdist_topk():
                with autocast():
                    dist = torch.cdist(x, x)
                    eye = torch.eye(p, dtype=torch.bool, device=device)
                    dist = dist.masked_fill(~mask[:, None, :] | eye, float("inf"))
                    return torch.topk(dist, k, dim=-1, largest=False).indices

            def shift_trick():
                xs = x.to(dtype or torch.float32)
                shift = 1e9 if dtype is None else 99.0
                xs = xs + shift * (~mask).unsqueeze(-1).to(xs.dtype)
                inner = -2 * torch.bmm(xs, xs.transpose(1, 2))
                sq = (xs * xs).sum(-1, keepdim=True)
                dist = -(sq + inner + sq.transpose(1, 2))
                return torch.topk(dist, k + 1, dim=-1).indices[..., 1:]

            def with_edge_index():
                return edge_index_from_knn(ours(), mask)

            t_ours, ref = _time(ours, cfg.repeats, device)
            ref_sets = sets(ref)[mask]
            other = "float" if device.type != "cpu" else "keys"
            rows = [("ours", t_ours, ref),
                    (f"ours {'int64 keys' if other == 'keys' else 'float topk'}",
                     *_time(lambda: ours(method=other), cfg.repeats, device)),
                    ("ours chunked", *_time(lambda: ours(8), cfg.repeats, device)),
                    ("packed groups", *_packed_row(_time(packed, cfg.repeats, device))),
                    ("cdist+topk", *_time(cdist_topk, cfg.repeats, device)),
                    ("shift trick", *_time(shift_trick, cfg.repeats, device)),
                    ("+ edge_index", *_time(with_edge_index, cfg.repeats, device))]
            for name, seconds, idx in rows:
                agree = "" if name == "+ edge_index" else f"{(sets(idx)[mask] == ref_sets).all(-1).float().mean():.3f}"
                print(f"{d:>4}{k:>4}  {name:<16}{1e3 * seconds:>9.2f}{b / seconds:>12.0f}"
                      f"{t_ours / seconds:>8.2f}x{agree:>8}")
    return 0
