"""Models: batch contract, invariances, dense vs PyG equality, parameter counts, training on generated data."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

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
    with pytest.raises(ValueError, match="unexpected keyword"):
        get_model("particlenet", no_such_field=1)


@pytest.mark.parametrize("name,paper", [("particlenet-lite", 26_000), ("particlenet", 366_000)])
@pytest.mark.parametrize("in_features", [7, 13])  # kin and kinpid presets
def test_parameter_counts_match_the_paper(name: str, paper: int, in_features: int) -> None:
    n = count_parameters(get_model(name, in_features=in_features))
    assert abs(n - paper) / paper < 0.10, n
    assert count_parameters(get_model(f"{name}-pyg", in_features=in_features)) == n


@pytest.mark.parametrize("name", ["particlenet-lite", "particlenet-lite-pyg"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_invariant_to_particle_permutation_and_extra_padding(name: str, mode: str) -> None:
    torch.manual_seed(0)
    model = get_model(name, fc_params=((16, 0.0),))  # no dropout: train mode must be deterministic too
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
def test_dense_and_pyg_paths_agree_for_the_same_weights(size: str, mode: str) -> None:
    base = "particlenet-lite" if size == "lite" else "particlenet"
    torch.manual_seed(1)
    dense = get_model(base)
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


@pytest.mark.parametrize("name", ["particlenet-lite", "particlenet-lite-pyg"])
def test_cloud_models_under_bf16_autocast_match_fp32(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name).eval()
    batch = _small_cloud()
    with torch.no_grad():
        ref = model(**batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(**batch)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0.05)  # bf16 has ~3 significant digits


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


def test_models_step_and_benchmarks_import_without_ray() -> None:
    code = (
        "import sys; sys.modules['ray'] = None\n"  # any `import ray` now raises ImportError
        "import torch; torch.set_num_threads(1)\n"
        "import qgdist.models, qgdist.models.cnn, qgdist.models.particlenet, qgdist.models.particlenet_pyg\n"
        "import qgdist.train.step, qgdist.bench.knn, qgdist.bench.step\n"
        "from qgdist.cli.bench import run_kind\n"
        "run_kind('step', ['--model', 'particlenet-lite', '--batch-size', '8', '--steps', '1', '--warmup', '0'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "particlenet-lite" in done.stdout and "jets/s" in done.stdout
