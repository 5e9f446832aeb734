"""``qgdist bench scale``: every stage on data bigger than its memory, at several scales, optionally under a cap.

For each cloud scale (``--jets``, e.g. ``100000,1000000,2000000``) and each image scale (``--images``) it runs each
stage as its own measured process tree (``qgdist.bench.memory``), inside ``--mem-cap`` GB when given (a cgroup of
its own, ``qgdist.bench.memcap``; an out-of-memory kill there is a failed stage):

clouds
  1. **generate**: toy EnergyFlow npz files of ``--jets-per-file`` (the public files hold 100k), deflated;
  2. **convert**: ``qgdist.data.convert`` on a private local Ray of ``--workers`` CPUs (Ray's start apart);
  3. **train**: ``qgdist train`` of ``--model`` with ``--workers`` Ray workers for one whole epoch (or
     ``--train-steps``), SIGKILLed (its process group) a few seconds after its first checkpoint past half way and
     run again to resume and finish (``--no-kill``: one run); throughput from the MLflow run's logged steps;
  4. **evaluate**: ``qgdist evaluate`` of the test split;
  5. **predict**: ``qgdist predict`` of every raw npz row (deflated files: one streaming reader each, scored by
     ``--workers`` actors), ``--score-seen-jets``;

images
  1. **generate** CMS parquet files of ``--images-per-file``; 2. **convert**; 3. **train** ``--image-model`` for
  ``--image-train-steps`` steps (a slice of an epoch).

Rows in = written = scored is checked (convert's manifest and predict's summary against the rows generated).
Per stage and scale: rows, rows/s of the work itself, wall time, bytes, the tree's peak PSS, the largest process's
peak RSS mark and, under a cap, the cgroup's peak anonymous + shared memory (Ray's object store included) and its
out-of-memory kills; then each larger scale's ratios to the smallest. ``bench_scale.json`` is rewritten after
every stage, with the load average before and after each.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from qgdist.bench import comma_ints, load_average
from qgdist.core.config import option
from qgdist.core.errors import QgdistError

T0 = time.perf_counter()   # child entry points count their work from after their imports
STAGES = ("generate", "convert", "train", "evaluate", "predict")


@dataclass(frozen=True)
class BenchScaleConfig:
    """``qgdist bench scale`` settings."""

    jets: tuple[int, ...] = option((100_000, 1_000_000), "toy clouds (EnergyFlow format) per scale, comma-separated "
                                   "(0 or empty: none)", parse=comma_ints, metavar="N,N,...", min=0)
    images: tuple[int, ...] = option((10_000, 100_000), "toy images (CMS format) per scale", parse=comma_ints,
                                     metavar="N,N,...", min=0)
    mem_cap: float | None = option(None, "run every stage inside this many GB (cgroup v1 or v2 where writable, "
                                         "else a PSS watchdog); an out-of-memory kill fails the stage", gt=0)
    jets_per_file: int = option(100_000, "clouds per npz file (the public files hold 100k)", min=1)
    images_per_file: int = option(10_000, "images per parquet file", min=1)
    model: str = option("particlenet-lite", "cloud model trained, evaluated and used to predict")
    train_steps: int = option(0, "cloud training steps (0: one whole epoch)", min=0)
    kill: bool = option(True, "SIGKILL the cloud training past half way and resume it")
    image_model: str = option("resnet15", "image model trained on a slice of an epoch")
    image_train_steps: int = option(40, "image training steps (a slice of an epoch; 0: skip)", min=0)
    image_batch_size: int = option(64, "images per worker and step", min=1)
    until: Literal["generate", "convert", "train", "evaluate", "predict"] = option(
        "predict", "last stage to run at each scale (the stages run in order, each needs the ones before)")
    batch_size: int = option(256, "jets per worker and step", min=1)
    workers: int = option(2, "Ray CPUs for conversion, training workers and scoring actors", min=1)
    workdir: str = option("runs/bench_scale", "data, runs, scores and bench_scale.json")


# -- child entry points (each runs in its own measured process) -------------------------------------------------------
def _generate(fmt: str, jets: str, per_file: str, out: str, seed: str) -> dict[str, Any]:
    """Toy files of ``fmt`` holding ``jets`` jets in all."""
    from qgdist.pipelines.toy_data import toy_file

    start, n, files = time.perf_counter(), int(jets), []
    ext = "npz" if fmt == "energyflow" else "parquet"
    for i, lo in enumerate(range(0, n, int(per_file))):
        files.append(toy_file(fmt, min(int(per_file), n - lo), os.path.join(out, f"toy-{i:05d}.{ext}"),
                              seed=int(seed) * 1000 + i))
    return {"rows": n, "loop_s": time.perf_counter() - start, "startup_s": start - T0,
            "bytes_out": sum(os.path.getsize(f) for f in files)}


def _convert(source: str, out: str, cpus: str, *inputs: str) -> dict[str, Any]:
    """``qgdist convert`` on a private Ray of ``cpus`` CPUs; Ray's start and workers' imports are start-up."""
    import ray

    from qgdist.bench.convert_methods import _warm_worker
    from qgdist.core.ray import ensure_ray
    from qgdist.data.convert import ConvertConfig, convert

    t = time.perf_counter()
    ensure_ray(None, int(cpus), dashboard=False)   # as `qgdist convert` starts it
    warm = ray.remote(num_cpus=1)(_warm_worker)
    ray.get([warm.remote() for _ in range(int(cpus))])
    ray_s = time.perf_counter() - t
    t = time.perf_counter()
    m = convert(ConvertConfig(source=source, inputs=list(inputs), out=out, executor="ray", progress=False))
    return {"rows": m.rows["in"], "written": m.rows["written"], "rejected": m.rows["rejected"],
            "train_rows": m.splits.get("train", {}).get("samples", 0), "shards": len(m.shards),
            "loop_s": time.perf_counter() - t, "startup_s": t - T0, "ray_start_s": ray_s,
            "bytes_in": sum(os.path.getsize(f) for f in inputs), "bytes_out": sum(s.bytes for s in m.shards)}


CHILDREN = {"_generate": _generate, "_convert": _convert}


# -- stages -----------------------------------------------------------------------------------------------------------
class StageFailed(QgdistError, RuntimeError):
    """A stage exited non-zero or was killed for want of memory; its figures are in ``result``."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


def _measure(cfg: BenchScaleConfig, cmd: list[str], **kw: Any) -> dict[str, Any]:
    """``measure_tree`` under the cap; a non-zero exit or an out-of-memory kill raises ``StageFailed``."""
    from qgdist.bench.memory import measure_tree

    run = measure_tree(cmd, mem_cap=int(cfg.mem_cap * 1e9) if cfg.mem_cap else None, **kw)
    if (run["returncode"] != 0 and not run["killed"]) or run.get("oom_kills"):
        why = f"{run.get('oom_kills')} out-of-memory kills" if run.get("oom_kills") else f"exit {run['returncode']}"
        raise StageFailed(f"{' '.join(cmd[:4])}...: {why}\n{run['stderr'][-2000:]}", _memory(run))
    return run


def _memory(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("wall_s", "peak_pss_mb", "max_hwm_mb", "sum_hwm_mb", "hwm_mb_by_process", "cap_mb", "cap_method",
            "peak_anon_shmem_mb", "peak_shmem_mb", "peak_cgroup_mb", "oom_kills", "timeline")
    return {k: run[k] for k in keys if k in run}


def _child(cfg: BenchScaleConfig, name: str, *args: str) -> dict[str, Any]:
    run = _measure(cfg, [sys.executable, "-m", "qgdist.bench.scale", name, *args])
    return json.loads(run["stdout"].strip().splitlines()[-1]) | _memory(run)


def _logged_steps(run_dir: str) -> list[tuple[int, float]]:
    """(global step, unix seconds) of every train-loss point of the run's MLflow store, read with mlflow's client."""
    from mlflow import MlflowClient

    from qgdist.track.tracker import local_store_uri

    client = MlflowClient(tracking_uri=local_store_uri(run_dir))
    run = client.search_runs([client.get_experiment_by_name("qgdist").experiment_id])[0]
    return sorted((m.step, m.timestamp / 1000) for m in client.get_metric_history(run.info.run_id, "train/loss"))


def _train(cfg: BenchScaleConfig, data: str, root: Path, model: str, steps: int, kill: bool,
           train_rows: int, batch_size: int) -> dict[str, Any]:
    """Train ``steps`` steps (0: one epoch); with ``kill``, SIGKILL it past half way and resume it to the end."""
    from qgdist.core.run import Run

    name = f"scale-{model}"
    run = Run.at(str(root / "runs"), name)
    run_dir = Path(run.location)
    jets_per_step = batch_size * cfg.workers
    planned = steps or max(1, train_rows // jets_per_step)   # an epoch: the smallest loader slot may cut a few
    every = max(1, planned // 4)
    cmd = [sys.executable, "-m", "qgdist", "train", "--data", data, "--model", model, "--workers",
           str(cfg.workers), "--epochs", "1", "--batch-size", str(batch_size), "--checkpoint-every", str(every),
           "--log-every", "5", "--storage", str(root / "runs"), "--run-name", name, "--no-progress",
           "--max-failures", "0"] + (["--max-steps", str(steps)] if steps else [])
    pointer = run.pointer()
    seen: dict[str, float] = {}

    def past_half() -> bool:   # a few seconds after the first checkpoint past half way: some work to redo
        if "at" not in seen and pointer.exists() and json.loads(pointer.read_text())["global_step"] >= every * 2:
            seen["at"] = time.time()
        return "at" in seen and time.time() - seen["at"] > 5

    env = {"RAY_ADDRESS": ""}
    runs, extra = [], {}
    if kill:
        first = _measure(cfg, cmd, env=env, kill_when=past_half)
        if not first["killed"]:
            raise StageFailed(f"training was not killed (exit {first['returncode']})", _memory(first))
        runs.append(first)
        killed_at = time.time()
        extra = {"checkpoint_step": json.loads(pointer.read_text())["global_step"],
                 "last_logged_before_kill": max((p[0] for p in _logged_steps(str(run_dir)) if p[1] <= killed_at),
                                                default=None)}
    restart = time.time()
    runs.append(_measure(cfg, cmd, env=env))
    points = _logged_steps(str(run_dir))
    before, after = [p for p in points if p[1] <= restart], [p for p in points if p[1] > restart]
    rates = [(b[-1][0] - b[0][0]) * jets_per_step / (b[-1][1] - b[0][1]) for b in (before, after) if len(b) > 1]
    final = json.loads(pointer.read_text())["global_step"]
    extra["resume_to_first_step_s"] = after[0][1] - restart if kill and after else None
    return {"rows": final * jets_per_step, "steps": final, "loop_s": None, "train_rows": train_rows,
            "rows_per_s": sum(rates) / len(rates) if rates else float("nan"), "run_dir": str(run_dir),
            **extra, **_combined(runs)}


def _combined(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of a stage run as several commands: wall times add up, peaks are the largest, timelines
    follow one another (each command's seconds after the wall time of those before it)."""
    out = _memory(runs[-1])
    out["wall_s"] = sum(r["wall_s"] for r in runs)
    if all("timeline" in r for r in runs):
        out["timeline"] = {k: [] for k in runs[-1]["timeline"]}
        offset = 0.0
        for r in runs:
            for k, values in r["timeline"].items():
                out["timeline"][k] += [round(v + offset, 2) for v in values] if k == "s" else values
            offset += r["wall_s"]
    for k in ("peak_pss_mb", "max_hwm_mb", "sum_hwm_mb", "peak_anon_shmem_mb", "peak_cgroup_mb", "oom_kills"):
        if k in out:
            out[k] = max(r.get(k, 0) for r in runs)
    return out


def _evaluate(cfg: BenchScaleConfig, checkpoint: str, data: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "qgdist", "evaluate", "--checkpoint", checkpoint, "--data", data, "--split", "test",
           "--out", str(out), "--no-progress"]
    run = _measure(cfg, cmd)
    metrics = json.loads((out / "metrics.json").read_text())
    scored = run["wall_s"]
    return {"rows": metrics["n_jets"], "loop_s": scored, "auc": metrics.get("auc")} | _memory(run)


def _predict(cfg: BenchScaleConfig, checkpoint: str, data: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "qgdist", "predict", "--checkpoint", checkpoint, "--data", data, "--out", str(out),
           "--workers", str(cfg.workers), "--num-cpus", str(cfg.workers), "--no-progress", "--score-seen-jets"]
    run = _measure(cfg, cmd, env={"RAY_ADDRESS": ""})
    summary = json.loads((out / "summary.json").read_text())
    parts = glob.glob(str(out / "part-*.parquet"))
    return {"rows": summary["rows_in"], "scored": summary["jets"], "rejected": summary["rejected"],
            "rows_per_s": summary["jets_per_s"], "ray_start_s": summary["ray_seconds"],
            "bytes_out": sum(os.path.getsize(p) for p in parts), "auc": summary.get("metrics", {}).get("auc")} | _memory(run)


def _after(cfg: BenchScaleConfig, done: str) -> bool:
    """Is ``done`` the last stage to run?"""
    return STAGES.index(cfg.until) <= STAGES.index(done)


def _clouds(cfg: BenchScaleConfig, jets: int, root: Path, stage: Any) -> None:
    raw, shards = root / "ef", str(root / "shards-ef")
    gen = stage("generate clouds", lambda: _child(cfg, "_generate", "energyflow", str(jets), str(cfg.jets_per_file),
                                                  str(raw), "1"))
    if _after(cfg, "generate"):
        return
    conv = stage("convert clouds", lambda: _child(cfg, "_convert", "energyflow", shards, str(cfg.workers),
                                                  *sorted(glob.glob(str(raw / "*.npz")))))
    if conv["rows"] != gen["rows"] or conv["written"] + conv["rejected"] != conv["rows"]:
        raise RuntimeError(f"convert clouds: {gen['rows']} generated, {conv['rows']} in, {conv['written']} written")
    if _after(cfg, "convert"):
        return
    train = stage("train clouds", lambda: _train(cfg, shards, root, cfg.model, cfg.train_steps, cfg.kill,
                                                 conv["train_rows"], cfg.batch_size))
    if _after(cfg, "train"):
        return
    stage("evaluate clouds", lambda: _evaluate(cfg, train["run_dir"], shards, root / "eval-ef"))
    if _after(cfg, "evaluate"):
        return
    pred = stage("predict clouds", lambda: _predict(cfg, train["run_dir"], str(raw), root / "scores-ef"))
    if not pred["rows"] == pred["scored"] == conv["written"]:
        raise RuntimeError(f"predict clouds: {pred['rows']} in, {pred['scored']} scored, {conv['written']} written")


def _images(cfg: BenchScaleConfig, images: int, root: Path, stage: Any) -> None:
    raw, shards = root / "cms", str(root / "shards-cms")
    gen = stage("generate images", lambda: _child(cfg, "_generate", "cms", str(images), str(cfg.images_per_file),
                                                  str(raw), "2"))
    if _after(cfg, "generate"):
        return
    conv = stage("convert images", lambda: _child(cfg, "_convert", "cms", shards, str(cfg.workers),
                                                  *sorted(glob.glob(str(raw / "*.parquet")))))
    if conv["rows"] != gen["rows"] or conv["written"] + conv["rejected"] != conv["rows"]:
        raise RuntimeError(f"convert images: {gen['rows']} generated, {conv['rows']} in, {conv['written']} written")
    if cfg.image_train_steps and not _after(cfg, "convert"):
        stage("train images", lambda: _train(cfg, shards, root, cfg.image_model, cfg.image_train_steps, False,
                                             conv["train_rows"], cfg.image_batch_size))


def run(cfg: BenchScaleConfig) -> dict[str, Any]:
    """Every scale, smallest first; prints each stage as it ends and the table at the end; writes
    ``workdir/bench_scale.json`` after every stage. Returns the results (``failed`` lists failed stages)."""
    import shutil
    import signal

    from qgdist.core.atomic import write_json

    # a SIGTERM (kill, a job scheduler) unwinds like Ctrl-C, so the running stage's cgroup and processes go too
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": asdict(cfg), "rows": [], "failed": [], "load": [load_average()]}

    def save() -> None:   # after every stage, so that a bench stopped midway leaves what it measured
        write_json(work / "bench_scale.json", results)
        plot_memory(results, work / MEMORY_PLOT)

    for kind, scales, body in (("clouds", cfg.jets, _clouds), ("images", cfg.images, _images)):
        for n in sorted(s for s in scales if s > 0):
            root = work / f"{kind}-{n}"
            shutil.rmtree(root, ignore_errors=True)
            print(f"{kind}: {n:,}", flush=True)

            def stage(name: str, fn: Any, n: int = n) -> dict[str, Any]:
                load = load_average()
                try:
                    result = fn()
                except StageFailed as err:
                    results["rows"].append({"stage": name, "scale": n, "failed": str(err)[:300], **err.result})
                    results["failed"].append(f"{name} at {n:,}")
                    save()
                    raise
                results["rows"].append({"stage": name, "scale": n, "load_before": load, "load_after": load_average(),
                                        **{k: v for k, v in result.items() if k not in BULKY},
                                        **{k: result.get(k) for k in BULKY}})
                save()
                print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                                for k, v in result.items() if k not in ("run_dir", *BULKY)),
                      flush=True)
                return result

            try:
                body(cfg, n, root, stage)
            except StageFailed as err:
                print(f"  FAILED: {err}", flush=True)
    results["load"].append(load_average())
    write_json(work / "bench_scale.json", results)
    print(table(results))
    return results


#: Per-stage results too long to print: per-process peaks and the memory timeline (kept in bench_scale.json).
BULKY = ("hwm_mb_by_process", "timeline")
#: The plot of every stage's memory over time, beside bench_scale.json.
MEMORY_PLOT = "bench_scale_memory.png"


def plot_memory(results: dict[str, Any], path: Path) -> Path:
    """One panel per stage: its memory over its run at each scale (the capped memory where there was a cap,
    else the tree's summed PSS), the cap dashed: where in a stage its peak came, and how close to the cap."""
    from qgdist.train.plots import plot_panels

    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    caps: dict[str, float] = {}
    for r in results["rows"]:
        line = r.get("timeline")
        if not line:
            continue
        capped = all(v is not None for v in line["capped_mb"])
        label = f"{r['scale']:,}" + (" (FAILED)" if "failed" in r else "")
        panels.setdefault(r["stage"], {})[label] = (line["s"], line["capped_mb"] if capped else line["pss_mb"])
        if r.get("cap_mb"):
            caps[r["stage"]] = r["cap_mb"]
    return plot_panels(panels, path, xlabel="seconds into the stage", ylabel="MB (capped memory, else PSS)",
                       limits=caps)


def _rate(r: dict[str, Any]) -> float:
    return r.get("rows_per_s") or r["rows"] / r["loop_s"]


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per stage and scale, then each larger scale's ratios to the stage's smallest."""
    lines = ["| stage | rows | rows/s | wall s | peak PSS MB | max proc HWM MB | peak anon+shm MB | cap MB | OOM kills "
             "| load before / after |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for r in results["rows"]:
        if "failed" in r:
            lines.append(f"| {r['stage']} | {r['scale']:,} | FAILED | {r.get('wall_s', 0):.0f} | "
                         f"{r.get('peak_pss_mb', 0):,.0f} | {r.get('max_hwm_mb', 0):,.0f} | "
                         f"{r.get('peak_anon_shmem_mb', 0):,.0f} | {r.get('cap_mb') or 0:,.0f} | "
                         f"{r.get('oom_kills', '')} | |")
            continue
        by_stage.setdefault(r["stage"], []).append(r)
        anon = f"{r['peak_anon_shmem_mb']:,.0f}" if "peak_anon_shmem_mb" in r else "-"
        cap = f"{r['cap_mb']:,.0f}" if r.get("cap_mb") else "-"
        lines.append(f"| {r['stage']} | {r['rows']:,} | {_rate(r):,.0f} | {r['wall_s']:.0f} | {r['peak_pss_mb']:,.0f} "
                     f"| {r['max_hwm_mb']:,.0f} | {anon} | {cap} | {r.get('oom_kills', '-')} | "
                     f"{r['load_before'].split()[0]} / {r['load_after'].split()[0]} |")
    lines += ["", "| stage | scales | rows/s ratio | peak PSS ratio | max proc HWM ratio | anon+shm ratio |",
              "|---|---|---|---|---|---|"]
    for name, rows in by_stage.items():
        a = rows[0]
        for b in rows[1:]:   # every larger scale against the smallest (1x): 10x and 20x read off directly
            anon = f"{b['peak_anon_shmem_mb'] / a['peak_anon_shmem_mb']:.2f}" if a.get("peak_anon_shmem_mb") else "-"
            lines.append(f"| {name} | {b['scale']:,} / {a['scale']:,} | {_rate(b) / _rate(a):.2f} | "
                         f"{b['peak_pss_mb'] / a['peak_pss_mb']:.2f} | {b['max_hwm_mb'] / a['max_hwm_mb']:.2f} | "
                         f"{anon} |")
    if results["failed"]:
        lines.append("\nFAILED: " + "; ".join(results["failed"]))
    return "\n".join(lines)


if __name__ == "__main__":  # child entry points, each run in its own process by ``_child``
    print(json.dumps(CHILDREN[sys.argv[1]](*sys.argv[2:])), flush=True)
