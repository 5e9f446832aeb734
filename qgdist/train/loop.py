"""The training loop: plain PyTorch, one process or one DDP rank; reads top to bottom.

``train(cfg)`` runs in a single process without Ray. Under Ray Train (``qgdist.train.ray_trainer``) the same
function runs on every worker: a ``torch.distributed`` process group is already initialised there, so the model is
wrapped in DDP, each rank streams its own shards, and ``report`` (``ray.train.report``) is called by every rank at
the same points (it is a barrier).

Exact resume: a checkpoint holds the model, optimiser, scheduler, grad scaler, every rank's RNG states and loader
position ``(epoch, step)``; the loader replays its shard plan up to that step, so a resumed run takes the same
batches in the same order with the same random numbers as one that was never interrupted.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from upath import UPath

from qgdist.core import atomic
from qgdist.core.config import to_flat_dict
from qgdist.core.device import resolve_device
from qgdist.core.secrets import redact_config
from qgdist.core.storage import is_local, run_path, scratch_dir, upload
from qgdist.data.loader import LoaderConfig, ShardLoader
from qgdist.data.preprocessing import Preprocessing
from qgdist.train import parallel
from qgdist.train.checkpoint import (Checkpointer, check_fingerprint, load_checkpoint, rng_state, set_rng_state,
                                     to_cpu)
from qgdist.train.config import TrainConfig
from qgdist.train.console import Console
from qgdist.train.elastic import continue_after_resize
from qgdist.train.metrics import JetMetrics
from qgdist.train.step import forward_logits, train_step

WARMUP_STEPS = 3  # steps left out of the steady-state throughput (first batches, allocator, DDP buckets)
#: Longest wait, at each checkpoint, for queued metrics to reach a reachable tracker (see Tracker.sync).
TRACKER_SYNC_S = 10.0
Report = Callable[[dict[str, float], UPath | None], None]


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, total_steps: int, steps_per_epoch: int):
    """The optimiser and per-step LR scheduler of ``cfg``'s resolved optimiser settings."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    elif o.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.schedule == "onecycle":
        # 3e-4 -> 3e-3 (40%) -> 3e-4 (40%) -> 5e-7 (20%): the ParticleNet paper's schedule, linear pieces.
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=o.lr, total_steps=max(total_steps, 2), pct_start=0.4, anneal_strategy="linear",
            three_phase=True, div_factor=10.0, final_div_factor=600.0, cycle_momentum=False)
    elif o.schedule == "step":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10 * steps_per_epoch, gamma=0.1)
    else:
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
    return opt, sched


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: ShardLoader, device: torch.device,
             precision: str | None) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """Loss, accuracy, AUC and rejections on ``loader``'s split, gathered over all ranks; and the ROC (fpr, tpr)."""
    model.eval()
    metrics = JetMetrics(device)
    for inputs, label in loader.epoch(0):
        logits = forward_logits(model, inputs, precision)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, label)
        metrics.update(logits, label, loss)
    model.train()
    return metrics.compute(), metrics.roc_curve()


def write_artifacts(cfg: TrainConfig, model: torch.nn.Module, preprocessing: Preprocessing,
                    history: dict[str, list[list[float]]], val: dict[str, float],
                    roc: tuple[torch.Tensor, torch.Tensor] | None) -> list[Path]:
    """Config, final metrics, loss curves, validation ROC and final weights in ``<run_dir>/artifacts`` (rank 0).

    Written locally (the run directory, or its scratch folder when the run directory is a URL) and copied up.
    Returns the local files.
    """
    from qgdist.train.plots import plot_curves, plot_roc

    out = scratch_dir(cfg.run_dir) / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    saved = redact_config(cfg.to_dict())   # the run uses the real URIs; what is kept masks their credentials
    for name, doc in (("config.json", saved), ("metrics.json", {"val": val, "history": history})):
        atomic.write_json(out / name, doc)
        files.append(out / name)
    with atomic.atomic_path(out / "model.pt") as tmp:
        torch.save({"model": cfg.model.model, "model_kwargs": cfg.model.model_kwargs,
                    "preprocessing": preprocessing.to_dict(), "state_dict": to_cpu(model.state_dict())}, tmp)
    files.append(out / "model.pt")
    if history:
        files.append(plot_curves({k: tuple(zip(*v)) for k, v in history.items() if v}, out / "curves.png"))
    if roc is not None:
        files.append(plot_roc({f"{cfg.model.model} val": (roc[0].cpu().numpy(), roc[1].cpu().numpy())}, out / "roc.png"))
    if not is_local(cfg.run_dir):
        upload(out, run_path(cfg.run_dir) / "artifacts")
    return files


def train(cfg: TrainConfig, device: torch.device | str | None = None, report: Report | None = None,
          console: Console | None = None) -> dict[str, Any]:
    """Train ``cfg`` (resolved, see ``qgdist.train.config.resolve``); returns the final validation metrics,
    checkpoint path and counters."""
    from qgdist.models import get_model  # noqa: PLC0415 -- models import torch-geometric; only needed here
    from qgdist.track.tracker import Tracker

    if not cfg.resolved:
        raise ValueError("train() needs a resolved config: qgdist.train.config.resolve(cfg)")
    d, o, c, t = cfg.data, cfg.optim, cfg.checkpoint, cfg.tracking

    # -- where am I -------------------------------------------------------------------------------------------
    distributed = parallel.is_distributed()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if not cfg.allows_world_size(world):
        wanted = f"{cfg.launch.min_workers}-{cfg.world_size}" if cfg.launch.elastic else str(cfg.world_size)
        raise ValueError(f"config is for {wanted} worker(s) but {world} process(es) run it")
    device = resolve_device(device if device is not None else ("cuda" if cfg.launch.gpu else "auto"))
    precision = o.precision
    torch.manual_seed(o.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    console = Console(enabled=rank == 0) if console is None else console
    say = console.say

    # -- checkpoint to resume from ---------------------------------------------------------------------------
    ckpt = Checkpointer(cfg.run_dir, c.keep_last)
    source = run_path(c.resume_from) if c.resume_from else ckpt.latest()
    state = load_checkpoint(source) if source is not None else None

    # -- data ------------------------------------------------------------------------------------------------
    # The preprocessing (normalisation statistics, preset) comes from the training data's manifest on a fresh
    # start, and from the checkpoint on a resume: the model keeps the inputs it was trained on.
    saved = state.get("preprocessing") if state is not None else None
    pre = Preprocessing.from_dict(saved) if saved else None

    def loader(split: str, training: bool, pre: Preprocessing | None) -> ShardLoader:
        return ShardLoader(LoaderConfig.of_run(d, split, training=training, rank=rank, world_size=world,
                                               seed=o.seed, device=str(device), preprocessing=pre))

    train_loader = loader("train", True, pre)
    pre = train_loader.preprocessing
    val_loader = loader("val", False, pre)
    steps = [train_loader.steps_in_epoch(e) for e in range(o.epochs)]
    total_steps = sum(steps)
    # An elastic run resumed with another world size: the epoch in progress continues with the jets its earlier
    # layouts left, and the schedule keeps the fraction of it done (qgdist.train.elastic).
    earlier, schedule_at, saved_world = (), None, world
    if state is not None:
        earlier, schedule_at, total_steps = continue_after_resize(state, train_loader, steps, world)
        saved_world = state["loader"][0]["world_size"]

    # -- model and optimiser ---------------------------------------------------------------------------------
    kwargs = dict(cfg.model.model_kwargs)
    if train_loader.kind == "cloud":
        kwargs.setdefault("in_features", train_loader.in_features)
    model = get_model(cfg.model.model, **kwargs).to(device)
    if model.kind != train_loader.kind:
        raise ValueError(f"model {cfg.model.model!r} takes {model.kind} inputs but {d.data} holds "
                         f"{train_loader.kind}s")
    optimizer, scheduler = build_optimizer(cfg, model, total_steps, steps[0])
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # -- resume ----------------------------------------------------------------------------------------------
    epoch, step, global_step, run_id = 0, 0, 0, None
    history: dict[str, list[list[float]]] = {}  # metric -> [[global_step, value], ...], kept across resumes
    if state is not None:
        say(f"resumed from {source} at epoch {state['epoch']} step {state['step']} "
            f"(global step {state['global_step']})")
        changed = check_fingerprint(state["fingerprint"], cfg.fingerprint(), str(source), c.allow_config_change)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if schedule_at is not None:
            say(f"world size {saved_world} -> {world} at epoch {state['epoch']} step {state['step']}: the epoch's "
                f"undrawn jets re-dealt over {world} rank(s), {steps[state['epoch']] - state['step']} steps left in it; "
                f"the schedule goes on from {schedule_at}/{total_steps}")
            scheduler.last_epoch = schedule_at
        elif changed:  # the schedule may have another length now: follow the new one from the same step
            say("config changed since the checkpoint (allowed):\n  " + "\n  ".join(changed))
            scheduler.last_epoch = state["global_step"]
        else:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        epoch, step, global_step = state["epoch"], state["step"], state["global_step"]
        run_id, history = state.get("mlflow_run_id") or None, state.get("history", {})
    else:
        say(f"starting {c.run_name}: {cfg.model.model} on {d.data}, {world} rank(s), {device}, "
            f"{total_steps} steps over {o.epochs} epochs")

    if distributed:
        model = parallel.wrap(model, device)           # broadcasts rank 0's parameters and buffers
    raw_model = model.module if distributed else model
    # Each rank's own BatchNorm statistics back (qgdist.train.parallel); after a resize all keep rank 0's.
    per_rank = (state.get("buffers") or []) if state is not None else []
    if saved_world == world and rank < len(per_rank):
        parallel.load_buffers(raw_model, per_rank[rank])
    if o.compile:
        model = torch.compile(model)

    # The MLflow run id is also kept next to the checkpoints, so a run killed before its first checkpoint
    # continues the same MLflow run too.
    id_file = run_path(cfg.run_dir) / "mlflow_run_id"
    if run_id is None and source is None and id_file.exists():
        run_id = id_file.read_text().strip() or None
    if t.track and rank == 0 and t.tracking_uri is None and not is_local(cfg.run_dir):
        say(f"note: run directory {cfg.run_dir} is not a local path, so the embedded MLflow store lives in "
            f"{scratch_dir(cfg.run_dir) / 'mlflow'} on this machine; give --tracking-uri to keep runs centrally")
    tracker = Tracker(scratch_dir(cfg.run_dir), t.tracking_uri, enabled=t.track and rank == 0)
    # An elastic run's world size is a metric (one point per start or resize), not a parameter: params are fixed.
    params = to_flat_dict(cfg) | ({} if cfg.launch.elastic else {"world_size": world})
    run_id = tracker.start(c.run_name, params, run_id=run_id)
    if cfg.launch.elastic:
        tracker.log_metrics({"cluster/world_size": world}, global_step)
    if run_id and rank == 0:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)

    def save(val: dict[str, float] | None = None) -> UPath | None:
        nonlocal run_id
        state_rngs = parallel.gather(rng_state())      # collectives: every rank takes part
        positions = parallel.gather(train_loader.state_dict())
        buffers = parallel.gather(parallel.buffers_state(raw_model))
        path = None
        if rank == 0:
            tracker.sync(TRACKER_SYNC_S)
            if tracker.run_id and tracker.run_id != run_id:   # the run was created late (tracker away at start)
                run_id = tracker.run_id
                id_file.write_text(run_id)
            path = ckpt.save({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": state_rngs,
                "buffers": buffers,
                "epoch": epoch, "step": step, "global_step": global_step, "loader": positions,
                "fingerprint": cfg.fingerprint(), "preprocessing": pre.to_dict(),
                "schedule_steps": getattr(scheduler, "total_steps", total_steps),
                "mlflow_run_id": run_id or "", "history": history,
                "config": json.dumps(redact_config(cfg.to_dict()))}, auc=(val or {}).get("auc"))
        if report is not None:
            speed = history.get("train/jets_per_s", [[0, float("nan")]])[-1][1]
            report({"epoch": epoch, "step": step, "global_step": global_step, "jets_per_s": speed,
                    "started_unix": started or float("nan"), **(val or {})}, path)
        return path

    # -- the loop --------------------------------------------------------------------------------------------
    status, val, roc, last_path, evaluated, started = "FAILED", {}, None, None, False, None
    try:
        while epoch < o.epochs and (o.max_steps is None or global_step < o.max_steps):
            model.train()
            jets_per_step = d.batch_size * world
            bar = console.bar(steps[epoch] * jets_per_step, step * jets_per_step, f"epoch {epoch}", show=t.progress)
            t0, running, warm = time.perf_counter(), [], None  # warm: (time, step) once past the first steps
            for inputs, label in train_loader.epoch(epoch, step, earlier):
                loss = train_step(model, inputs, label, optimizer, autocast_dtype=precision,
                                  grad_clip=o.grad_clip or None, scaler=scaler if scaler.is_enabled() else None)
                scheduler.step()
                step, global_step = step + 1, global_step + 1
                running.append(loss)
                bar.update(jets_per_step)
                if started is None:
                    started = time.time()
                if warm is None and step >= WARMUP_STEPS:
                    warm = (time.perf_counter(), step)
                if global_step % t.log_every == 0:
                    mean = torch.stack(running).mean().item()
                    running = []
                    bar.set_postfix(loss=f"{mean:.4f}")
                    history.setdefault("train/loss", []).append([global_step, mean])
                    tracker.log_metrics({"train/loss": mean, "train/lr": scheduler.get_last_lr()[0]}, global_step)
                stop = o.max_steps is not None and global_step >= o.max_steps
                if step < steps[epoch] and (stop or (c.checkpoint_every and global_step % c.checkpoint_every == 0)):
                    last_path = save()
                if stop:
                    break
            bar.close()
            if step < steps[epoch]:
                break  # max_steps reached mid-epoch
            seconds = time.perf_counter() - t0
            if warm is not None and step > warm[1]:  # steady-state throughput (global jets/s), for bench train
                speed = (step - warm[1]) * jets_per_step / (time.perf_counter() - warm[0])
                history.setdefault("train/jets_per_s", []).append([global_step, speed])
            parallel.average_buffers(raw_model)        # one model evaluated and saved, all ranks' statistics
            val, roc = evaluate(raw_model, val_loader, device, precision)
            for k, v in val.items():
                history.setdefault(f"val/{k}", []).append([global_step, v])
            tracker.log_metrics({f"val/{k}": v for k, v in val.items() if math.isfinite(v)}, global_step)
            say(f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in val.items()) + f" ({seconds:.1f} s)")
            epoch, step, evaluated, earlier = epoch + 1, 0, True, ()
            last_path = save(val)
        if rank == 0 and epoch >= o.epochs and evaluated:
            for path in write_artifacts(cfg, raw_model, pre, history, val, roc):
                tracker.log_artifact(path)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    return {"val": val, "started_unix": started, "history": history,
            "checkpoint": str(last_path) if last_path else None, "global_step": global_step,
            "epoch": epoch, "mlflow_run_id": tracker.run_id or run_id}
