"""``qgdist bench train``: how Ray Train DDP scales from 1 worker to N, and what Ray costs to start.

Every run is Ray Train (``fit``) on the same model and data with the same per-worker batch ``B`` and the same
per-worker torch threads; only the number of workers changes (1 vs ``--workers``, default 2), so the global batch
grows with the workers (weak scaling, as adding GPUs does). The two configurations run ``--repeats`` times,
interleaved (1, N, N, 1, 1, N, ...), so a change of load on a shared machine hits both alike.

Throughput T(w) is the loop's own steady-state figure: global jets/s after the first steps of the epoch, evaluation
and start-up excluded. Reported:

* T(1) and T(N): median and range over the repeats;
* scaling efficiency = T(N) / (N x T(1)) of the medians (1.0: perfect; the all-reduce, and on a CPU machine the
  workers' competition for cores and memory bandwidth, take it below), and the same ratio per interleaved pair;
* the machine's own ceiling (``--ceiling``, on by default): the same work without Ray and without DDP -- the plain
  loop (``qgdist.train.loop.train``, same model, data, batch and threads) in one process alone, then in N
  processes at once, interleaved with the same repeats; ceiling = sum of the N concurrent rates / (N x the lone
  rate). A data-parallel run does this work plus its synchronisation, so it should not beat the ceiling (shared
  caches, memory bandwidth, the hypervisor set it);
  DDP's own cost is the rest, efficiency / ceiling;
* Ray's fixed start-up cost, separately: ``ray.init`` (once; with ``$RAY_ADDRESS`` set, the join of that cluster),
  and per run the time from ``fit()`` to the first training step (workers, process group, dataset open), with
  ``fit()``'s total for scale;
* the load average before and after, since the figures mean little on a busy machine without it.

Workers need ``threads`` CPUs each: N x threads must not exceed the CPUs Ray sees, or the N-worker runs queue.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from qgdist.bench import joined_ray
from qgdist.core.config import option
from qgdist.core.errors import QgdistError


@dataclass(frozen=True)
class TrainBenchConfig:
    """``qgdist bench train`` settings."""

    data: str | None = option(None, "converted dataset (default: toy clouds)")
    model: str = option("particlenet-lite", "model to train (qgdist.models)")
    jets: int = option(16000, "toy clouds when no --data is given (at 4000, 2 workers ran 8 steady steps)",
                       min=1)
    workers: int = option(2, "workers of the scaled configuration, compared with 1 worker", min=2)
    batch_size: int = option(128, "per worker, in both configurations", min=1)
    threads: int = option(1, "torch threads (and Ray CPUs) per worker, in both configurations", min=1)
    repeats: int = option(3, "runs of each configuration, interleaved", min=1)
    epochs: int = option(1, "epochs of each run (validation runs after every epoch)", min=1)
    ceiling: bool = option(True, "also measure the machine's ceiling: N plain-loop processes at once vs one alone")
    model_kwargs: dict[str, Any] = option({}, "extra model setting (e.g. a tiny model for a smoke run)",
                                          flag="--model-arg")


def _worker_with_threads(threads: int) -> Callable[[dict[str, Any]], None]:
    """The product's worker loop with torch's intra-op threads pinned, so 1 and N workers compute alike."""

    def worker(config: dict[str, Any]) -> None:
        import torch

        from qgdist.train.ray_trainer import worker_loop

        torch.set_num_threads(threads)
        worker_loop(config)

    return worker


def _order(repeats: int, workers: int) -> list[int]:
    """1, N, N, 1, 1, N, ...: each configuration goes first in every other pair."""
    pairs = [(1, workers) if r % 2 == 0 else (workers, 1) for r in range(repeats)]
    return [w for pair in pairs for w in pair]


def steady_rate(history: dict[str, list[list[float]]], run: str) -> float:
    """The run's steady-state jets/s (the training loop times the steps after its warm-up ones); an epoch too short
    to have any is a ``QgdistError`` saying so, not a ``KeyError``."""
    rates = history.get("train/jets_per_s")
    if not rates:
        raise QgdistError(f"jets: an epoch over {run} is too short to time past its warm-up steps; "
                          "give more --jets or a smaller --batch-size")
    return rates[-1][1]


def _check_long_enough(data: str, cfg: TrainBenchConfig) -> None:
    """Refuse, before any run, an epoch too short for the loop to time past its warm-up steps."""
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.train.loop import WARMUP_STEPS

    jets = read_manifest(data).splits["train"]["samples"]
    steps = jets // (cfg.batch_size * cfg.workers)
    if steps <= WARMUP_STEPS:
        raise QgdistError(f"jets: {jets} train jets give {steps} steps per epoch on {cfg.workers} "
                          f"workers x {cfg.batch_size} jets; the first {WARMUP_STEPS} are warm-up, not timed: give "
                          "more --jets or a smaller --batch-size")


def _plain(data: str, model: str, batch_size: int, threads: int, epochs: int, storage: str, name: str,
           model_kwargs: str) -> dict[str, float]:
    """The plain loop (no Ray, no DDP) in this process, ``threads`` torch threads: its steady-state jets/s."""
    import torch

    from qgdist.train.config import TrainConfig, resolve
    from qgdist.train.loop import train

    torch.set_num_threads(threads)
    cfg = resolve(TrainConfig.of(data=data, model=model, model_kwargs=json.loads(model_kwargs), epochs=epochs,
                                 storage=storage, run_name=name, workers=0, batch_size=batch_size, track=False,
                                 progress=False, checkpoint_every=0))
    return {"jets_per_s": steady_rate(train(cfg).history, f"{data} ({batch_size} jets per step)")}


def _plain_at_once(cfg: TrainBenchConfig, data: str, storage: str, processes: int, tag: str) -> list[float]:
    """``processes`` plain-loop processes started together; each one's jets/s."""
    args = [data, cfg.model, str(cfg.batch_size), str(cfg.threads), str(cfg.epochs), storage]
    procs = [subprocess.Popen([sys.executable, "-m", "qgdist.bench.train", "_plain", *args, f"{tag}-{i}",
                               json.dumps(cfg.model_kwargs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
    rates = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode:
            raise RuntimeError(f"plain-loop process failed:\n{err[-3000:]}")
        rates.append(json.loads(out.strip().splitlines()[-1])["jets_per_s"])
    return rates


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):9.0f} jets/s (range {min(values):.0f}-{max(values):.0f})"


def run(cfg: TrainBenchConfig) -> dict[str, Any]:
    """Run both configurations ``repeats`` times, interleaved; print and return the figures."""
    import ray

    from qgdist.core.ray import ensure_ray
    from qgdist.pipelines.toy_data import toy_dataset
    from qgdist.train.config import TrainConfig, resolve
    from qgdist.train.ray_trainer import fit

    n = cfg.workers
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="qgdist-bench-train-") as tmp:
        data = cfg.data or toy_dataset("cloud", cfg.jets, tmp)
        _check_long_enough(data, cfg)
        t = time.time()
        ensure_ray()
        ray_init = time.time() - t
        cpus = ray.cluster_resources().get("CPU", 0)
        if n * cfg.threads > cpus:
            print(f"warning: {n} workers x {cfg.threads} thread(s) > {cpus:.0f} CPUs Ray sees: "
                  "the scaled runs will queue or share cores")
        runs: list[dict[str, float]] = []
        alone: list[float] = []
        together: list[float] = []
        for i, workers in enumerate(_order(cfg.repeats, n)):
            if cfg.ceiling:   # interleaved with the Ray runs: 1 alone before a 1-worker run, N at once before N
                rates = _plain_at_once(cfg, data, tmp, workers, f"plain{workers}-{i}")
                (alone if workers == 1 else together).append(sum(rates))
            tcfg = resolve(TrainConfig.of(
                data=data, model=cfg.model, model_kwargs=cfg.model_kwargs, epochs=cfg.epochs, storage=tmp,
                run_name=f"w{workers}-{i}", workers=workers, batch_size=cfg.batch_size,
                cpus_per_worker=float(cfg.threads), max_failures=0, track=False, progress=False,
                checkpoint_every=0))
            t = time.time()
            out = fit(tcfg, worker_fn=_worker_with_threads(cfg.threads))
            total = time.time() - t
            runs.append({"workers": workers,
                         "jets_per_s": steady_rate(out.history, f"{data} ({workers} workers x {cfg.batch_size} jets)"),
                         "fit_to_first_step_s": (out.started_unix or float("nan")) - t, "fit_total_s": total})
        ray.shutdown()
    load_after = os.getloadavg()

    def of(w: int, key: str) -> list[float]:
        return [r[key] for r in runs if r["workers"] == w]

    t1, tn = of(1, "jets_per_s"), of(n, "jets_per_s")
    efficiency = statistics.median(tn) / (n * statistics.median(t1))
    paired = [b / (n * a) for a, b in zip(t1, tn)]
    row = {"t1_jets_s": statistics.median(t1), f"t{n}_jets_s": statistics.median(tn), "scaling_efficiency": efficiency,
           "scaling_efficiency_per_pair": paired, "ray_init_s": ray_init,
           "fit_to_first_step_s": {w: statistics.median(of(w, "fit_to_first_step_s")) for w in (1, n)},
           "fit_total_s": {w: statistics.median(of(w, "fit_total_s")) for w in (1, n)},
           "load_before": load_before, "load_after": load_after, "runs": runs}
    if cfg.ceiling:
        ceiling = statistics.median(together) / (n * statistics.median(alone))
        row |= {"plain_alone_jets_s": alone, f"plain_{n}_at_once_jets_s": together, "ceiling": ceiling,
                "efficiency_over_ceiling": efficiency / ceiling}
    print(f"model {cfg.model}, batch {cfg.batch_size} per worker, {cfg.threads} thread(s) per worker, "
          f"{cfg.epochs} epoch(s), {cfg.repeats} interleaved repeats")
    print(f"  T(1)  1 worker   {_spread(t1)}   first step {row['fit_to_first_step_s'][1]:5.1f} s after fit()")
    print(f"  T({n})  {n} workers  {_spread(tn)}   first step {row['fit_to_first_step_s'][n]:5.1f} s after fit()")
    print(f"  scaling efficiency T({n}) / ({n} x T(1)) = {efficiency:.2f}  (per pair: "
          + ", ".join(f"{e:.2f}" for e in paired) + ")")
    if cfg.ceiling:
        print(f"  machine ceiling (plain loop, no Ray, no DDP): 1 process {_spread(alone)}, {n} at once "
              f"{_spread(together)} in all -> {row['ceiling']:.2f}; DDP keeps {row['efficiency_over_ceiling']:.2f} "
              "of it")
    joined = joined_ray()
    if joined:
        print(f"  {joined}")
    print(f"  Ray fixed cost: ray.init {ray_init:.1f} s; fit() to first step {row['fit_to_first_step_s'][1]:.1f} s "
          f"(1 worker) / {row['fit_to_first_step_s'][n]:.1f} s ({n}); fit() total {row['fit_total_s'][1]:.1f} / "
          f"{row['fit_total_s'][n]:.1f} s")
    print("  load average (1/5/15 min) before " + "/".join(f"{x:.2f}" for x in load_before)
          + ", after " + "/".join(f"{x:.2f}" for x in load_after) + f"; {os.cpu_count()} CPUs")
    return row


if __name__ == "__main__":   # the plain-loop processes of the ceiling
    if sys.argv[1] == "_plain":
        a = sys.argv[2:]
        print(json.dumps(_plain(a[0], a[1], int(a[2]), int(a[3]), int(a[4]), a[5], a[6], a[7])))
