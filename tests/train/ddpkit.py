"""What the DDP correctness tests (tests/train/test_ray_trainer.py) need: a probe around the product's worker loop,
and the single-process replay that DDP must equal.

The probe records, on every rank, the batches the loop trained on, the initial weights and the final weights. The
replay then trains one model in this process on the same global batches: each step, the gradient of every rank's
batch (each rank's own forward, so BatchNorm sees per-rank statistics, as it does under DDP without SyncBatchNorm),
averaged over the ranks, one optimiser step. That is what DDP promises.

Plain SGD with momentum, a constant rate and no gradient clipping is used on purpose (``DDP_OPTIM``): Adam(W) and
clipping are nearly blind to a gradient's scale, so they would hide summed instead of averaged gradients.

The comparison is shown to fail on what a broken DDP would leave (``broken``): from the same initial weights and
recorded batches, the ranks' weights had DDP not synchronised (``no-ddp``: each rank steps on its own gradient, so
the ranks drift apart) and had it summed the gradients instead of averaging them (``summed``: the ranks agree with
each other, but not with the single process). Both are computed here rather than trained under Ray with the
product's DDP swapped out (two more 2-worker runs); the breaks were once planted in the workers as well, with the
same verdicts (docs/testing.md).

Tolerance: weights agree to ``atol=1e-6, rtol=1e-5`` (float32): the replay's kernels may round reductions
differently from the workers'.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from qgdist.train.config import TrainConfig

ATOL, RTOL = 1e-6, 1e-5
#: The optimiser settings under which a broken DDP shows (see the module's docstring); no dropout in the model
#: (``fc_params`` with rate 0), so there are no random masks to replay.
DDP_OPTIM = dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=0.0, schedule="constant", grad_clip=0.0)


def probe(config: dict) -> None:
    """A Ray Train worker function: the product's ``worker_loop``, recording what each rank trained on in
    ``<run>/probe-rank<R>.pt``."""
    import ray.train

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
    params = {k.removeprefix("module."): v.detach().cpu().clone() for k, v in record["model"].named_parameters()}
    initial = {k.removeprefix("module."): v.cpu() for k, v in record["initial"].items()}
    torch.save({"batches": record["batches"], "initial": initial, "final": params}, out)


def probed(cfg: TrainConfig) -> list[dict]:
    """Each rank's record of a finished run of ``probe``."""
    return [torch.load(Path(cfg.run_dir) / f"probe-rank{r}.pt", weights_only=True) for r in (0, 1)]


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
    model = get_model(cfg.model.model, **cfg.model.model_kwargs, in_features=in_features)
    missing = model.load_state_dict(ranks[0]["initial"], strict=False)
    assert not missing.unexpected_keys and all("running" in k or "num_batches" in k for k in missing.missing_keys)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    steps = len(ranks[0]["batches"])
    optim = Optimisation.build(cfg.optim, model, steps, steps, torch.device("cpu"))
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


def broken(cfg: TrainConfig, ranks: list[dict], mode: str) -> list[dict]:
    """The ranks' records as a broken DDP would have ended the run, from the same initial weights and batches:
    ``no-ddp`` (each rank stepped on its own gradient) or ``summed`` (both stepped on the sum of the gradients)."""
    if mode == "no-ddp":
        finals = [single_process(cfg, ranks, only_rank=r) for r in range(len(ranks))]
    else:
        finals = [single_process(cfg, ranks, reduce="sum")] * len(ranks)
    return [dict(r, final=f) for r, f in zip(ranks, finals)]


def mismatches(cfg: TrainConfig, ranks: list[dict]) -> list[str]:
    """What breaks the DDP promise: ranks that disagree, and weights off the single-process replay."""
    r0, r1 = ranks
    problems = [f"ranks differ: {k} (max |diff| {(r0['final'][k] - r1['final'][k]).abs().max():.2e})"
                for k in r0["final"] if not torch.equal(r0["final"][k], r1["final"][k])]
    reference = single_process(cfg, ranks)
    problems += [f"single process differs: {k} (max |diff| {(reference[k] - r0['final'][k]).abs().max():.2e})"
                 for k in reference if not torch.allclose(r0["final"][k], reference[k], atol=ATOL, rtol=RTOL)]
    return problems
