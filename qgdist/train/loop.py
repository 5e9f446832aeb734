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
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from upath import UPath

from qgdist.data.loader import LoaderConfig, ShardLoader
from qgdist.train.checkpoint import Checkpointer, check_fingerprint, load_checkpoint, rng_state, set_rng_state
from qgdist.train.config import TrainConfig
from qgdist.train.metrics import JetMetrics
from qgdist.train.storage import is_local, run_path, scratch_dir, upload
from qgdist.train.step import forward_logits, train_step

WARMUP_STEPS = 3  # steps left out of the steady-state throughput (first batches, allocator, DDP buckets)
Report = Callable[[dict[str, float], UPath | None], None]


def _gather(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one item without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, total_steps: int, steps_per_epoch: int):
    """The optimiser and per-step LR scheduler of ``cfg``'s recipe."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.schedule == "onecycle":
        # 3e-4 -> 3e-3 (40%) -> 3e-4 (40%) -> 5e-7 (20%): the ParticleNet paper's schedule, linear pieces.
        sched: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.lr, total_steps=max(total_steps, 2), pct_start=0.4, anneal_strategy="linear",
            three_phase=True, div_factor=10.0, final_div_factor=600.0, cycle_momentum=False)
    elif cfg.schedule == "step":
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


def write_artifacts(cfg: TrainConfig, model: torch.nn.Module, history: dict[str, list[list[float]]],
                    val: dict[str, float], roc: tuple[torch.Tensor, torch.Tensor] | None) -> list[Path]:
    """Config, final metrics, loss curves, validation ROC and final weights in ``<run_dir>/artifacts`` (rank 0).

    Written locally (the run directory, or its scratch folder when the run directory is a URL) and copied up.
    Returns the local files.
    """
    from qgdist.train.plots import plot_curves, plot_roc

    out = scratch_dir(cfg.run_dir) / "artifacts"
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for name, doc in (("config.json", cfg.to_dict()), ("metrics.json", {"val": val, "history": history})):
        (out / f".{name}.tmp").write_text(json.dumps(doc, indent=1, default=str))
        os.replace(out / f".{name}.tmp", out / name)
        files.append(out / name)
    torch.save({"model": cfg.model, "model_kwargs": cfg.model_kwargs, "state_dict": model.state_dict()},
               out / ".model.pt.tmp")
    os.replace(out / ".model.pt.tmp", out / "model.pt")
    files.append(out / "model.pt")
    if history:
        files.append(plot_curves({k: tuple(zip(*v)) for k, v in history.items() if v}, out / "curves.png"))
    if roc is not None:
        files.append(plot_roc({f"{cfg.model} val": (roc[0].cpu().numpy(), roc[1].cpu().numpy())}, out / "roc.png"))
    if not is_local(cfg.run_dir):
        upload(out, run_path(cfg.run_dir) / "artifacts")
    return files


def train(cfg: TrainConfig, device: torch.device | str | None = None, report: Report | None = None) -> dict[str, Any]:
    """Train ``cfg``; returns the final validation metrics, checkpoint path and counters."""
    from qgdist.models import get_model  # noqa: PLC0415 -- models import torch-geometric; only needed here
    from qgdist.track.tracker import Tracker

    # -- where am I -------------------------------------------------------------------------------------------
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    cfg.world_size = dist.get_world_size() if distributed else 1
    if device is None:
        device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else (
            "cpu" if cfg.device == "auto" else cfg.device)
    device = torch.device(device)
    precision = ("bf16" if device.type == "cuda" else "fp32") if cfg.precision == "auto" else cfg.precision
    torch.manual_seed(cfg.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)
    say = print if rank == 0 else (lambda *a, **k: None)

    # -- data ------------------------------------------------------------------------------------------------
    def loader(split: str, training: bool) -> ShardLoader:
        return ShardLoader(LoaderConfig(
            cfg.data, split=split, batch_size=cfg.batch_size, rank=rank, world_size=cfg.world_size,
            num_workers=cfg.loader_workers, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer if training else 0,
            training=training, preset=cfg.preset, max_particles=cfg.max_particles, device=str(device)))

    train_loader, val_loader = loader("train", True), loader("val", False)
    steps = [train_loader.steps_in_epoch(e) for e in range(cfg.epochs)]
    total_steps = sum(steps)

    # -- model and optimiser ---------------------------------------------------------------------------------
    kwargs = dict(cfg.model_kwargs)
    if train_loader.kind == "cloud":
        kwargs.setdefault("in_features", train_loader.in_features)
    model = get_model(cfg.model, **kwargs).to(device)
    if model.kind != train_loader.kind:
        raise ValueError(f"model {cfg.model!r} takes {model.kind} inputs but {cfg.data} holds {train_loader.kind}s")
    cfg.apply_seed_recipe(model.kind)
    optimizer, scheduler = build_optimizer(cfg, model, total_steps, steps[0])
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # -- resume ----------------------------------------------------------------------------------------------
    ckpt = Checkpointer(cfg.run_dir, cfg.keep_last)
    source = run_path(cfg.resume_from) if cfg.resume_from else ckpt.latest()
    epoch, step, global_step, run_id = 0, 0, 0, None
    history: dict[str, list[list[float]]] = {}  # metric -> [[global_step, value], ...], kept across resumes
    if source is not None:
        state = load_checkpoint(source)
        say(f"resumed from {source} at epoch {state['epoch']} step {state['step']} "
            f"(global step {state['global_step']})", flush=True)
        changed = check_fingerprint(state["fingerprint"], cfg.fingerprint(), str(source), cfg.allow_config_change)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if changed:  # the schedule may have another length now: follow the new one from the same step
            say("config changed since the checkpoint (allowed):\n  " + "\n  ".join(changed), flush=True)
            scheduler.last_epoch = state["global_step"]
        else:
            scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        epoch, step, global_step = state["epoch"], state["step"], state["global_step"]
        run_id, history = state.get("mlflow_run_id") or None, state.get("history", {})
    else:
        say(f"starting {cfg.run_name}: {cfg.model} on {cfg.data}, {cfg.world_size} rank(s), {device}, "
            f"{total_steps} steps over {cfg.epochs} epochs", flush=True)

    if distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    raw_model = model.module if distributed else model
    if cfg.compile:
        model = torch.compile(model)

    # The MLflow run id is also kept next to the checkpoints, so a run killed before its first checkpoint
    # continues the same MLflow run too.
    id_file = run_path(cfg.run_dir) / "mlflow_run_id"
    if run_id is None and source is None and id_file.exists():
        run_id = id_file.read_text().strip() or None
    if cfg.track and rank == 0 and cfg.tracking_uri is None and not is_local(cfg.run_dir):
        say(f"note: run directory {cfg.run_dir} is not a local path, so the embedded MLflow store lives in "
            f"{scratch_dir(cfg.run_dir) / 'mlflow'} on this machine; give --tracking-uri to keep runs centrally",
            flush=True)
    tracker = Tracker(scratch_dir(cfg.run_dir), cfg.tracking_uri, enabled=cfg.track and rank == 0)
    run_id = tracker.start(cfg.run_name, cfg.to_dict(), run_id=run_id)
    if run_id and rank == 0:
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)

    def save(val: dict[str, float] | None = None) -> UPath | None:
        state_rngs = _gather(rng_state())              # collective: every rank takes part
        positions = _gather(train_loader.state_dict())
        path = None
        if rank == 0:
            path = ckpt.save({
                "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": state_rngs,
                "epoch": epoch, "step": step, "global_step": global_step, "loader": positions,
                "fingerprint": cfg.fingerprint(), "mlflow_run_id": run_id or "", "history": history,
                "config": {k: str(v) for k, v in cfg.to_dict().items()}}, auc=(val or {}).get("auc"))
        if report is not None:
            speed = history.get("train/jets_per_s", [[0, float("nan")]])[-1][1]
            report({"epoch": epoch, "step": step, "global_step": global_step, "jets_per_s": speed,
                    "started_unix": started or float("nan"), **(val or {})}, path)
        return path

    # -- the loop --------------------------------------------------------------------------------------------
    status, val, roc, last_path, evaluated, started = "FAILED", {}, None, None, False, None
    try:
        from tqdm import tqdm

        while epoch < cfg.epochs and (cfg.max_steps is None or global_step < cfg.max_steps):
            model.train()
            bar = tqdm(total=steps[epoch] * cfg.batch_size * cfg.world_size, initial=step * cfg.batch_size *
                       cfg.world_size, unit="jet", unit_scale=True, desc=f"epoch {epoch}",
                       disable=rank != 0 or not cfg.progress, mininterval=2.0)
            t0, running, warm = time.perf_counter(), [], None  # warm: (time, step) once past the first steps
            for inputs, label in train_loader.epoch(epoch, step):
                loss = train_step(model, inputs, label, optimizer, autocast_dtype=precision,
                                  grad_clip=cfg.grad_clip, scaler=scaler if scaler.is_enabled() else None)
                scheduler.step()
                step, global_step = step + 1, global_step + 1
                running.append(loss)
                bar.update(cfg.batch_size * cfg.world_size)
                if started is None:
                    started = time.time()
                if warm is None and step >= WARMUP_STEPS:
                    warm = (time.perf_counter(), step)
                if global_step % cfg.log_every == 0:
                    mean = torch.stack(running).mean().item()
                    running = []
                    bar.set_postfix(loss=f"{mean:.4f}")
                    history.setdefault("train/loss", []).append([global_step, mean])
                    tracker.log_metrics({"train/loss": mean, "train/lr": scheduler.get_last_lr()[0]}, global_step)
                stop = cfg.max_steps is not None and global_step >= cfg.max_steps
                if step < steps[epoch] and (stop or (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0)):
                    last_path = save()
                if stop:
                    break
            bar.close()
            if step < steps[epoch]:
                break  # max_steps reached mid-epoch
            seconds = time.perf_counter() - t0
            if warm is not None and step > warm[1]:  # steady-state throughput (global jets/s), for bench train
                speed = (step - warm[1]) * cfg.batch_size * cfg.world_size / (time.perf_counter() - warm[0])
                history.setdefault("train/jets_per_s", []).append([global_step, speed])
            val, roc = evaluate(raw_model, val_loader, device, precision) if cfg.eval_every_epoch else ({}, None)
            for k, v in val.items():
                history.setdefault(f"val/{k}", []).append([global_step, v])
            tracker.log_metrics({f"val/{k}": v for k, v in val.items() if math.isfinite(v)}, global_step)
            say(f"epoch {epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in val.items()) + f" ({seconds:.1f} s)",
                flush=True)
            epoch, step, evaluated = epoch + 1, 0, True
            last_path = save(val)
        if rank == 0 and epoch >= cfg.epochs and evaluated:
            for path in write_artifacts(cfg, raw_model, history, val, roc):
                tracker.log_artifact(path)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    return {"val": val, "started_unix": started, "history": history,
            "checkpoint": str(last_path) if last_path else None, "global_step": global_step,
            "epoch": epoch, "mlflow_run_id": run_id}
