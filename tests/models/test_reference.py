"""Our ParticleNets against the one ParticleNet users train with today: weaver-core's (``qgdist[reference]``).

Weaver's weights (with random batch-norm statistics) are copied into ours; eval-mode logits must agree on every
jet with more than k particles, in both layouts of the dense model and in the PyG model. Skipped only when
weaver-core is not installed; CI installs the extra.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("weaver")

from qgdist.bench.weaver_reference import (  # imported after the skip, like weaver itself
    build_weaver,
    channel_first,
    check_against_weaver,
    randomise_batch_norms,
    weaver_logits,
    weaver_state_dict_to_ours,
)
from qgdist.models import get_model
from qgdist.models.synthetic import cloud_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _pair(name: str, layout: str = "auto", seed: int = 0):
    torch.manual_seed(seed)
    ours = get_model(name, layout=layout)
    weaver = build_weaver(ours.config)
    randomise_batch_norms(weaver, seed)
    ours.load_state_dict(weaver_state_dict_to_ours(weaver.state_dict(), ours.config))  # strict
    return ours, weaver


@pytest.mark.parametrize("name,layout", [("particlenet-lite", "padded"), ("particlenet-lite", "packed"),
                                         ("particlenet-lite-pyg", "auto"), ("particlenet", "padded"),
                                         ("particlenet", "packed"), ("seed-particlenet-lite", "packed")])
def test_eval_logits_equal_weaver_core_with_its_weights(name: str, layout: str) -> None:
    ours, weaver = _pair(name, layout)
    inputs, _ = cloud_batch(48, 7, 60, generator=torch.Generator().manual_seed(1))
    check = check_against_weaver(ours, weaver, inputs, rtol=1e-5, atol=1e-6)
    assert check["compared"] >= 40 and check["max_abs_diff"] < 1e-6
    assert ours.training and weaver.training  # the check put both back in the mode it found them in
    weaver.eval()
    with torch.no_grad():
        assert float(weaver_logits(weaver, inputs).abs().max()) > 1e-3  # not a trivially zero comparison


def test_short_jets_are_the_documented_difference() -> None:
    # Jets of <= k particles: weaver pairs them with padded slots (edge (x_i, -x_i)), ours with self-loops.
    ours, weaver = _pair("particlenet-lite", "packed")
    inputs, _ = cloud_batch(64, 7, 60, generator=torch.Generator().manual_seed(2))
    inputs["mask"][:4, 5:] = False
    inputs["points"][:4, 5:] = 0.0
    inputs["features"][:4, 5:] = 0.0
    ours.eval(), weaver.eval()
    with torch.no_grad():
        diff = (ours(**inputs) - weaver_logits(weaver, inputs)).abs()
    assert float(diff[4:].max()) < 1e-6 and float(diff[:4].max()) > 1e-6


def test_a_mismatch_fails_loudly() -> None:
    ours, weaver = _pair("particlenet-lite", "packed")
    with torch.no_grad():
        ours.blocks[1].edge_mlp.linears[2].weight[0, 0] += 0.5
    inputs, _ = cloud_batch(32, 7, 40, generator=torch.Generator().manual_seed(3))
    with pytest.raises(RuntimeError, match="reference check FAILED"):
        check_against_weaver(ours, weaver, inputs)


def test_weaver_trains_on_channel_first_copies_of_the_same_batch() -> None:
    inputs, _ = cloud_batch(8, 7, 20)
    cf = channel_first(inputs)
    assert cf["points"].shape == (8, 2, inputs["mask"].shape[1]) and cf["mask"].shape == (8, 1, inputs["mask"].shape[1])
    torch.testing.assert_close(cf["features"].transpose(1, 2), inputs["features"])


def test_bench_step_reference_runs_and_reports_the_check(capsys: pytest.CaptureFixture[str]) -> None:
    from qgdist.cli.bench import run_kind

    code = run_kind("step", ["--model", "particlenet-lite", "--reference", "weaver-core", "--batch-size", "16",
                             "--max-particles", "30", "--steps", "2", "--warmup", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "weaver-core" in out and "reference check: eval logits agree" in out and "jets/s" in out


def test_bench_step_reference_refuses_image_models() -> None:
    from qgdist.bench.step import StepBenchConfig

    with pytest.raises(ValueError, match="ParticleNet models and particle-transformer only"):
        StepBenchConfig(models=("resnet15",), reference="weaver-core")
