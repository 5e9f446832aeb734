"""Our Particle Transformer against weaver-core's (``qgdist[reference]``): weaver's weights, moved off their initial
values and with random batch-norm statistics, are copied into ours and the eval-mode logits agree to 1e-5, at a
small configuration and at the paper's, in both layouts. Skipped only when weaver-core is not installed."""

import pytest
import torch

pytest.importorskip("weaver")

from qgdist.bench.weaver_part import (  # noqa: E402 -- imported after the skip, like weaver itself
    build_weaver_part,
    check_part_against_weaver,
    randomise,
    weaver_part_logits,
    weaver_part_state_dict_to_ours,
)
from qgdist.models import get_model  # noqa: E402
from qgdist.models.synthetic import cloud_batch  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(embed_dims=(16, 32, 16), pair_embed_dims=(8, 8), num_heads=4, num_layers=2, num_cls_layers=1)


def _pair(layout: str, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    ours = get_model("particle-transformer", layout=layout, **cfg)
    weaver = build_weaver_part(ours.config)
    randomise(weaver, seed)
    ours.load_state_dict(weaver_part_state_dict_to_ours(weaver.state_dict()))   # strict
    return ours, weaver


@pytest.mark.parametrize("layout", ["packed", "padded"])
@pytest.mark.parametrize("cfg", [SMALL, {**SMALL, "in_features": 13, "pre_activation_pair": True}, {}],
                         ids=["small", "small-kinpid-preact", "paper"])
def test_eval_logits_equal_weaver_core_with_its_weights(layout, cfg):
    ours, weaver = _pair(layout, **cfg)
    jets = 12 if cfg else 6          # the paper's model is ~2M parameters: a small batch suffices
    inputs, _ = cloud_batch(jets, ours.config.in_features, 50, generator=torch.Generator().manual_seed(1),
                            vectors=True)
    check = check_part_against_weaver(ours, weaver, inputs, rtol=1e-5, atol=1e-5)
    assert check["compared"] == jets and check["max_abs_diff"] < 1e-5
    weaver.eval()
    with torch.no_grad():
        assert float(weaver_part_logits(weaver, inputs).abs().max()) > 0.1   # not a trivially small comparison


def test_a_mismatch_fails_loudly():
    ours, weaver = _pair("packed", **SMALL)
    with torch.no_grad():
        ours.pair_embed.linears[1].bias[0] += 0.5       # the pair features' path matters
    inputs, _ = cloud_batch(12, 7, 40, generator=torch.Generator().manual_seed(3), vectors=True)
    with pytest.raises(RuntimeError, match="reference check FAILED"):
        check_part_against_weaver(ours, weaver, inputs)


def test_bench_step_reference_runs_for_part(capsys):
    from qgdist.cli.bench import run_kind

    code = run_kind("step", ["--model", "particle-transformer", "--reference", "weaver-core", "--batch-size", "6",
                             "--max-particles", "20", "--steps", "1", "--warmup", "0", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "weaver-core" in out and "reference check: eval logits agree on 6/6 jets" in out
