"""The one training step shared by the plain loop, the Ray Train loop and ``qgdist bench step``.

Signature (stable contract for the training loop)::

    loss = train_step(model, inputs, label, optimizer, *,
                      autocast_dtype=None, grad_clip=None, scaler=None)

* ``model(**inputs)`` returns logits (B,) (docs/ARCHITECTURE.md, batch contract); ``label`` is float (B,) is_quark.
* ``autocast_dtype``: ``None`` (full precision), ``torch.bfloat16`` or ``torch.float16`` (or the strings
  ``"fp32" | "bf16" | "fp16"``). The forward pass runs under ``torch.autocast`` on the label's device type; the loss
  is computed in float32.
* ``grad_clip``: max global gradient norm (``clip_grad_norm_``), or ``None``.
* ``scaler``: a ``torch.amp.GradScaler`` for float16 training; gradients are unscaled before clipping.

The step zeroes gradients, runs forward + ``BCEWithLogits`` + backward (+ clip) + ``optimizer.step()`` and returns
the detached loss tensor on the device. It never calls ``.item()``: reading the loss is the caller's choice, because
on a GPU that read is a host synchronisation. Learning-rate schedulers are stepped by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

_DTYPES: dict[str, torch.dtype | None] = {
    "fp32": None, "float32": None, "none": None,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Map ``"fp32" | "bf16" | "fp16"`` (or a torch dtype, or None) onto the autocast dtype (None = no autocast)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype == torch.float32 else dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown precision {dtype!r}; choose from fp32, bf16, fp16") from None


def forward_logits(model: torch.nn.Module, inputs: Mapping[str, torch.Tensor],
                   autocast_dtype: str | torch.dtype | None = None) -> torch.Tensor:
    """``model(**inputs)`` under autocast (if asked), returned as float32 logits (B,)."""
    dtype = resolve_dtype(autocast_dtype)
    device_type = next(iter(inputs.values())).device.type
    with torch.autocast(device_type=device_type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(**inputs)
    return logits.float()


def train_step(
    model: torch.nn.Module,
    inputs: Mapping[str, torch.Tensor],
    label: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    *,
    autocast_dtype: str | torch.dtype | None = None,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> torch.Tensor:
    """One optimisation step on one batch; returns the detached mean BCE loss (a 0-d tensor on the device).

    The model must already be in train mode and on the batch's device. Works unchanged on CPU and CUDA, under
    DDP (gradients are all-reduced in ``backward``) and on a ``torch.compile``-d model.
    """
    optimizer.zero_grad(set_to_none=True)
    logits = forward_logits(model, inputs, autocast_dtype)
    loss = F.binary_cross_entropy_with_logits(logits, label.float())
    if scaler is not None:
        scaler.scale(loss).backward()
        if grad_clip is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return loss.detach()
