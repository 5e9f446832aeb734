"""The Particle Transformer on its own: both layouts are one function (forward and gradients), a jet's logit does
not depend on its padding (in training mode too), and autocast keeps it finite."""

import pytest
import torch

from qgdist.models import extra_inputs, get_model, model_kind
from qgdist.models.synthetic import cloud_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(embed_dims=(16, 32, 16), pair_embed_dims=(8, 8), num_heads=4, num_layers=2, num_cls_layers=1)


def _model(layout: str, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return get_model("particle-transformer", layout=layout, **{**SMALL, **kw})


def _batch(n: int = 20, seed: int = 1, p: int = 50):
    return cloud_batch(n, 7, p, generator=torch.Generator().manual_seed(seed), vectors=True)


def _grads(model, inputs, label):
    model.zero_grad()
    logits = model(**inputs)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, label).backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def test_registry_and_inputs():
    assert model_kind("particle-transformer") == "cloud" and extra_inputs("particle-transformer") == ("vectors",)
    assert extra_inputs("particlenet-lite") == ()
    model = get_model("particle-transformer")
    assert 2.0e6 < sum(p.numel() for p in model.parameters()) < 2.3e6   # the paper's ~2.1M


def test_packed_and_padded_layouts_are_one_function_with_the_same_gradients():
    packed = _model("packed", dropout=0.0, attn_dropout=0.0, activation_dropout=0.0)
    padded = _model("padded", dropout=0.0, attn_dropout=0.0, activation_dropout=0.0)
    padded.load_state_dict(packed.state_dict())
    inputs, label = _batch()
    with torch.no_grad():
        torch.testing.assert_close(packed.eval()(**inputs), padded.eval()(**inputs), rtol=1e-5, atol=1e-5)
    # float64: the same function to rounding, so gradients compare tightly (float32 sums over ~10^4 pairs differ)
    packed.double(), padded.double()
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    for mode in ("train", "eval"):
        getattr(packed, mode)(), getattr(padded, mode)()
        a, ga = _grads(packed, inputs, label.double())
        b, gb = _grads(padded, inputs, label.double())
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
        assert ga.keys() == gb.keys() and len(ga) == len(list(packed.parameters()))
        for k in ga:
            torch.testing.assert_close(ga[k], gb[k], rtol=1e-7, atol=1e-9, msg=k)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_logits_do_not_depend_on_padding_in_training_mode(layout):
    model = _model(layout, dropout=0.0, attn_dropout=0.0, activation_dropout=0.0).train()
    inputs, _ = _batch()
    extra = 9     # more padded slots, holding garbage: statistics and attention must ignore them
    more = {k: torch.cat([v, torch.randn(v.shape[0], extra, *v.shape[2:]) * 5], 1) if v.dtype != torch.bool
            else torch.cat([v, torch.zeros(v.shape[0], extra, dtype=torch.bool)], 1) for k, v in inputs.items()}
    more["vectors"][:, -extra:, 3] = more["vectors"][:, -extra:, :3].norm(dim=-1) + 1.0
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs), model(**more), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_bf16_autocast_stays_finite_and_close(layout):
    model = _model(layout).eval()
    inputs, _ = _batch(seed=3)
    inputs["vectors"][:, :2] *= 1e-3          # soft, collinear pairs: ln m^2 cancels, float32 needed
    with torch.no_grad():
        full = model(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(**inputs)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert float((half - full).abs().max()) < 0.1 * float(full.abs().max()) + 0.05


def test_bad_inputs_are_refused():
    model = _model("packed")
    inputs, _ = _batch()
    with pytest.raises(ValueError, match="vectors are"):
        model(**{**inputs, "vectors": inputs["vectors"][..., :3]})
    with pytest.raises(ValueError, match="in_features=7"):
        model(**{**inputs, "features": inputs["features"][..., :5]})


def test_padded_layout_has_no_host_sync():
    # GPU-ready: no op that reads a device value on the host (nonzero, item) in a training step
    model = _model("padded").train()
    inputs, label = _batch()
    with torch.profiler.profile() as prof:
        _grads(model, inputs, label)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::scaled_dot_product_attention" in ops
    assert not ops & {"aten::nonzero", "aten::item", "aten::_local_scalar_dense", "aten::nonzero_static"}, ops
