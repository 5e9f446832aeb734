"""weaver-core's Particle Transformer as the reference for ours (``pip install 'qgdist[reference]'``).

``build_weaver_part`` builds ``weaver.nn.model.ParticleTransformer`` (imported from the installed weaver-core, never
copied here) with the configuration of our ``ParTConfig``: one output, ``trim=False`` (our batches are trimmed
already; weaver's training-time trimmer would also drop random particles), the quark/gluon config's class-block
dropout 0 and ``use_pre_activation_pair`` from ours. ``weaver_part_state_dict_to_ours`` maps its weights onto ours
(1x1 Conv1d -> Linear; every key mapped or an error), ``check_part_against_weaver`` compares eval-mode float32
logits on every jet, and ``build_weaver_part_runner`` gives ``qgdist bench step`` the weaver model training on
channel-first copies of the same batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

#: Tolerance of the eval-mode agreement (float32 logits): the issue's 1e-5.
PART_RTOL, PART_ATOL = 1e-5, 1e-5


def build_weaver_part(config: Any) -> Any:
    """weaver-core's ``ParticleTransformer`` with the hyper-parameters of our ``ParTConfig`` ``config``."""
    try:
        from weaver.nn.model.ParticleTransformer import ParticleTransformer as WeaverParT
    except ImportError as err:
        raise RuntimeError("--reference weaver-core needs the weaver-core package: "
                           "pip install 'qgdist[reference]' (weaver-core==0.5.3)") from err
    import logging

    logging.getLogger("weaver").setLevel(logging.WARNING)  # its constructor logs its arguments at INFO
    c = config
    return WeaverParT(
        input_dim=c.in_features, num_classes=1, pair_input_dim=4, use_pre_activation_pair=c.pre_activation_pair,
        embed_dims=list(c.embed_dims), pair_embed_dims=list(c.pair_embed_dims), num_heads=c.num_heads,
        num_layers=c.num_layers, num_cls_layers=c.num_cls_layers,
        block_params={"ffn_ratio": c.ffn_ratio, "dropout": c.dropout, "attn_dropout": c.attn_dropout,
                      "activation_dropout": c.activation_dropout},
        cls_block_params={"ffn_ratio": c.ffn_ratio, "dropout": 0, "attn_dropout": 0, "activation_dropout": 0},
        fc_params=[], activation="gelu", trim=False, for_inference=False)


def weaver_part_state_dict_to_ours(state: dict[str, Any]) -> dict[str, Any]:
    """Rename (and reshape) a weaver ``ParticleTransformer`` state dict into ours."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        parts = key.split(".")
        if key == "cls_token":
            new, value = key, value.reshape(1, -1)
        elif parts[:2] == ["embed", "input_bn"]:
            new = "input_norm." + parts[2]
        elif parts[:2] == ["embed", "embed"]:
            new = "embed." + ".".join(parts[2:])
        elif parts[:2] == ["pair_embed", "embed"]:
            i = int(parts[2])    # 0: input BatchNorm; then (Conv1d, BatchNorm, GELU) per width
            if i == 0:
                new = "pair_embed.input_norm." + parts[3]
            elif i % 3 == 1:
                new, value = f"pair_embed.linears.{i // 3}.{parts[3]}", value.flatten(1) if value.dim() == 3 else value
            elif i % 3 == 2:
                new = f"pair_embed.norms.{i // 3}.{parts[3]}"
            else:
                raise KeyError(f"unexpected weaver ParticleTransformer parameter {key!r}")
        elif parts[0] in ("blocks", "cls_blocks", "norm"):
            new = key
        elif parts[0] == "fc" and parts[1] == "0":
            new = "head." + parts[2]
        else:
            raise KeyError(f"unexpected weaver ParticleTransformer parameter {key!r}")
        out[new] = value
    return out


def randomise(model: Any, seed: int = 0) -> None:
    """Move every parameter off its initial value and give every batch norm random running statistics, so an
    eval-mode comparison exercises all of them (layer-norm scales, per-head scales, residual weights, biases)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(0.3 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)


def channel_first(inputs: dict[str, Any]) -> dict[str, Any]:
    """Our batch in weaver's layout: ``x`` (B, C, P), ``v`` (B, 4, P), ``mask`` (B, 1, P) float."""
    return {"x": inputs["features"].transpose(1, 2).contiguous(), "v": inputs["vectors"].transpose(1, 2).contiguous(),
            "mask": inputs["mask"].unsqueeze(1).to(inputs["features"].dtype)}


def weaver_part_logits(weaver: Any, inputs: dict[str, Any]) -> Any:
    return weaver(**channel_first(inputs)).squeeze(-1).float()


@contextlib.contextmanager
def ieee_float32(device_type: str) -> Iterator[None]:
    """IEEE float32 GEMMs and cuDNN convolutions inside (no TF32, no bf16 inner products)."""
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


def check_part_against_weaver(ours: Any, weaver: Any, inputs: dict[str, Any], *, rtol: float = PART_RTOL,
                              atol: float = PART_ATOL) -> dict[str, Any]:
    """Eval-mode float32 logits of ``ours`` and ``weaver`` (same weights) on every jet of ``inputs``; raises when
    they differ. Returns ``{"max_abs_diff", "compared", "jets"}``."""
    import torch

    was = ours.training, weaver.training
    ours.eval(), weaver.eval()
    device = inputs["features"].device
    try:
        with torch.no_grad(), ieee_float32(device.type):
            got, want = ours(**inputs).float(), weaver_part_logits(weaver, inputs)
    finally:
        ours.train(was[0]), weaver.train(was[1])
    diff = float((got - want).abs().max())
    if not torch.allclose(got, want, rtol=rtol, atol=atol):
        raise RuntimeError(f"reference check FAILED: eval-mode logits of our and weaver-core's ParticleTransformer "
                           f"differ by up to {diff:.3g} (rtol={rtol}, atol={atol}) on {got.numel()} jets")
    return {"max_abs_diff": diff, "compared": got.numel(), "jets": got.numel()}


def weaver_part_adapter(ours: Any, batches: list, device: Any, seed: int) -> tuple[Any, dict]:
    """weaver's ParT for our model ``ours``: its (randomised) weights copied into ours, the eval logits checked on
    ``batches[0]``; returns (a module taking our batch's channel-first copies -> logits, the check)."""
    import torch

    torch.manual_seed(seed)
    weaver = build_weaver_part(ours.config)
    randomise(weaver, seed)
    weaver = weaver.to(device).train()
    ours.load_state_dict(weaver_part_state_dict_to_ours(weaver.state_dict()))   # strict: all or error
    check = check_part_against_weaver(ours, weaver, batches[0][0])

    class Adapter(torch.nn.Module):
        """weaver's ParticleTransformer on channel-first inputs -> logits (B,)."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.net(x, v, mask).squeeze(-1).float()

    return Adapter(weaver), check


def build_weaver_part_runner(ours: Any, cfg: Any, device: Any, batch_size: int) -> Any:
    """``qgdist bench step``'s weaver-core row for our ParT runner ``ours`` (a ``qgdist.bench.step.Runner``)."""
    from qgdist.bench.step import Runner, _batches, _stepper
    from qgdist.bench.weaver_reference import weaver_version
    from qgdist.models import count_parameters

    batches = _batches("cloud", cfg, batch_size, device, vectors=True)
    adapter, check = weaver_part_adapter(ours.model, batches, device, cfg.seed)
    weaver_batches = [(channel_first(inputs), label) for inputs, label in batches]
    note = f"eval logits agree on {check['compared']}/{check['jets']} jets, max |diff| {check['max_abs_diff']:.1e}"
    return Runner(ours.name, f"weaver-core {weaver_version()}", adapter, count_parameters(adapter),
                  ours.shape, _stepper(adapter, weaver_batches, cfg, device), note=note)
