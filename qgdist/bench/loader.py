"""``qgdist bench loader``: loader jets/s per core for both formats, schema 2 against schema 1 on the same jets.

For each format (clouds, images) it measures, on the same converted jets:

* **throughput per core**: full training epochs of ``ShardLoader`` (read tar -> shuffle -> decode -> features /
  dense images -> model-ready CPU tensors), ``num_workers=0`` and one torch thread, so one core does everything.
  Rate = jets / CPU seconds of the process (what one core delivers, whatever else the shared machine runs);
  wall-clock jets/s are printed alongside. Each measurement runs in its own subprocess, which reports its peak
  RSS (``ru_maxrss``) and its RSS before the first batch; ``--repeat`` runs per row, interleaved, medians quoted.
* the **previous format** (schema 1: one jet per tar sample, three members each) written from the same jets into
  ``--workdir``, read by a copy of the previous loader kept in ``loader_v1`` (webdataset's sample shuffle buffer, per-jet json
  and npy parsing, argsort and padding loops, torch.zeros densification). The product loader refuses schema 1.
* **bytes per jet**: schema 2 shards, schema 1 shards, and the source files the dataset was converted from.
* **shuffle quality**, for both loaders on the same split over at least 100 batches: the mean share of a batch taken
  by its most common source file (against the share under a perfect shuffle, simulated), the lag-1 autocorrelation
  of the labels in delivery order, and the spread of the batches' quark fractions against the binomial one.
  Measured on the dataset as it is, on a copy whose shards hold their jets sorted by label (class-ordered source
  files), and on a copy sorted by label across the shards of each split (source files of one class each).
* optionally (``--model-steps``) what the format's model consumes per core (``train_step``, one thread).
* the cost of ``--verify-shards``: the schema-2 row again with each shard's sha256 checked against the manifest
  (once per shard and process, as in training: over ``--epochs`` epochs every train shard is hashed once, page
  cache warm), as jets per CPU-second and the extra CPU time against the plain row.

Data: ``--cloud-data`` / ``--image-data`` (converted datasets, e.g. of Pythia jets), else toy data generated in
several files (12 of clouds, 3 of images) and converted into ``--workdir``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

from qgdist.bench import load_average
from qgdist.bench.loader_v1 import v1_batches, write_schema1, write_sorted
from qgdist.core.config import option


@dataclass(frozen=True)
class LoaderBenchConfig:
    """``qgdist bench loader`` settings."""

    cloud_data: str | None = option(None, "converted cloud dataset (default: toy clouds)")
    image_data: str | None = option(None, "converted image dataset (default: toy images)")
    jets: int = option(24000, "toy clouds when no data is given (12 files)", min=12)
    image_jets: int = option(2000, "toy images when no data is given (3 files)", min=3)
    batch: int = option(512, "jets per batch", min=1)
    preset: Literal["kin", "kinpid"] = option("kin", "cloud feature preset")
    shuffle_buffer: int = option(8192, "jets in the shuffle buffer (both loaders; training's default)", min=0)
    epochs: int = option(4, "passes over the train split per measurement", min=1)
    repeat: int = option(3, "measurements per row, interleaved; medians are quoted", min=1)
    workdir: str = option("runs/bench_loader", "toy data, schema-1 copies, bench_loader.json")
    cloud_model: str = option("particlenet-lite", "model that consumes the clouds (--model-steps)")
    image_model: str = option("resnet15", "model that consumes the images (--model-steps)")
    model_steps: int = option(0, "timed model steps per format at batch 64 (0: skip)", min=0)


# -- measurements (each in its own process) -------------------------------------------------------------------------
def _measure(layout: str, data: str, v1_dir: str, batch: int, buffer: int, epochs: int, preset: str) -> dict:
    """Jets, CPU seconds and wall seconds of ``epochs`` training epochs; RSS before the loop and at peak."""
    import itertools
    import resource

    import torch

    torch.set_num_threads(1)
    from qgdist.data.config import DataConfig
    from qgdist.data.loader import ShardLoader
    from qgdist.data.preprocessing import Preprocessing
    from qgdist.data.shards.manifest import read_manifest

    manifest = read_manifest(data)
    pre = Preprocessing.from_manifest(manifest, data, preset)
    loader = ShardLoader(DataConfig(data, batch_size=batch, shuffle_buffer=buffer, preset=preset,
                                    verify_shards=layout == "v2+verify"))

    def epoch(e: int) -> Any:
        if layout.startswith("v2"):
            for inputs, _ in loader.epoch(e):
                yield inputs
        else:
            yield from v1_batches(v1_dir, manifest, pre, batch, buffer, e)

    # Warm up (imports, the PDG table, the dense-image buffers: three are in use when this loop holds one batch
    # and its generator another), then let go of everything the warm-up holds.
    warm = epoch(99)
    for _ in itertools.islice(warm, 3):
        pass
    warm.close()
    del warm
    if layout == "v2+verify":   # the warm-up hashed the shards already: the timed epochs must do it themselves
        from qgdist.data.shards import read

        read._VERIFIED.clear()
    rss_before = _rss_mb()
    jets, wall, cpu = 0, time.perf_counter(), time.process_time()
    for e in range(epochs):
        for inputs in epoch(e):
            jets += len(inputs["image"] if "image" in inputs else inputs["mask"])
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"jets": jets, "cpu_s": cpu, "wall_s": wall, "rss_before_mb": rss_before, "peak_rss_mb": peak}


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _run_measure(*args: Any) -> dict:
    cmd = [sys.executable, "-m", "qgdist.bench.loader", "_measure", *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- shuffle quality -----------------------------------------------------------------------------------------------
def shuffle_quality(layout: str, data: str, v1_dir: str, batch: int, buffer: int, min_batches: int = 100) -> dict:
    """Mean share of a batch from its most common file, lag-1 label autocorrelation, batch quark-fraction spread,
    over at least ``min_batches`` batches (as many epochs as that takes)."""
    from qgdist.data.config import DataConfig
    from qgdist.data.loader import ShardLoader
    from qgdist.data.preprocessing import Preprocessing
    from qgdist.data.shards.manifest import read_manifest

    manifest = read_manifest(data)
    files: list[list[str]] = []
    labels: list[Any] = []
    e = 0
    while len(files) < min_batches:
        if layout == "v2":
            loader = ShardLoader(DataConfig(data, batch_size=batch, shuffle_buffer=buffer))
            batches = [(list(b["file"]), b["label"].numpy()) for b in loader.collated(e)]
        else:
            pre = Preprocessing.from_manifest(manifest, data)
            batches = [(b["file"], b["label"].numpy()) for b in v1_batches(v1_dir, manifest, pre, batch, buffer, e)]
        if not batches:
            break
        files += [f for f, _ in batches]
        labels += [lab for _, lab in batches]
        e += 1
    return _quality(files, labels)


def _quality(files: list[list[str]], labels: list[Any]) -> dict:
    import numpy as np

    share = [max(np.unique(f, return_counts=True)[1]) / len(f) for f in files]
    seq = np.concatenate(labels).astype(np.float64)
    seq = seq - seq.mean()
    auto = float((seq[1:] * seq[:-1]).mean() / max((seq * seq).mean(), 1e-12))
    fractions = np.array([lab.mean() for lab in labels])
    p, n = float(np.concatenate(labels).mean()), len(labels[0])
    return {"batches": len(files), "max_file_share": float(np.mean(share)), "label_autocorr_lag1": auto,
            "batch_quark_fraction_std": float(fractions.std()), "binomial_std": float(np.sqrt(p * (1 - p) / n))}


def ideal_quality(data: str, batch: int, batches: int, seed: int = 0) -> dict:
    """The same measures for batches drawn from a perfect shuffle of the train split (simulated)."""
    import numpy as np

    from qgdist.data.loader import read_shard
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.data.shards.schema import decode_chunk

    files, labels = [], []
    for s in read_manifest(data).shards_of("train"):
        for raw in read_shard(os.path.join(data, s.name)):
            c = decode_chunk(raw)
            files.append(c.files())
            labels.append(c.jets["is_quark"])
    files, labels = np.concatenate(files), np.concatenate(labels).astype(np.float32)
    rng = np.random.default_rng(seed)
    out_f, out_l = [], []
    while len(out_f) < batches:
        order = rng.permutation(len(labels))
        for lo in range(0, len(order) - batch + 1, batch):
            out_f.append(list(files[order[lo: lo + batch]]))
            out_l.append(labels[order[lo: lo + batch]])
    return _quality(out_f[:batches], out_l[:batches])


# -- bytes and the model -------------------------------------------------------------------------------------------
def _bytes_per_jet(data: str, v1_dir: str) -> dict:
    import fsspec

    from qgdist.data.shards.manifest import read_manifest

    m = read_manifest(data)
    jets = m.rows["written"]
    v1 = sum(os.path.getsize(os.path.join(v1_dir, s.name)) for s in m.shards)
    source = 0
    for path in m.inputs:
        fs, p = fsspec.core.url_to_fs(path)
        source += fs.size(p)
    return {"v2": sum(s.bytes for s in m.shards) / jets, "v1": v1 / jets, "source": source / m.rows["in"],
            "source_files": [os.path.basename(p) for p in m.inputs][:3]}


def model_speed(name: str, data: str, steps: int, preset: str) -> float:
    """Jets/s of ``train_step`` for model ``name`` on one thread, batch 64 (after one untimed step)."""
    import torch

    from qgdist.data.config import DataConfig
    from qgdist.data.loader import ShardLoader
    from qgdist.models import get_model
    from qgdist.train.step import train_step

    torch.set_num_threads(1)
    loader = ShardLoader(DataConfig(data, batch_size=64, shuffle_buffer=0, preset=preset))
    batches = [b for b, _ in zip(loader.epoch(0), range(steps + 1))]
    kwargs = {"in_features": loader.in_features} if loader.kind == "cloud" else {}
    model = get_model(name, **kwargs).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, *batches[0], opt)
    start, jets = time.perf_counter(), 0
    for inputs, label in batches[1:]:
        train_step(model, inputs, label, opt)
        jets += len(label)
    return jets / (time.perf_counter() - start)


def _toy(kind: str, jets: int, workdir: str) -> str:
    """Toy jets in several source files (12 of clouds, 3 of images: a batch can mix files), converted once."""
    from qgdist.data.convert import ConvertConfig, convert
    from qgdist.pipelines.toy_data import toy_file

    files = 12 if kind == "cloud" else 3
    source, ext = ("energyflow", "npz") if kind == "cloud" else ("cms", "parquet")
    out = os.path.join(workdir, f"toy_{kind}_{jets}")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        raws = [toy_file(source, jets // files, os.path.join(workdir, f"toy_{kind}_raw", f"toy_{i:02d}.{ext}"), seed=i)
                for i in range(files)]
        convert(ConvertConfig(source, raws, out, executor="local", progress=False))
    return out


def run(cfg: LoaderBenchConfig) -> dict:
    from qgdist.core.atomic import write_json

    os.makedirs(cfg.workdir, exist_ok=True)
    res: dict[str, Any] = {"config": cfg.__dict__, "load_before": load_average(), "formats": {}}
    for kind, data in (("cloud", cfg.cloud_data), ("image", cfg.image_data)):
        if data is None:
            data = _toy(kind, cfg.jets if kind == "cloud" else cfg.image_jets, cfg.workdir)
        v1_dir = write_schema1(data, os.path.join(cfg.workdir, f"v1_{kind}"))
        sorted_v2 = write_sorted(data, os.path.join(cfg.workdir, f"sorted_{kind}"))
        sorted_v1 = write_schema1(sorted_v2, os.path.join(cfg.workdir, f"sorted_v1_{kind}"), sort_by_label=True)
        pure_v2 = write_sorted(data, os.path.join(cfg.workdir, f"pure_{kind}"), across=True)
        pure_v1 = write_schema1(pure_v2, os.path.join(cfg.workdir, f"pure_v1_{kind}"), sort_by_label=True)
        rows: dict[str, list[dict]] = {"v2": [], "v1": [], "v2+verify": []}
        for _ in range(cfg.repeat):
            for layout in ("v2", "v1", "v2+verify"):
                rows[layout].append(_run_measure(layout, data, v1_dir, cfg.batch, cfg.shuffle_buffer, cfg.epochs,
                                                 cfg.preset))
        summary = {}
        for layout, runs in rows.items():
            summary[layout] = {
                "jets": runs[0]["jets"],
                "jets_per_cpu_s": statistics.median(r["jets"] / r["cpu_s"] for r in runs),
                "jets_per_wall_s": statistics.median(r["jets"] / r["wall_s"] for r in runs),
                "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
                "rss_before_mb": statistics.median(r["rss_before_mb"] for r in runs),
                "runs": runs}
        quality = {}
        for name, d2, d1 in (("as is", data, v1_dir), ("label-sorted shards", sorted_v2, sorted_v1),
                             ("one-class shards", pure_v2, pure_v1)):
            q = {layout: shuffle_quality(layout, d2, d1, cfg.batch, cfg.shuffle_buffer) for layout in ("v2", "v1")}
            q["ideal"] = ideal_quality(d2, cfg.batch, max(q["v2"]["batches"], 1))
            quality[name] = q
        from qgdist.data.shards.manifest import read_manifest

        train_mb = sum(s.bytes for s in read_manifest(data).shards_of("train")) / 1e6
        entry = {"data": data, "throughput": summary, "bytes_per_jet": _bytes_per_jet(data, v1_dir),
                 "shuffle": quality, "train_mb": train_mb}
        if cfg.model_steps:
            model = cfg.cloud_model if kind == "cloud" else cfg.image_model
            entry["model"] = {"name": model, "jets_per_s": model_speed(model, data, cfg.model_steps, cfg.preset)}
        res["formats"][kind] = entry
    res["load_after"] = load_average()
    print(table(res))
    write_json(os.path.join(cfg.workdir, "bench_loader.json"), res)
    return res


def table(res: dict) -> str:
    lines = [f"load average before {res['load_before']}, after {res['load_after']}; rates are jets per CPU-second "
             f"of one single-threaded process (median of {res['config']['repeat']}), wall-clock alongside",
             f"{'format':6} {'layout':6} {'jets/cpu-s':>11} {'jets/wall-s':>12} {'peak RSS MB':>12} "
             f"{'RSS before':>11} {'bytes/jet':>10}  target"]
    for kind, e in res["formats"].items():
        target = 20000 if kind == "cloud" else 10000
        for layout in ("v2", "v1"):
            t = e["throughput"][layout]
            lines.append(f"{kind:6} {layout:6} {t['jets_per_cpu_s']:11.0f} {t['jets_per_wall_s']:12.0f} "
                         f"{t['peak_rss_mb']:12.0f} {t['rss_before_mb']:11.0f} {e['bytes_per_jet'][layout]:10.0f}"
                         + (f"  >= {target} ({'met' if t['jets_per_cpu_s'] >= target else 'NOT met'})"
                            if layout == "v2" else ""))
        if "v2+verify" in e["throughput"]:
            plain, checked = e["throughput"]["v2"], e["throughput"]["v2+verify"]
            extra = checked["jets"] / checked["jets_per_cpu_s"] - plain["jets"] / plain["jets_per_cpu_s"]
            lines.append(f"{kind:6} verify {checked['jets_per_cpu_s']:11.0f} {checked['jets_per_wall_s']:12.0f} "
                         f"{checked['peak_rss_mb']:12.0f} {checked['rss_before_mb']:11.0f} {'':>10}  "
                         f"--verify-shards: {extra:+.2f} CPU-s over {res['config']['epochs']} epochs "
                         f"({extra / (plain['jets'] / plain['jets_per_cpu_s']):+.1%}), every train shard hashed once "
                         f"({e['train_mb']:.1f} MB, "
                         + (f"{e['train_mb'] / extra:.0f}" if extra > 0 else "n/a")   # lost in the noise
                         + " MB per extra CPU-s)")
        b = e["bytes_per_jet"]
        lines.append(f"{kind:6} source {'':>11} {'':>12} {'':>12} {'':>11} {b['source']:10.0f}  "
                     f"v2 <= source: {'met' if b['v2'] <= b['source'] else 'NOT met'} ({', '.join(b['source_files'])})")
        v2, v1 = e["throughput"]["v2"]["jets_per_cpu_s"], e["throughput"]["v1"]["jets_per_cpu_s"]
        lines.append(f"{kind:6} schema 2 / schema 1: {v2 / v1:.1f}x jets per CPU-second, "
                     f"{b['v1'] / b['v2']:.1f}x fewer bytes" + (
                         f"; {e['model']['name']} consumes {e['model']['jets_per_s']:.0f} jets/s/core"
                         if "model" in e else ""))
    lines.append("shuffle quality (mean max-file share of a batch | lag-1 label autocorrelation | std of batch quark "
                 "fraction vs binomial)")
    for kind, e in res["formats"].items():
        for name, q in e["shuffle"].items():
            for layout in ("v2", "v1", "ideal"):
                s = q[layout]
                lines.append(f"  {kind:6} {name:20} {layout:6} {s['max_file_share']:.3f} | "
                             f"{s['label_autocorr_lag1']:+.3f} | {s['batch_quark_fraction_std']:.3f} vs "
                             f"{s['binomial_std']:.3f}  ({s['batches']} batches)")
    return "\n".join(lines)


if __name__ == "__main__":  # measurement entry point, run in its own process by ``_run_measure``
    if sys.argv[1] == "_measure":
        layout, data, v1_dir, batch, buffer, epochs, preset = sys.argv[2:9]
        print(json.dumps(_measure(layout, data, v1_dir, int(batch), int(buffer), int(epochs), preset)))
