"""The training loop: plain PyTorch, one process or one DDP rank; reads top to bottom.

``train(cfg)`` runs in a single process without Ray. Under Ray Train (``qgdist.train.ray_trainer``) the same
function runs on every worker: a ``torch.distributed`` process group is already initialised there, so the model is
wrapped in DDP, each rank streams its own shards, and ``report`` (``ray.train.report``) is called by every rank at
the same points (it is a barrier).

A run's life: **build** (data, model, optimiser: ``qgdist.train.build``, ``qgdist.train.optim``) -> **resume**
from the latest complete checkpoint if there is one (``qgdist.train.resume``) -> **steps**, epoch by epoch, each
epoch ending with a validation -> **checkpoint** (``qgdist.train.saver``) every ``--checkpoint-every`` steps and
at every epoch end -> **finish**: artifacts and the tracker's final status. Inference takes it from there
(``qgdist.infer``).

Exact resume: a checkpoint holds the model, optimiser, scheduler, grad scaler, every rank's RNG states and loader
position ``(epoch, step)``; the loader replays its shard plan up to that step, so a resumed run takes the same
batches in the same order with the same random numbers as one that was never interrupted.
"""

from __future__ import annotations

import math
import time

import torch

from qgdist.core.memory import SCORING_TRIM_EVERY, trim_every
from qgdist.data.loader import ShardLoader
from qgdist.track.tracker import Tracker
from qgdist.train import parallel
from qgdist.train.artifacts import write_artifacts
from qgdist.train.build import TrainingData, build_model, start_tracker
from qgdist.train.checkpointer import Checkpointer
from qgdist.train.config import TrainConfig
from qgdist.train.console import Console
from qgdist.train.metrics import JetMetrics
from qgdist.train.optim import Optimisation
from qgdist.train.parallel import Placement
from qgdist.train.resume import own_buffers, resume
from qgdist.train.saver import Report, Saver
from qgdist.train.state import TrainResult, TrainState
from qgdist.train.step import forward_logits, train_step

WARMUP_STEPS = 3  # steps left out of the steady-state throughput (first batches, allocator, DDP buckets)


def train(cfg: TrainConfig, device: torch.device | str | None = None, report: Report | None = None,
          console: Console | None = None) -> TrainResult:
    """Train ``cfg`` (resolved, see ``qgdist.train.config.resolve``); returns where the run ended."""
    if not cfg.resolved:
        raise ValueError("train() needs a resolved config: qgdist.train.config.resolve(cfg)")
    place = Placement.current(device, gpu=cfg.launch.gpu)
    if not cfg.allows_world_size(place.world):
        raise ValueError(f"config is for {cfg.launch.workers_spec} worker(s) but {place.world} process(es) run it")
    console = console if console is not None else Console(enabled=place.rank == 0)
    torch.manual_seed(cfg.optim.seed)  # same initial weights on every rank (DDP broadcasts rank 0's anyway)

    # -- build --------------------------------------------------------------------------------------------------
    checkpointer = Checkpointer(cfg.run, cfg.checkpoint.keep_last)
    point = checkpointer.resume_point(cfg.checkpoint.resume_from)   # the latest intact checkpoint, if any
    for line in point.skipped:
        console.say(line)
    resumed = point.checkpoint
    data = TrainingData.build(cfg, place, resumed)
    model = build_model(cfg, data, place.device)
    optim = Optimisation.build(cfg.optim, model, data.schedule_steps, data.steps[0], place.device)

    # -- resume -------------------------------------------------------------------------------------------------
    if resumed is not None:
        state = resume(resumed, str(point.path), cfg, model, optim, data, place, console.say)
    else:
        state = TrainState()
        console.say(f"starting {cfg.checkpoint.run_name}: {cfg.model.model} on {cfg.data.data}, {place.world} "
                    f"rank(s), {place.device}, {data.schedule_steps} steps over {cfg.optim.epochs} epochs")
    model, bare_model = parallel.prepare(model, place, own_buffers(resumed, place.world), cfg.optim.compile)
    tracker = start_tracker(cfg, place, state, fresh=resumed is None, say=console.say)
    saver = Saver(cfg, place, bare_model, optim, data, state, checkpointer, tracker, report)

    # -- steps, checkpoints, epoch ends -------------------------------------------------------------------------
    status = "FAILED"
    try:
        while not state.stopped(cfg.optim):
            if not train_epoch(cfg, model, optim, data, state, saver, console, tracker):
                break   # max_steps reached mid-epoch (checkpointed)
            end_epoch(cfg, bare_model, data, state, place, console, tracker)
            saver.save(epoch_end=True)
        # -- finish -----------------------------------------------------------------------------------------------
        if place.rank == 0 and state.epoch >= cfg.optim.epochs and state.evaluated:
            for path in write_artifacts(cfg.run, saver.model_checkpoint(), state):
                tracker.log_artifact(path)
        status = "FINISHED"
    finally:
        tracker.finish(status)
    latest = saver.last or point.path
    return TrainResult.of(str(cfg.run), str(latest) if latest else None, state)


def train_epoch(cfg: TrainConfig, model: torch.nn.Module, optim: Optimisation, data: TrainingData,
                state: TrainState, saver: Saver, console: Console, tracker: Tracker) -> bool:
    """Run the rest of ``state.epoch``; returns False when ``max_steps`` stopped it before its end."""
    o, t = cfg.optim, cfg.tracking
    model.train()
    steps = data.steps[state.epoch]
    jets_per_step = cfg.data.batch_size * saver.place.world
    bar = console.bar(steps * jets_per_step, state.step * jets_per_step, f"epoch {state.epoch}", show=t.progress)
    t0, running, warm = time.perf_counter(), [], None  # warm: (time, step) once past the first steps
    for inputs, label in data.train.epoch(state.epoch, state.step, data.earlier):
        loss = train_step(model, inputs, label, optim.optimizer, autocast_dtype=o.precision,
                          grad_clip=o.grad_clip or None, scaler=optim.scaler if optim.scaler.is_enabled() else None)
        optim.scheduler.step()
        state.step, state.global_step = state.step + 1, state.global_step + 1
        running.append(loss)
        bar.update(jets_per_step)
        state.started_unix = state.started_unix or time.time()
        if warm is None and state.step >= WARMUP_STEPS:
            warm = (time.perf_counter(), state.step)
        trim_every(state.global_step)
        if state.global_step % t.log_every == 0:
            mean = torch.stack(running).mean().item()   # the one host sync, every log_every steps
            running = []
            bar.set_postfix(loss=f"{mean:.4f}")
            state.record("train/loss", mean)
            tracker.log_metrics({"train/loss": mean, "train/lr": optim.lr}, state.global_step)
        stop = o.max_steps is not None and state.global_step >= o.max_steps
        every = cfg.checkpoint.checkpoint_every
        if state.step < steps and (stop or (every and state.global_step % every == 0)):
            saver.save(last=stop)
        if stop:
            break
    bar.close()
    if state.step < steps:
        return False
    if warm is not None and state.step > warm[1]:  # steady-state throughput (global jets/s), for bench train
        state.record("train/jets_per_s", (state.step - warm[1]) * jets_per_step / (time.perf_counter() - warm[0]))
    state.epoch_seconds = time.perf_counter() - t0
    return True


def end_epoch(cfg: TrainConfig, model: torch.nn.Module, data: TrainingData, state: TrainState, place: Placement,
              console: Console, tracker: Tracker) -> None:
    """Validate the model at the end of an epoch, record and report the metrics, and move to the next epoch."""
    parallel.average_buffers(model)        # one model evaluated and saved, all ranks' statistics
    state.val, state.roc = evaluate(model, data.val, place.device, cfg.optim.precision)
    for k, v in state.val.items():
        state.record(f"val/{k}", v)
    tracker.log_metrics({f"val/{k}": v for k, v in state.val.items() if math.isfinite(v)}, state.global_step)
    console.say(f"epoch {state.epoch}: " + " ".join(f"{k}={v:.4f}" for k, v in state.val.items())
                + f" ({state.epoch_seconds:.1f} s)")
    state.epoch, state.step, state.evaluated, data.earlier = state.epoch + 1, 0, True, ()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: ShardLoader, device: torch.device,
             precision: str | None) -> tuple[dict[str, float], tuple[torch.Tensor, torch.Tensor]]:
    """Loss, accuracy, AUC and rejections on ``loader``'s split, gathered over all ranks; and the ROC (fpr, tpr)."""
    model.eval()
    metrics = JetMetrics(device)
    for batches, (inputs, label) in enumerate(loader.epoch(0), 1):
        logits = forward_logits(model, inputs, precision)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, label)
        metrics.update(logits, label, loss)
        trim_every(batches, SCORING_TRIM_EVERY)
    model.train()
    return metrics.compute(), metrics.roc_curve()
