"""``qgdist bench scale``: a million jets through the whole pipeline on one machine, next to a tenth of that.

For each scale (``--small`` x and 1x of ``--jets`` clouds and ``--images`` images) it runs, each stage as its own
measured process tree (``qgdist.bench.memory``):

1. **generate**: toy jets in the EnergyFlow npz format (files of ``--jets-per-file``, as the public files hold
   100k) and in the CMS parquet format (files of ``--images-per-file``);
2. **convert**: ``qgdist.data.convert`` on a private local Ray with ``--workers`` CPUs; Ray's start (and its
   workers' imports) reported apart from the conversion;
3. **train**: ``qgdist train`` (Ray Train, ``--workers`` workers) of ``--model`` for ``--train-steps`` steps -- a
   slice of an epoch -- SIGKILLed (its whole process group: a lost machine) a few seconds after its first
   checkpoint past half way, then run again to resume and finish; throughput from the MLflow run's logged steps;
   the cost of the kill is reported as the steps redone and the resumed run's time to its first new step;
4. **score**: ``qgdist predict`` of every cloud with the trained checkpoint (and, with ``--score-images``, every
   image with a ResNet-15 checkpoint of one step: throughput does not depend on the weights).

Per stage and scale: rows, rows/s of the work itself, start-up (wall time minus rows / rows/s: interpreter, imports,
Ray, model building, and for training the kill and restart), wall time, bytes in and out, the tree's peak PSS and
the largest process's peak RSS mark; then the large/small ratios (memory should stay flat, throughput steady).
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qgdist.core.config import option

T0 = time.perf_counter()   # child entry points count their work from after their imports


@dataclass(frozen=True)
class BenchScaleConfig:
    """``qgdist bench scale`` settings."""

    jets: int = option(1_000_000, "toy clouds (EnergyFlow format) at full scale", min=1)
    images: int = option(100_000, "toy images (CMS format) at full scale", min=1)
    small: float = option(0.1, "the small run's fraction of the full scale", gt=0, lt=1)
    jets_per_file: int = option(100_000, "clouds per npz file (the public files hold 100k)", min=1)
    images_per_file: int = option(10_000, "images per parquet file", min=1)
    model: str = option("particlenet-lite", "cloud model trained and scored")
    train_steps: int = option(120, "training steps (a slice of the small scale's first epoch), killed and "
                                   "resumed past half way", min=2)
    batch_size: int = option(256, "jets per worker and step", min=1)
    workers: int = option(2, "Ray CPUs for conversion, training workers and scoring actors", min=1)
    score_images: bool = option(True, "also score the images (ResNet-15; slow on CPUs)")
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
    ensure_ray(None, int(cpus))
    warm = ray.remote(num_cpus=1)(_warm_worker)
    ray.get([warm.remote() for _ in range(int(cpus))])
    ray_s = time.perf_counter() - t
    t = time.perf_counter()
    m = convert(ConvertConfig(source=source, inputs=list(inputs), out=out, executor="ray", progress=False))
    return {"rows": m.rows["in"], "written": m.rows["written"], "rejected": m.rows["rejected"],
            "loop_s": time.perf_counter() - t, "startup_s": t - T0, "ray_start_s": ray_s,
            "bytes_in": sum(os.path.getsize(f) for f in inputs), "bytes_out": sum(s.bytes for s in m.shards)}


CHILDREN = {"_generate": _generate, "_convert": _convert}


# -- stages -----------------------------------------------------------------------------------------------------------
def _child(name: str, *args: str) -> dict[str, Any]:
    from qgdist.bench.memory import measure_tree

    cmd = [sys.executable, "-m", "qgdist.bench.scale", name, *args]
    run = measure_tree(cmd, check=True)
    return json.loads(run["stdout"].strip().splitlines()[-1]) | _memory(run)


def _memory(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in ("wall_s", "peak_pss_mb", "max_hwm_mb", "sum_hwm_mb", "hwm_mb_by_process")}


def _logged_steps(run_dir: str) -> list[tuple[int, float]]:
    """(global step, unix seconds) of every train-loss point of the run's MLflow store, read with mlflow's client."""
    from mlflow import MlflowClient

    from qgdist.track.tracker import local_store_uri

    client = MlflowClient(tracking_uri=local_store_uri(run_dir))
    run = client.search_runs([client.get_experiment_by_name("qgdist").experiment_id])[0]
    return sorted((m.step, m.timestamp / 1000) for m in client.get_metric_history(run.info.run_id, "train/loss"))


def _train(cfg: BenchScaleConfig, data: str, root: Path) -> dict[str, Any]:
    """Train a slice of an epoch, SIGKILL it past half way, resume it to the end."""
    from qgdist.bench.memory import measure_tree
    from qgdist.core.run import Run

    run = Run.at(str(root / "runs"), "scale")
    run_dir = Path(run.location)
    every = max(1, cfg.train_steps // 4)
    cmd = [sys.executable, "-m", "qgdist", "train", "--data", data, "--model", cfg.model, "--workers",
           str(cfg.workers), "--epochs", "1", "--max-steps", str(cfg.train_steps), "--batch-size", str(cfg.batch_size),
           "--checkpoint-every", str(every), "--log-every", "5", "--storage", str(root / "runs"), "--run-name", "scale",
           "--no-progress", "--max-failures", "0"]
    pointer = run.pointer()
    seen: dict[str, float] = {}

    def past_half() -> bool:   # a few seconds after the first checkpoint past half way: some work to redo
        if "at" not in seen and pointer.exists() and json.loads(pointer.read_text())["global_step"] >= every * 2:
            seen["at"] = time.time()
        return "at" in seen and time.time() - seen["at"] > 5

    env = {"RAY_ADDRESS": ""}
    first = measure_tree(cmd, env=env, kill_when=past_half)
    if not first["killed"]:
        raise RuntimeError(f"training was not killed (exit {first['returncode']}):\n{first['stderr'][-3000:]}")
    killed_at = time.time()
    checkpoint_step = json.loads(pointer.read_text())["global_step"]
    before = [p for p in _logged_steps(str(run_dir)) if p[1] <= killed_at]
    restart = time.time()
    second = measure_tree(cmd, env=env, check=True)
    points = _logged_steps(str(run_dir))
    after = [p for p in points if p[1] > restart]
    jets_per_step = cfg.batch_size * cfg.workers
    rates = [(b[-1][0] - b[0][0]) * jets_per_step / (b[-1][1] - b[0][1]) for b in (before, after) if len(b) > 1]
    return {"rows": cfg.train_steps * jets_per_step, "loop_s": None,
            "rows_per_s": sum(rates) / len(rates) if rates else float("nan"),
            "checkpoint_step": checkpoint_step, "last_logged_before_kill": before[-1][0] if before else None,
            "resume_to_first_step_s": after[0][1] - restart if after else None,
            "wall_s": first["wall_s"] + second["wall_s"], "run_dir": str(run_dir),
            **{k: max(first[k], second[k]) for k in ("peak_pss_mb", "max_hwm_mb", "sum_hwm_mb")}}


def _score(cfg: BenchScaleConfig, checkpoint: str, data: str, out: Path) -> dict[str, Any]:
    from qgdist.bench.memory import measure_tree

    cmd = [sys.executable, "-m", "qgdist", "predict", "--checkpoint", checkpoint, "--data", data, "--out", str(out),
           "--workers", str(cfg.workers), "--num-cpus", str(cfg.workers), "--no-progress"]
    run = measure_tree(cmd, env={"RAY_ADDRESS": ""}, check=True)
    summary = json.loads((out / "summary.json").read_text())
    parts = glob.glob(str(out / "part-*.parquet"))
    return {"rows": summary["jets"], "rows_per_s": summary["jets_per_s"], "ray_start_s": summary["ray_seconds"],
            "bytes_out": sum(os.path.getsize(p) for p in parts), "auc": summary.get("metrics", {}).get("auc")} | _memory(run)


def run_scale(cfg: BenchScaleConfig, jets: int, images: int, root: Path) -> dict[str, Any]:
    """Every stage at one scale; returns stage -> figures."""
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    rows: dict[str, Any] = {}

    def stage(name: str, result: dict[str, Any]) -> None:
        rows[name] = result
        print(f"  {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in result.items() if k != "run_dir"), flush=True)

    stage("generate clouds", _child("_generate", "energyflow", str(jets), str(cfg.jets_per_file),
                                    str(root / "ef"), "1"))
    stage("generate images", _child("_generate", "cms", str(images), str(cfg.images_per_file), str(root / "cms"), "2"))
    stage("convert clouds", _child("_convert", "energyflow", str(root / "shards-ef"), str(cfg.workers),
                                   *sorted(glob.glob(str(root / "ef" / "*.npz")))))
    stage("convert images", _child("_convert", "cms", str(root / "shards-cms"), str(cfg.workers),
                                   *sorted(glob.glob(str(root / "cms" / "*.parquet")))))
    stage("train clouds", _train(cfg, str(root / "shards-ef"), root))
    stage("score clouds", _score(cfg, rows["train clouds"]["run_dir"], str(root / "shards-ef"), root / "scores-ef"))
    if cfg.score_images:
        from qgdist.bench.predict import one_step_checkpoint

        images = str(root / "shards-cms")
        stage("score images", _score(cfg, one_step_checkpoint("resnet15", images, root), images,
                                     root / "scores-cms"))
    return rows


def run(cfg: BenchScaleConfig) -> dict[str, Any]:
    """Both scales, small first; prints the table and writes ``workdir/bench_scale.json``."""
    from qgdist.core.atomic import write_json

    work = Path(cfg.workdir)
    work.mkdir(parents=True, exist_ok=True)
    load = [os.getloadavg()]
    scales = {}
    for name, share in (("small", cfg.small), ("full", 1.0)):
        jets, images = int(cfg.jets * share), int(cfg.images * share)
        print(f"{name}: {jets} clouds, {images} images", flush=True)
        scales[name] = {"jets": jets, "images": images, "stages": run_scale(cfg, jets, images, work / name)}
    load.append(os.getloadavg())
    results = {"config": asdict(cfg), "scales": scales, "load_before_after": load}
    write_json(work / "bench_scale.json", results)
    print(table(results))
    return results


def _rate(r: dict[str, Any]) -> float:
    return r.get("rows_per_s") or r["rows"] / r["loop_s"]


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per stage and scale, then large/small ratios."""
    s, f = results["scales"]["small"], results["scales"]["full"]
    lines = ["| stage | rows | rows/s | start-up s | wall s | bytes in MB | bytes out MB | peak PSS MB | max proc HWM MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for scale in (s, f):
        for name, r in scale["stages"].items():
            start = r["wall_s"] - r["rows"] / _rate(r)   # everything that is not the work itself
            lines.append(f"| {name} | {r['rows']:,} | {_rate(r):,.0f} | {start:.1f} | "
                         f"{r['wall_s']:.1f} | {r.get('bytes_in', 0) / 1e6:,.0f} | {r.get('bytes_out', 0) / 1e6:,.0f} | "
                         f"{r['peak_pss_mb']:,.0f} | {r['max_hwm_mb']:,.0f} |")
    lines += ["", "| stage | rows/s full / small | peak PSS full / small | max proc HWM full / small |", "|---|---|---|---|"]
    for name in f["stages"]:
        a, b = s["stages"][name], f["stages"][name]
        lines.append(f"| {name} | {_rate(b) / _rate(a):.2f} | {b['peak_pss_mb'] / a['peak_pss_mb']:.2f} | "
                     f"{b['max_hwm_mb'] / a['max_hwm_mb']:.2f} |")
    t = f["stages"]["train clouds"]
    first = t["resume_to_first_step_s"]
    lines.append(f"\nkill during training (full): checkpoint at step {t['checkpoint_step']}, last step logged before "
                 f"the kill {t['last_logged_before_kill']}; resumed run's first new step "
                 + (f"{first:.1f} s after it was started" if first is not None else "not seen"))
    return "\n".join(lines)


if __name__ == "__main__":  # child entry points, each run in its own process by ``_child``
    print(json.dumps(CHILDREN[sys.argv[1]](*sys.argv[2:])), flush=True)
