"""Where tensors live: one resolution of ``"auto"`` for every command (configs import ``Device``, no torch)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

Device = Literal["auto", "cpu", "cuda"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is the current CUDA device when one is visible, else the CPU; anything else as torch reads it.

    Asking for CUDA on a machine without one is an error here rather than a crash at the first tensor.
    """
    import torch  # noqa: PLC0415 -- configs import this module's Literals without paying for torch

    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA device on this machine")
    return device


def resolve_precision(precision: str, uses_gpu: bool) -> str:
    """``"auto"`` is bf16 autocast on a GPU and fp32 on the CPU; explicit values pass through."""
    if precision == "auto":
        return "bf16" if uses_gpu else "fp32"
    return precision
