"""DDP is correct: two Ray Train ranks end with identical weights, equal to one process on the same global batches.

``fit()`` runs the product's worker loop on 2 one-CPU workers (gloo) for a few SGD steps. A probe around it (this
file's ``_probe``, shipped to the workers by value) records, on every rank, the batches the loop trained on, the
initial weights and the final weights. The reference then replays the same global batches in this one process:
each step, the gradient of every rank's batch (each rank's own forward, so BatchNorm sees per-rank statistics, as
it does under DDP without SyncBatchNorm), averaged over the ranks, one SGD step. That is what DDP promises.

Plain SGD with momentum and no gradient clipping is used on purpose: Adam(W) and clipping are nearly blind to a
gradient's scale, so they would hide summed instead of averaged gradients.

The comparison is shown to fail on what a broken DDP would leave: from the same initial weights and the same
recorded batches, this process computes the ranks' weights had DDP not synchronised (``no-ddp``: each rank steps
on its own gradient, so the ranks drift apart) and had it summed the gradients instead of averaging them
(``summed``: the ranks agree with each other, but not with the single process). Both are computed here rather
than trained under Ray with the product's DDP swapped out (two more 2-worker runs, ~40 CPU-s each on the 2-core
machine); the breaks were once planted in the workers as well, with the same verdicts (docs/testing.md).

Tolerance: weights agree to ``atol=1e-6, rtol=1e-5`` (float32). The Ray workers run torch with 1 thread and this
process with more, so reductions inside the kernels may round differently. Measured here: the correct run is
within 1.2e-7 of the replay; the breaks are off by 8e-4 (no DDP) and 1e-2 (summed) or more.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qgdist.train.checkpointer import Checkpointer, load_checkpoint
from qgdist.train.config import TrainConfig, resolve
from qgdist.train.ray_trainer import fit
from tests.trainkit import write_dataset

pytestmark = pytest.mark.slow

TINY = {"conv_params": [[4, [8, 8]]], "fc_params": [[16, 0.0]]}  # no dropout: no random masks to replay
STEPS = 4
ATOL, RTOL = 1e-6, 1e-5


def _probe(config: dict) -> None:
    """A Ray Train worker function: the product's ``worker_loop``, recording what each rank trained on."""
    import ray.train
    import torch

    import qgdist.train.loop as loop
    from qgdist.train.ray_trainer import worker_loop

    rank = ray.train.get_context().get_world_rank()
    run = config["train"]["checkpoint"]
    out = Path(run["storage"]) / run["run_name"] / f"probe-rank{rank}.pt"
    record = {"batches": [], "initial": None, "model": None}
    real_step = loop.train_step

    def step(model, inputs, label, optimizer, **kw):
        if record["initial"] is None:
            record["model"] = model
            record["initial"] = {k: v.detach().clone() for k, v in model.named_parameters()}
        record["batches"].append(({k: v.detach().cpu().clone() for k, v in inputs.items()}, label.cpu().clone()))
        return real_step(model, inputs, label, optimizer, **kw)

    loop.train_step = step
    worker_loop(config)
    model = record["model"]
    params = {k.removeprefix("module."): v.detach().cpu().clone() for k, v in model.named_parameters()}
    initial = {k.removeprefix("module."): v.cpu() for k, v in record["initial"].items()}
    torch.save({"batches": record["batches"], "initial": initial, "final": params}, out)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from qgdist.core.ray import ensure_ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ensure_ray(num_cpus=2)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # ship _probe's worker by value
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("ddpdata")), "cloud", {"train": [32] * 4, "val": [16]}, seed=11)


def _cfg(data_dir: str, storage, run_name: str) -> TrainConfig:
    return resolve(TrainConfig.of(
        data=data_dir, model="particlenet-lite", model_kwargs=TINY, storage=str(storage), run_name=run_name,
        workers=2, max_failures=0, epochs=1, max_steps=STEPS, batch_size=8, shuffle_buffer=16, optimizer="sgd",
        lr=0.05, momentum=0.9, weight_decay=0.0, schedule="constant", grad_clip=0.0, track=False, progress=False,
        checkpoint_every=0))


@pytest.fixture(scope="module")
def run(ray_local, data, tmp_path_factory):
    """One 2-rank run as shipped: per rank what it recorded, and the checkpoint fit() wrote."""
    cfg = _cfg(data, tmp_path_factory.mktemp("ddpruns"), "ddp")
    fit(cfg, worker_fn=_probe)
    ranks = [torch.load(Path(cfg.run_dir) / f"probe-rank{r}.pt", weights_only=True) for r in (0, 1)]
    return {"cfg": cfg, "ranks": ranks, "checkpoint": load_checkpoint(Checkpointer(cfg.run_dir).latest())}


def single_process(cfg: TrainConfig, ranks: list[dict], *, reduce: str = "mean",
                   only_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Replay the ranks' global batches in this process: per step, the gradient of every rank's batch combined
    (``reduce``: "mean" is what DDP promises, "sum" the summed break), one optimiser step (the loop's own
    optimiser and scheduler construction). With ``only_rank``, that rank's own gradient alone: a replica that
    DDP never synchronised."""
    from qgdist.models import get_model
    from qgdist.train.optim import Optimisation

    in_features = ranks[0]["batches"][0][0]["features"].shape[-1]
    torch.manual_seed(0)
    model = get_model("particlenet-lite", **cfg.model.model_kwargs, in_features=in_features)
    missing = model.load_state_dict(ranks[0]["initial"], strict=False)
    assert not missing.unexpected_keys and all("running" in k or "num_batches" in k for k in missing.missing_keys)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optim = Optimisation.build(cfg.optim, model, STEPS, STEPS, torch.device("cpu"))
    optimizer, scheduler = optim.optimizer, optim.scheduler
    replicas = ranks if only_rank is None else [ranks[only_rank]]
    for step_batches in zip(*(r["batches"] for r in replicas)):
        grads = []
        for inputs, label in step_batches:   # each rank's batch on its own, as each replica runs it
            model.zero_grad(set_to_none=True)
            F.binary_cross_entropy_with_logits(model(**inputs).float(), label.float()).backward()
            grads.append([p.grad.clone() for p in params])
        for p, *per_rank in zip(params, *grads):
            p.grad = getattr(torch.stack(per_rank), reduce)(0)
        optimizer.step()
        scheduler.step()
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def broken(run: dict, mode: str) -> dict:
    """``run`` as a broken DDP would have ended it, from the same initial weights and batches: ``no-ddp`` (each
    rank stepped on its own gradient) or ``summed`` (both stepped on the sum of the ranks' gradients)."""
    cfg, ranks = run["cfg"], run["ranks"]
    if mode == "no-ddp":
        finals = [single_process(cfg, ranks, only_rank=r) for r in range(len(ranks))]
    else:
        finals = [single_process(cfg, ranks, reduce="sum")] * len(ranks)
    return {"cfg": cfg, "ranks": [dict(r, final=f) for r, f in zip(ranks, finals)]}


def mismatches(run: dict) -> list[str]:
    """What breaks the DDP promise in ``run``: ranks that disagree, and weights off the single-process replay."""
    r0, r1 = run["ranks"]
    problems = [f"ranks differ: {k} (max |diff| {(r0['final'][k] - r1['final'][k]).abs().max():.2e})"
                for k in r0["final"] if not torch.equal(r0["final"][k], r1["final"][k])]
    reference = single_process(run["cfg"], run["ranks"])
    problems += [f"single process differs: {k} (max |diff| {(reference[k] - r0['final'][k]).abs().max():.2e})"
                 for k in reference if not torch.allclose(r0["final"][k], reference[k], atol=ATOL, rtol=RTOL)]
    return problems


def test_two_ranks_match_one_process_on_the_same_global_batches(run):
    r0, r1 = run["ranks"]
    assert len(r0["batches"]) == len(r1["batches"]) == STEPS
    # Not vacuous: the ranks trained on different jets, and the weights moved well beyond the tolerance.
    assert not torch.equal(r0["batches"][0][0]["features"][:1], r1["batches"][0][0]["features"][:1])
    moved = max((r0["final"][k] - r0["initial"][k]).abs().max().item() for k in r0["final"])
    assert moved > 1e3 * ATOL
    reference = single_process(run["cfg"], run["ranks"])
    off = max((reference[k] - r0["final"][k]).abs().max().item() for k in reference)
    print(f"DDP vs single process: max |diff| {off:.2e}; weights moved up to {moved:.2e}")
    assert mismatches(run) == []
    # The checkpoint fit() wrote holds exactly these weights.
    assert all(torch.equal(run["checkpoint"].weights[k], v) for k, v in r0["final"].items())


def test_the_comparison_fails_without_ddp(run):
    problems = mismatches(broken(run, "no-ddp"))
    print("no-ddp:", problems[:2])
    assert any(p.startswith("ranks differ") for p in problems), problems


def test_the_comparison_fails_when_gradients_are_summed_not_averaged(run):
    problems = mismatches(broken(run, "summed"))
    print("summed:", problems[:2])
    assert problems and not any(p.startswith("ranks differ") for p in problems), problems
    assert any(p.startswith("single process differs") for p in problems)
