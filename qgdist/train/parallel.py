"""Data parallelism: the DDP wrapper, gathering per-rank state, and the BatchNorm statistics DDP leaves to us.

DDP keeps the parameters identical on every rank (gradients are averaged in backward). Buffers -- BatchNorm's
running mean and variance -- are not gradients: by default DDP broadcasts rank 0's buffers at the start of every
forward pass, a second collective per step on top of the gradient all-reduce, at which every rank waits for the
slowest. We turn that off (``broadcast_buffers=False``): each rank keeps running statistics of its own batches
(training-mode BatchNorm normalises with the batch's own statistics, so the gradients do not change), and

* before evaluation the ranks' statistics are averaged (``average_buffers``), so every rank evaluates, and rank 0
  saves, one model whose statistics come from all ranks' batches rather than rank 0's alone;
* each checkpoint holds every rank's own statistics (``buffers_state``) and a resume at the same world size gives
  each rank back its own, so a resumed run stays bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from qgdist.core.device import resolve_device
from qgdist.models.compiling import compile_model


def is_distributed() -> bool:
    """Whether a process group is running (Ray Train's workers, ``torchrun``)."""
    return dist.is_available() and dist.is_initialized()


@dataclass(frozen=True)
class Placement:
    """Where this process trains: its rank among ``world`` processes, and its device."""

    rank: int
    world: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1 or is_distributed()

    @classmethod
    def current(cls, device: torch.device | str | None, gpu: bool = False) -> Placement:
        """This process: the process group's rank and size (0 of 1 without one); ``device`` as given (Ray Train's),
        else CUDA when ``gpu``, else "auto"."""
        rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
        return cls(rank, world, resolve_device(device if device is not None else ("cuda" if gpu else "auto")))


def prepare(model: torch.nn.Module, place: Placement, buffers: list[dict[str, torch.Tensor]] | None,
            compile: bool = False) -> tuple[torch.nn.Module, torch.nn.Module]:
    """``model`` ready to train here: in DDP under a process group (which broadcasts rank 0's parameters and
    buffers), given back this rank's own BatchNorm statistics (``buffers``: every rank's, from a checkpoint of the
    same world size), compiled if asked. Returns (the model to step, the bare model to evaluate and save)."""
    raw = model
    if is_distributed():
        model = wrap(model, place.device)
    if buffers and place.rank < len(buffers):
        load_buffers(raw, buffers[place.rank])
    if compile:
        model = compile_model(model)
    return model, raw


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one item without a process group). A collective."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``model`` in DDP: gradients averaged over the ranks, buffers left to each rank (see the module docstring)."""
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)


def _float_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Counters (BatchNorm's num_batches_tracked) advance alike on every rank; only statistics differ.
    return {name: b for name, b in model.named_buffers() if b.is_floating_point()}


@torch.no_grad()
def average_buffers(model: torch.nn.Module) -> None:
    """Replace every floating-point buffer by its mean over the ranks (no-op without a process group). A collective.

    Equal per-rank batch sizes make the mean of the running means the running mean of all batches; the running
    variances' mean leaves out the spread between the ranks' means, which at batch sizes of tens is negligible.
    """
    if not is_distributed():
        return
    buffers = list(_float_buffers(model).values())
    if not buffers:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in buffers:
        b.copy_(flat[offset: offset + b.numel()].view_as(b))
        offset += b.numel()


def buffers_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """This rank's floating-point buffers, on the CPU (for the checkpoint's per-rank list)."""
    return {name: b.detach().cpu().clone() for name, b in _float_buffers(model).items()}


@torch.no_grad()
def load_buffers(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put a rank's saved buffers back (names as ``buffers_state`` wrote them)."""
    own = _float_buffers(model)
    for name, value in state.items():
        own[name].copy_(value)
