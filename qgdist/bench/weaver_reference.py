"""The weaver-core reference: its ``ParticleNet`` built like ours, weights mapped both ways, outputs compared.

weaver-core (``pip install 'qgdist[reference]'``) is what ParticleNet users train with today. It is imported from
the installed package, never copied here. ``qgdist bench step --reference weaver-core`` times it against ours and
tests/models/test_reference.py checks that both compute the same function: weaver's ParticleNet with
``use_fusion=False``, ``use_counts`` (mean pooling over real particles) and ``trim=False`` is the paper's network;
its Conv 1x1 weights become our Linear layers and its 2-way head one logit (w1 - w0).

Jets of <= k particles are left out of the comparison on purpose: weaver pairs them with padded slots (edge
feature ``(x_i, -x_i)``), ours with self-loops (``(x_i, 0)``), a documented difference.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: Tolerance of the eval-mode agreement with the reference (float32 logits).
REFERENCE_RTOL, REFERENCE_ATOL = 1e-4, 1e-5


def weaver_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("weaver-core")
    except PackageNotFoundError:
        return "?"


def build_weaver(config: Any, use_amp: bool = False) -> Any:
    """weaver-core's ``ParticleNet`` with the configuration of our ``ParticleNetConfig`` ``config`` (1 logit).

    ``use_amp``: weaver's float16 setting (padding shifted by 99 instead of 1e9, which float16 cannot hold)."""
    try:
        from weaver.nn.model.ParticleNet import ParticleNet as WeaverParticleNet
    except ImportError as err:
        raise RuntimeError("--reference weaver-core needs the weaver-core package: "
                           "pip install 'qgdist[reference]' (weaver-core==0.5.3)") from err
    import logging

    logging.getLogger("weaver").setLevel(logging.WARNING)  # its constructor logs its arguments at INFO
    model = WeaverParticleNet(
        input_dims=config.in_features, num_classes=1,
        conv_params=[(k, tuple(ch)) for k, ch in config.conv_params],
        fc_params=[tuple(fc) for fc in config.fc_params],
        use_fusion=False, use_fts_bn=True, use_counts=config.pooling == "real", trim=False, use_amp=use_amp)
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eps, m.momentum = config.bn_eps, config.bn_momentum
    return model


def weaver_state_dict_to_ours(state: dict[str, Any], config: Any) -> dict[str, Any]:
    """Rename (and reshape) a weaver ``ParticleNet`` state dict into ours; every weaver key is mapped or an error."""
    out: dict[str, Any] = {}
    n_fc = len(config.fc_params)
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "bn_fts":
            new = "input_norm." + parts[1]
        elif parts[0] == "edge_convs":
            i, what = parts[1], parts[2]
            if what == "convs":  # Conv2d 1x1 (out, in, 1, 1) -> Linear (out, in)
                new, value = f"blocks.{i}.edge_mlp.linears.{parts[3]}.weight", value.flatten(1)
            elif what == "bns":
                new = f"blocks.{i}.edge_mlp.norms.{parts[3]}.{parts[4]}"
            elif what == "sc":  # Conv1d (out, in, 1) -> Linear (out, in)
                new, value = f"blocks.{i}.shortcut.weight", value.flatten(1)
            elif what == "sc_bn":
                new = f"blocks.{i}.shortcut_norm.{parts[3]}"
            else:
                raise KeyError(f"unexpected weaver ParticleNet parameter {key!r}")
        elif parts[0] == "fc":  # fc.i = Sequential(Linear, ReLU, Dropout) for i < n_fc, then fc.n_fc = Linear
            i = int(parts[1])
            new = f"head.{3 * i}.{parts[-1]}"
            if i > n_fc or (i < n_fc and parts[2] != "0"):
                raise KeyError(f"unexpected weaver ParticleNet parameter {key!r}")
        else:
            raise KeyError(f"unexpected weaver ParticleNet parameter {key!r}")
        out[new] = value
    return out


def randomise_batch_norms(model: Any, seed: int = 0) -> None:
    """Random affine parameters and running statistics in every batch norm (so eval mode exercises them)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(0.1 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.1 * torch.randn(c, generator=g))
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)


def channel_first(inputs: dict[str, Any]) -> dict[str, Any]:
    """Our batch ``{points (B,P,2), features (B,P,C), mask (B,P)}`` in weaver's layout (B,2,P), (B,C,P), (B,1,P)."""
    return {"points": inputs["points"].transpose(1, 2).contiguous(),
            "features": inputs["features"].transpose(1, 2).contiguous(),
            "mask": inputs["mask"].unsqueeze(1).to(inputs["features"].dtype)}


def weaver_logits(weaver: Any, inputs: dict[str, Any]) -> Any:
    """weaver's ParticleNet on our batch (channel-first copies made here) -> logits (B,) float32."""
    return weaver(**channel_first(inputs)).squeeze(-1).float()


def check_against_weaver(ours: Any, weaver: Any, inputs: dict[str, Any], *, rtol: float = REFERENCE_RTOL,
                         atol: float = REFERENCE_ATOL) -> dict[str, Any]:
    """Eval-mode float32 logits of ``ours`` and ``weaver`` (same weights) on ``inputs``; raises when they differ.

    Compared on the jets with more than k particles (k = the largest of the model's blocks); see the module
    docstring for why shorter jets differ. Returns ``{"max_abs_diff", "compared", "jets"}``.
    """
    import torch

    k = max(block.k for block in ours.blocks)
    was = ours.training, weaver.training
    ours.eval(), weaver.eval()
    device = inputs["features"].device
    try:
        with torch.no_grad(), _ieee_float32(device.type):
            got, want = ours(**inputs).float(), weaver_logits(weaver, inputs)
    finally:
        ours.train(was[0]), weaver.train(was[1])
    keep = inputs["mask"].sum(1) > k
    if not bool(keep.any()):
        raise RuntimeError(f"reference check: no jet has more than k={k} particles to compare on")
    diff = float((got - want)[keep].abs().max())
    if not torch.allclose(got[keep], want[keep], rtol=rtol, atol=atol):
        raise RuntimeError(f"reference check FAILED: eval-mode logits of ours and weaver-core differ by up to "
                           f"{diff:.3g} (rtol={rtol}, atol={atol}) on {int(keep.sum())} jets with more than k={k} "
                           "particles")
    return {"max_abs_diff": diff, "compared": int(keep.sum()), "jets": int(keep.numel())}


@contextlib.contextmanager
def _ieee_float32(device_type: str) -> Iterator[None]:
    """Float32 GEMMs and (on CUDA) cuDNN convolutions in IEEE float32 inside: weaver's 1x1 convolutions run in
    TF32 by default on Ampere and later GPUs, which the float32 check would see as a mismatch."""
    import torch

    from qgdist.models.knn import full_precision_matmul

    conv = torch.backends.cudnn.conv if device_type == "cuda" else None
    previous = conv.fp32_precision if conv is not None else None
    if conv is not None:
        conv.fp32_precision = "ieee"
    try:
        with full_precision_matmul(device_type):
            yield
    finally:
        if conv is not None:
            conv.fp32_precision = previous
