"""Models: batch contract, invariances, padded vs packed vs PyG equality, masked batch norm, compile, training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from qgdist.core.errors import ConfigError
from qgdist.models.edgeconv import MaskedBatchNorm
from qgdist.models import count_parameters, get_model, list_models
from qgdist.models.synthetic import cloud_batch, image_batch
from qgdist.train.step import train_step

CLOUD_MODELS = ["particlenet-lite", "particlenet", "particlenet-lite-pyg", "particlenet-pyg"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _small_cloud(b: int = 6, p: int = 20, c: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor([20, 1, 3, 9, 14, 6][:b])
    mask = torch.arange(p)[None, :] < counts[:, None]
    m = mask.unsqueeze(-1).float()
    points = torch.randn(b, p, 2, generator=g) * 0.1 * m
    features = torch.randn(b, p, c, generator=g) * m
    return {"points": points, "features": features, "mask": mask}


def test_registry_lists_required_models_with_kind() -> None:
    names = list_models()
    for name in ["seed-cnn", "resnet15", *CLOUD_MODELS]:
        assert name in names
    assert get_model("resnet15").kind == "image" and get_model("particlenet-lite").kind == "cloud"
    with pytest.raises(ValueError, match="unknown model"):
        get_model("no-such-model")
    with pytest.raises(ConfigError, match="model 'particlenet' has no setting 'no_such_field'") as err:
        get_model("particlenet", no_such_field=1)
    assert err.value.field == "model_kwargs" and err.value.got == ["no_such_field"]


@pytest.mark.parametrize("name,paper", [("particlenet-lite", 26_000), ("particlenet", 366_000)])
@pytest.mark.parametrize("in_features", [7, 13])  # kin and kinpid presets
def test_parameter_counts_match_the_paper(name: str, paper: int, in_features: int) -> None:
    n = count_parameters(get_model(name, in_features=in_features))
    assert abs(n - paper) / paper < 0.10, n
    assert count_parameters(get_model(f"{name}-pyg", in_features=in_features)) == n


#: the dense model in both layouts, and the PyG model (always packed)
LITE_VARIANTS = [("particlenet-lite", "padded"), ("particlenet-lite", "packed"), ("particlenet-lite-pyg", "auto")]


@pytest.mark.parametrize("name,layout", LITE_VARIANTS)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_invariant_to_particle_permutation_and_extra_padding(name: str, layout: str, mode: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, fc_params=((16, 0.0),), layout=layout)  # no dropout: train mode deterministic too
    getattr(model, mode)()
    batch = _small_cloud()
    with torch.no_grad():
        ref = model(**batch)
        perm = torch.randperm(batch["mask"].shape[1])  # shuffles real and padded slots together
        permuted = {k: v[:, perm] for k, v in batch.items()}
        out_perm = model(**permuted)
        b, p = batch["mask"].shape
        extra = {
            "points": torch.cat([batch["points"], torch.randn(b, 9, 2)], 1),  # garbage in the padding
            "features": torch.cat([batch["features"], torch.randn(b, 9, 7)], 1),
            "mask": torch.cat([batch["mask"], torch.zeros(b, 9, dtype=torch.bool)], 1),
        }
        out_pad = model(**extra)
    assert ref.shape == (b,) and ref.dtype == torch.float32
    torch.testing.assert_close(out_perm, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out_pad, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("size", ["lite", "full"])
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_dense_and_pyg_paths_agree_for_the_same_weights(size: str, mode: str, layout: str) -> None:
    base = "particlenet-lite" if size == "lite" else "particlenet"
    torch.manual_seed(1)
    dense = get_model(base, layout=layout)
    pyg = get_model(f"{base}-pyg")
    pyg.load_state_dict(dense.state_dict())  # same parameter and buffer names
    batch = _small_cloud(seed=2)
    getattr(dense, mode)(), getattr(pyg, mode)()
    torch.manual_seed(3)
    out_dense = dense(**batch)
    out_dense.sum().backward()
    torch.manual_seed(3)
    out_pyg = pyg(**batch)
    out_pyg.sum().backward()
    torch.testing.assert_close(out_pyg, out_dense, rtol=1e-4, atol=1e-5)
    grads_pyg = dict(pyg.named_parameters())
    for name, p in dense.named_parameters():
        torch.testing.assert_close(grads_pyg[name].grad, p.grad, rtol=1e-3, atol=1e-5, msg=name)
    for name, buf in dense.named_buffers():  # running statistics from real particles only, in both paths
        torch.testing.assert_close(dict(pyg.named_buffers())[name], buf, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", ["seed-cnn", "resnet15", *CLOUD_MODELS, "seed-particlenet-lite"])
def test_gradients_reach_every_parameter(name: str) -> None:
    torch.manual_seed(0)
    if name in ("seed-cnn", "resnet15"):
        model = get_model(name, **({"image_size": 32} if name == "seed-cnn" else {}))
        inputs, label = image_batch(4, 32)
    else:
        model = get_model(name)
        inputs, label = _small_cloud(), torch.tensor([1.0, 0, 1, 0, 1, 0])
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(**inputs), label)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not missing


@pytest.mark.parametrize("name,size", [("seed-cnn", 125), ("seed-cnn", 48), ("resnet15", 125), ("resnet15", 37)])
def test_cnns_accept_any_image_size_and_bf16(name: str, size: int) -> None:
    model = get_model(name).eval()
    inputs, _ = image_batch(3, size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert out.shape == (3,) and out.dtype == torch.float32 and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("name,layout", LITE_VARIANTS)
def test_cloud_models_under_bf16_autocast_match_fp32(name: str, layout: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, layout=layout).eval()
    batch = _small_cloud()
    with torch.no_grad():
        ref = model(**batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.05)  # bf16 has ~3 significant digits


@pytest.mark.parametrize("name", ["particlenet-lite", "seed-particlenet-lite"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_padded_and_packed_layouts_are_the_same_function(name: str, mode: str) -> None:
    # Real particles not left-aligned, an empty jet and a one-particle jet: packing must keep every convention.
    batch = _small_cloud(seed=4)
    perm = torch.randperm(batch["mask"].shape[1], generator=torch.Generator().manual_seed(1))
    batch = {k: v[:, perm] for k, v in batch.items()}
    batch["mask"][5] = False
    batch["features"][5] = 0.0
    batch["points"][5] = 0.0
    torch.manual_seed(1)
    padded = get_model(name, layout="padded", fc_params=((16, 0.0),))
    with torch.no_grad():   # batch norms as after training (not identity), so eval mode's folding is exercised
        for norm in (m for m in padded.modules() if isinstance(m, MaskedBatchNorm)):
            for t, lo, hi in ((norm.weight, 0.5, 1.5), (norm.bias, -0.5, 0.5), (norm.running_mean, -0.5, 0.5),
                              (norm.running_var, 0.5, 2.0)):
                t.uniform_(lo, hi)
    packed = get_model(name, layout="packed", fc_params=((16, 0.0),))
    packed.load_state_dict(padded.state_dict())
    getattr(padded, mode)(), getattr(packed, mode)()
    out_padded, out_packed = padded(**batch), packed(**batch)
    out_padded.sum().backward()
    out_packed.sum().backward()
    torch.testing.assert_close(out_packed, out_padded, rtol=1e-4, atol=1e-5)
    grads = dict(packed.named_parameters())
    for pname, p in padded.named_parameters():
        torch.testing.assert_close(grads[pname].grad, p.grad, rtol=1e-3, atol=1e-5, msg=pname)
    buffers = dict(packed.named_buffers())
    for bname, buf in padded.named_buffers():
        torch.testing.assert_close(buffers[bname], buf, rtol=1e-4, atol=1e-6, msg=bname)


def _masked_reference(x: torch.Tensor, real: torch.Tensor, bn, relu: bool) -> torch.Tensor:
    """Batch norm over the real rows only, in float64, zero elsewhere (what MaskedBatchNorm must compute)."""
    c = x.shape[-1]
    x2, rows = x.double().reshape(-1, c), real.reshape(-1).nonzero().squeeze(1)
    xr = x2[rows]
    if bn.training:
        mean, var = xr.mean(0), xr.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean.double(), bn.running_var.double()
    y = (xr - mean) / torch.sqrt(var + bn.eps) * bn.weight.double() + bn.bias.double()
    y = y.relu() if relu else y
    return torch.zeros_like(x2).index_put((rows,), y).view(x.shape)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("edges", [False, True])
def test_masked_batch_norm_forward_backward_and_running_stats_equal_real_rows_reference(relu: bool,
                                                                                        edges: bool) -> None:
    from qgdist.models.edgeconv import MaskedBatchNorm

    g = torch.Generator().manual_seed(0)
    shape, mask = ((5, 9, 4, 6), torch.rand(5, 9, 1, generator=g) < 0.6) if edges else \
        ((5, 9, 6), torch.rand(5, 9, generator=g) < 0.6)
    real = mask.expand(shape[:-1])
    x = ((torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1) * real.unsqueeze(-1)).requires_grad_(True)
    bn = MaskedBatchNorm(6).double().train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=g)
        bn.bias.normal_(generator=g)
    want = _masked_reference(x, real, bn, relu)
    got = bn(x, mask, relu=relu)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((got * upstream).sum(), [x, bn.weight, bn.bias])
    want_grads = torch.autograd.grad((want * upstream).sum(), [x, bn.weight, bn.bias])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    xr = x.detach().reshape(-1, 6)[real.reshape(-1)]
    torch.testing.assert_close(bn.running_mean, 0.1 * xr.mean(0))
    torch.testing.assert_close(bn.running_var, 0.9 + 0.1 * xr.var(0, unbiased=True))
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_masked_batch_norm_normalises_in_float32_under_bf16_autocast(masked: bool, mode: str) -> None:
    # Mean ~100, spread ~1: scale and shift rounded to bf16 (8 bits) before the multiply-add would be off by up to
    # ~0.25 in the normalised output. Normalised in float32 (as cuDNN does) only the bf16 output rounding is left.
    from qgdist.models.edgeconv import MaskedBatchNorm

    g = torch.Generator().manual_seed(0)
    mask = torch.rand(16, 40, generator=g) < 0.7 if masked else None
    real = mask if masked else torch.ones(16, 40, dtype=torch.bool)
    x = (100.0 + torch.randn(16, 40, 8, generator=g)) * real.unsqueeze(-1)
    x = x.bfloat16()  # the values a bf16 model hands over; the reference sees exactly these
    bn = MaskedBatchNorm(8)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0, generator=g)
        bn.bias.normal_(generator=g)
        bn.running_mean.fill_(100.0)
        bn.running_var.uniform_(0.5, 2.0, generator=g)
    getattr(bn, mode)()
    want = _masked_reference(x.double(), real, bn, relu=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = bn(x, mask)
    assert got.dtype == torch.bfloat16
    err = (got.double() - want).abs()
    # bf16 keeps 8 significant bits: |output| * 2^-8, plus float32 statistics of a mean-100 column
    assert bool((err <= want.abs() * 2.0**-8 + 2e-3).all()), float(err.max())


def test_pyg_path_builds_no_host_tensors_and_uses_the_native_batch_norm() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.seen: dict[str, int] = {}

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen[str(func)] = self.seen.get(str(func), 0) + 1
            return func(*args, **(kwargs or {}))

    model = get_model("particlenet-lite-pyg").train()
    norms = sum(1 for m in model.modules() if type(m).__name__ == "MaskedBatchNorm")
    batch = _small_cloud()
    with Ops() as ops:
        model(**batch)
    # torch.tensor(python number) dispatches to lift_fresh: on a GPU that is a blocking host-to-device copy
    assert not [op for op in ops.seen if "lift_fresh" in op], ops.seen
    assert ops.seen.get("aten.native_batch_norm.default", 0) == norms


@pytest.mark.slow   # torch.compile / a fresh interpreter: 5-12 s
@pytest.mark.parametrize("layout,max_graphs", [("padded", 2), ("packed", 11)])
def test_compiled_model_does_not_recompile_per_particle_count(layout: str, max_graphs: int) -> None:
    # bench step alternates two batches, which hid one graph per particle count (torch gives up after 8).
    # The dynamo backend "eager" runs the same guards as inductor without its minute of code generation.
    # padded: one graph for the first shape, one dynamic graph for all others, no graph break. packed: the
    # packing and the kNNs run outside the graphs (host ints), so 5 segments for ParticleNet-Lite, each compiled
    # for the first shape and once more with dynamic sizes.
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qgdist.models.compiling import compile_model

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = get_model("particlenet-lite", fc_params=((16, 0.0),), layout=layout).train()
    compiled = compile_model(model, backend="eager")
    g = torch.Generator().manual_seed(0)
    shapes, graphs = set(), []
    for i in range(20):
        inputs, _ = cloud_batch(4 + i % 3, 7, 10 + 3 * i, generator=g)  # P = the longest jet: 20 different
        shapes.add(tuple(inputs["mask"].shape))
        compiled(**inputs).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(shapes) == 20
    assert graphs[-1] <= max_graphs and graphs[2:] == [graphs[1]] * 18, graphs  # nothing new after batch 2
    if layout == "padded":
        assert not counters["graph_break"], dict(counters["graph_break"])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(**inputs), model(**inputs), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_e2e_preprocessing_transform() -> None:
    from qgdist.models.cnn import e2e_preprocess

    image = torch.tensor([5e-4, 2e-3, 1.0]).view(1, 3, 1, 1).repeat(1, 1, 2, 2)
    out = e2e_preprocess(image)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([0.0, 2e-5, 0.25]))


@pytest.mark.parametrize("name", ["seed-cnn", "resnet15", "particlenet-lite", "particlenet-lite-pyg"])
def test_a_few_training_steps_lower_the_loss(name: str) -> None:
    torch.manual_seed(0)
    if name in ("seed-cnn", "resnet15"):
        model = get_model(name, **({"image_size": 32} if name == "seed-cnn" else {}))
        inputs, label = image_batch(16, 32)
    else:
        model = get_model(name)
        inputs, label = cloud_batch(16, max_particles=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    steps = 8 if model.kind == "cloud" else 20  # the E2E ResNet starts slowly (inputs / 100, no BatchNorm)
    losses = [float(train_step(model, inputs, label, optimizer, grad_clip=5.0)) for _ in range(steps)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert min(losses[-3:]) < losses[0] * 0.85, losses


@pytest.mark.slow   # torch.compile / a fresh interpreter: 5-12 s
def test_models_step_and_benchmarks_import_without_ray_or_torchdynamo() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"  # any `import ray` now raises ImportError
        "import torch; torch.set_num_threads(1)\n"
        "import qgdist.models, qgdist.models.cnn, qgdist.models.particlenet, qgdist.models.particlenet_pyg\n"
        "import qgdist.models.part\n"
        "import qgdist.train.step, qgdist.bench.knn, qgdist.bench.step\n"
        "assert 'torch._dynamo' not in sys.modules, 'TorchDynamo imported before any compile'\n"
        "from qgdist.cli.bench import run_kind\n"
        "run_kind('step', ['--model', 'particlenet-lite', '--batch-size', '8', '--steps', '1', '--warmup', '0'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "particlenet-lite" in done.stdout and "jets/s" in done.stdout
