"""``qgdist bench convert``: ingest throughput, bytes per jet and memory scaling, side by side in one run.

On the same generated CMS-format file (one row group per jet) it runs, each in its own subprocess whose whole
process tree (Ray's raylet, GCS and workers included) is sampled for memory:

* ``seed``      the seed notebooks' path: ``pandas.read_parquet`` + per-row Python list flattening to dense float32;
* ``pyarrow``   a single-process baseline: coalesced ``read_row_groups`` + Arrow flatten to dense float32 +
                ``webdataset.TarWriter`` (dense .npy per jet), the straightforward fast way;
* ``arrow_read`` only Arrow's decode of the nested column (one thread), no flatten or write: the per-core floor
                of every parquet-based path, and so the bound on what N cores can reach;
* ``local``     our task code in one process without Ray (``qgdist convert --no-ray``);
* ``ours``      ``qgdist convert`` (Ray Data, private local Ray), on the 1x file and on the 10x file.

Throughput is compared on the conversion loops (rows / seconds after imports and Ray start; ``ours`` on the 10x
input, where the fixed start-up no longer dominates); end-to-end rates (whole subprocess wall time, Python and
Ray start included: what a user waits for) are printed alongside.
Memory: the peak over time of the tree's summed PSS (shared pages counted once) and RSS, sampled every 0.2 s, and
the sum of every process's own kernel peak mark (VmHWM), which a sampler cannot miss (an upper bound: the
processes need not peak at the same moment).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qgdist.core.config import option

DENSE_BYTES = 3 * 125 * 125 * 4


@dataclass(frozen=True)
class BenchConvertConfig:
    """``qgdist bench convert`` settings."""

    jets: int = option(1000, "jets in the 1x input")
    scale: int = option(10, "the large input is this many times bigger")
    workdir: str = option("runs/bench_convert", "inputs, outputs and bench_convert.json")
    num_cpus: int | None = option(None, "CPUs of the conversion's local Ray")
    seed: int = option(0, "seed of the generated CMS toy inputs")


def _hwm(pid: int) -> int:
    """The kernel's peak-RSS mark of a process (VmHWM), in bytes; 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tree_memory(root: Any, hwm: dict[int, int]) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over ``root`` and all its descendants; updates per-pid peak marks."""
    import psutil

    pss = rss = 0
    for p in [root] + root.children(recursive=True):
        try:
            info = p.memory_full_info()
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
            hwm[p.pid] = max(hwm.get(p.pid, 0), _hwm(p.pid))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def measure(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak tree PSS/RSS (sampled every 0.2 s), stdout and stderr."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")})
    root, peak, hwm = psutil.Process(proc.pid), [0, 0], {}
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()))
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    while proc.poll() is None:
        pss, rss = _tree_memory(root, hwm)
        peak = [max(peak[0], pss), max(peak[1], rss)]
        time.sleep(0.2)
    for t in readers:
        t.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out['stderr'][-3000:]}")
    return {"seconds": wall, "peak_pss": peak[0], "peak_rss": peak[1], "sum_hwm": sum(hwm.values()),
            "stdout": out["stdout"],
            "stderr": out["stderr"]}


def seed_path(path: str) -> int:
    """The seed notebook: pandas reads the file, a Python comprehension flattens each jet's nested lists."""
    import numpy as np
    import pandas as pd

    df = pd.read_parquet(path)
    X_jets = np.stack([
        np.array([item for sublist1 in x for sublist2 in sublist1 for item in sublist2],
                 dtype=np.float32).reshape(len(x), len(x[0]), len(x[0][0]))
        for x in df["X_jets"].values])
    return len(X_jets)


def pyarrow_path(path: str, out: str, rows: int = 128) -> int:
    """Single process: coalesced row-group reads, Arrow flatten to dense float32, one dense .npy per jet."""
    import numpy as np
    import pyarrow.parquet as pq
    import webdataset as wds

    pf = pq.ParquetFile(path)
    n, groups = 0, list(range(pf.metadata.num_row_groups))
    with wds.TarWriter(out) as sink:
        for lo in range(0, len(groups), rows):
            table = pf.read_row_groups(groups[lo: lo + rows])
            x = table.column("X_jets").combine_chunks().flatten().flatten().flatten().to_numpy()
            images = x.reshape(table.num_rows, 3, 125, 125).astype(np.float32)
            pt, m0, y = (table.column(c).to_numpy() for c in ("pt", "m0", "y"))
            for i in range(table.num_rows):
                sink.write({"__key__": f"r{n:09d}", "x.npy": images[i],
                            "meta.json": {"pt": float(pt[i]), "m0": float(m0[i]), "y": float(y[i])}})
                n += 1
    return n


def arrow_read(path: str, rows: int = 128) -> int:
    """Only the Arrow decode of the parquet file, one thread: the floor of any parquet path on one core."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    groups = list(range(pf.metadata.num_row_groups))
    return sum(pf.read_row_groups(groups[lo: lo + rows], use_threads=False).num_rows
               for lo in range(0, len(groups), rows))


def _convert_cmd(src: str, out: str, cfg: BenchConvertConfig, ray: bool) -> list[str]:
    cmd = [sys.executable, "-m", "qgdist", "convert", "--source", "cms", "--out", out, src]
    if cfg.num_cpus:
        cmd += ["--num-cpus", str(cfg.num_cpus)]
    return cmd + ([] if ray else ["--executor", "local"])


def _loop_rate(stderr: str) -> float:
    """Rows/s of the conversion loop alone, from the summary line ``...; 12.3 s, 456 rows/s``."""
    m = re.search(r"; ([0-9.]+) s, ([0-9]+) rows/s", stderr)
    return float(m.group(2)) if m else float("nan")


def run(cfg: BenchConvertConfig) -> dict[str, Any]:
    """Generate inputs, run every method, and return the result dict (also printed as a table and JSON)."""
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.pipelines.toy_data import toy_file

    os.makedirs(cfg.workdir, exist_ok=True)
    src = {k: os.path.join(cfg.workdir, f"toy_{k}.parquet") for k in ("1x", "10x")}
    sizes = {"1x": cfg.jets, "10x": cfg.jets * cfg.scale}
    for k, path in src.items():
        done = path + ".done"  # the jet count of a finished input: regenerate only when it differs
        if not os.path.exists(done) or Path(done).read_text() != str(sizes[k]):
            t = time.perf_counter()
            toy_file("cms", sizes[k], path, seed=cfg.seed + len(k))
            Path(done).write_text(str(sizes[k]))
            print(f"generated {sizes[k]} CMS toy jets in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    me = [sys.executable, "-m", "qgdist.bench.convert"]
    results: dict[str, dict[str, Any]] = {}
    runs = [("seed", me + ["_seed", src["1x"]], "1x"),
            ("pyarrow", me + ["_pyarrow", src["1x"], os.path.join(cfg.workdir, "dense.tar")], "1x"),
            ("arrow_read", me + ["_arrow_read", src["1x"]], "1x"),
            ("local", _convert_cmd(src["1x"], os.path.join(cfg.workdir, "local"), cfg, False), "1x"),
            ("ours", _convert_cmd(src["1x"], os.path.join(cfg.workdir, "ours_1x"), cfg, True), "1x"),
            ("ours_10x", _convert_cmd(src["10x"], os.path.join(cfg.workdir, "ours_10x"), cfg, True), "10x")]
    for name, cmd, size in runs:
        print(f"running {name} on {sizes[size]} jets ...", file=sys.stderr)
        r = measure(cmd)
        results[name] = {"rows": sizes[size], "seconds": r["seconds"], "rows_per_s": sizes[size] / r["seconds"],
                         "peak_pss_mb": r["peak_pss"] / 1e6, "peak_rss_mb": r["peak_rss"] / 1e6,
                         "sum_peak_rss_mb": r["sum_hwm"] / 1e6}
        if name in ("seed", "pyarrow", "arrow_read"):
            results[name]["loop_rows_per_s"] = sizes[size] / json.loads(r["stdout"])["seconds"]
        else:
            results[name]["loop_rows_per_s"] = _loop_rate(r["stderr"])
        if name in ("local", "ours", "ours_10x"):
            m = read_manifest(os.path.join(cfg.workdir, name if name != "ours" else "ours_1x"))
            results[name]["bytes_per_jet"] = sum(s.bytes for s in m.shards) / m.rows["written"]
    dense_tar = os.path.getsize(os.path.join(cfg.workdir, "dense.tar")) / cfg.jets
    results["pyarrow"]["bytes_per_jet"] = dense_tar
    ours = results["ours"]
    big, seed, pa = results["ours_10x"], results["seed"], results["pyarrow"]
    summary = {
        "arrow_read_vs_seed_per_core": results["arrow_read"]["loop_rows_per_s"] / seed["loop_rows_per_s"],
        # throughput: conversion loops (after imports and Ray start), ours on the 10x input (steady state)
        "speedup_vs_seed": big["loop_rows_per_s"] / seed["loop_rows_per_s"],
        "ratio_vs_pyarrow": big["loop_rows_per_s"] / pa["loop_rows_per_s"],
        "speedup_vs_seed_end_to_end_10x": big["rows_per_s"] / seed["rows_per_s"],
        "ratio_vs_pyarrow_end_to_end_10x": big["rows_per_s"] / pa["rows_per_s"],
        "bytes_per_jet": ours["bytes_per_jet"], "dense_float32_bytes_per_jet": DENSE_BYTES,
        "compaction_vs_dense": DENSE_BYTES / ours["bytes_per_jet"],
        "input_parquet_bytes_per_jet": os.path.getsize(src["1x"]) / cfg.jets,
        "memory_growth_10x_pss": results["ours_10x"]["peak_pss_mb"] / ours["peak_pss_mb"] - 1,
        "memory_growth_10x_rss": results["ours_10x"]["peak_rss_mb"] / ours["peak_rss_mb"] - 1,
        "memory_growth_10x_hwm": results["ours_10x"]["sum_peak_rss_mb"] / ours["sum_peak_rss_mb"] - 1,
        "targets": {"speedup_vs_seed>=30": None, "ratio_vs_pyarrow>=0.5": None, "compaction>=10": None,
                    "memory_growth<=0.10": None},
    }
    summary["targets"] = {"speedup_vs_seed>=30": summary["speedup_vs_seed"] >= 30,
                          "ratio_vs_pyarrow>=0.5": summary["ratio_vs_pyarrow"] >= 0.5,
                          "compaction>=10": summary["compaction_vs_dense"] >= 10,
                          "memory_growth<=0.10": max(summary["memory_growth_10x_pss"],
                                                     summary["memory_growth_10x_hwm"]) <= 0.10}
    return {"config": asdict(cfg), "cpus": os.cpu_count(), "methods": results, "summary": summary}


def table(res: dict[str, Any]) -> str:
    """A fixed-width table of the methods and the target ratios."""
    lines = [f"{'method':10s} {'rows':>6s} {'wall s':>7s} {'rows/s':>8s} {'loop r/s':>9s} {'KB/jet':>8s} "
             f"{'peak PSS MB':>12s} {'peak RSS MB':>12s} {'sum HWM MB':>11s}"]
    for name, r in res["methods"].items():
        lines.append(f"{name:10s} {r['rows']:6d} {r['seconds']:7.1f} {r['rows_per_s']:8.0f} "
                     f"{r.get('loop_rows_per_s', float('nan')):9.0f} {r.get('bytes_per_jet', float('nan')) / 1e3:8.2f} "
                     f"{r['peak_pss_mb']:12.0f} {r['peak_rss_mb']:12.0f} {r['sum_peak_rss_mb']:11.0f}")
    s = res["summary"]
    lines += [f"ours (10x, loop) vs seed: {s['speedup_vs_seed']:.1f}x (target >= 30x); end to end incl. Python and "
              f"Ray start: {s['speedup_vs_seed_end_to_end_10x']:.1f}x",
              f"ours (10x, loop) vs single-process pyarrow: {s['ratio_vs_pyarrow']:.2f}x (target >= 0.5x); "
              f"end to end: {s['ratio_vs_pyarrow_end_to_end_10x']:.2f}x",
              f"Arrow decode alone, one core: {s['arrow_read_vs_seed_per_core']:.1f}x the seed (the ceiling per core)",
              f"bytes per jet: {s['bytes_per_jet']:.0f} vs dense float32 {DENSE_BYTES}: "
              f"{s['compaction_vs_dense']:.1f}x smaller (target >= 10x)",
              f"peak memory 10x vs 1x: {100 * s['memory_growth_10x_pss']:+.1f}% PSS, "
              f"{100 * s['memory_growth_10x_rss']:+.1f}% RSS, {100 * s['memory_growth_10x_hwm']:+.1f}% summed per-process "
              f"peak RSS (target <= +10%)"]
    return "\n".join(lines)


def main(cfg: BenchConvertConfig) -> int:
    """``qgdist bench convert``: run, print the table and the JSON, write ``workdir/bench_convert.json``."""
    from qgdist.core.atomic import write_json

    res = run(cfg)
    print(table(res))
    print(json.dumps(res, indent=1))
    write_json(os.path.join(cfg.workdir, "bench_convert.json"), res)
    return 0


if __name__ == "__main__":  # worker entry points, run in their own processes by ``measure``
    t0 = time.perf_counter()
    workers = {"_seed": seed_path, "_pyarrow": pyarrow_path, "_arrow_read": arrow_read}
    n = workers[sys.argv[1]](*sys.argv[2:])
    print(json.dumps({"rows": n, "seconds": time.perf_counter() - t0}))
