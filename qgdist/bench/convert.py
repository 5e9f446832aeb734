"""``qgdist bench convert``: ingest throughput, bytes per jet and memory scaling, every row doing the same work.

For each format it builds a 1x and a ``--scale``x input (CMS: one row group per jet, snappy, as the public files;
EnergyFlow: one deflated npz). With ``--pythia-dir`` (a ``qgdist generate pythia --format both`` directory) the jets
are Pythia's, repeated as needed; otherwise toy jets. Each method runs in its own subprocess:

* CMS ``arrow_read``  the read ceiling: Arrow's decode of the rows (32 row groups a read, one thread), no output;
* CMS ``seed``        the seed notebook's decode (``pandas.read_parquet`` + per-row Python list flattening to dense
                      float32), then the same sparse chunks and shards as ours (1x only: it is ~100x slower);
* CMS ``pyarrow``     the straightforward single process: the same coalesced reads, Arrow flatten to dense
                      float32, ``np.nonzero``, the same chunk shards;
* EF  ``npz_read``    the read ceiling: ``X`` streamed out of the zip (inflated) in blocks of 1024 rows, ``y``;
* EF  ``numpy``       the straightforward single process: the same reads, padding dropped with a boolean mask,
                      the same chunk shards;
* ``local``           ``qgdist convert --executor local`` (our task code in one process, one core);
* ``ray``             ``qgdist convert`` (Ray Data on a private local Ray with ``--num-cpus``, default all CPUs;
                      with ``$RAY_ADDRESS`` set, on that cluster, joined).

Same rows: every method reads the same input file. Same output: every method that writes writes schema-2 chunk
shards through the same writer (the baselines without validation, splits and statistics, which only makes them
faster). Same accounting of start-up: each subprocess reports its loop seconds (the work, from the first read to
the last shard written), and start-up (interpreter, imports, Ray start) is the rest of its wall time, reported
apart. Each method runs ``--repeat`` times, all methods interleaved in every round; medians are quoted.

Memory: the peak over time of the process tree's summed PSS (shared pages counted once) and RSS, sampled every
0.2 s (``qgdist.bench.memory``), and the sum of every process's own kernel peak mark (VmHWM, an upper bound a
sampler cannot miss).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qgdist.bench import comma_names, joined_ray, load_average
from qgdist.core.config import option

@dataclass(frozen=True)
class BenchConvertConfig:
    """``qgdist bench convert`` settings."""

    formats: tuple[str, ...] = option(("cms", "energyflow"), "formats to bench (comma list)", parse=comma_names)
    jets: int = option(600, "CMS jets in the 1x input", min=1)
    ef_jets: int = option(30000, "EnergyFlow jets in the 1x input", min=1)
    scale: int = option(10, "the large inputs are this many times bigger", min=1)
    repeat: int = option(3, "runs of every method (interleaved); medians are quoted", min=1)
    workdir: str = option("runs/bench_convert", "inputs, outputs and bench_convert.json")
    num_cpus: int | None = option(None, "CPUs of the conversion's local Ray (default: all)", min=1)
    pythia_dir: str | None = option(None, "take the jets from a `qgdist generate pythia --format both` directory")
    seed: int = option(0, "seed of generated toy inputs", min=0)


# -- inputs ----------------------------------------------------------------------------------------------------
def _cms_input(path: str, rows: int, cfg: BenchConvertConfig) -> None:
    """``rows`` CMS jets, one row group each: Pythia's (cycled) or toy ones."""
    import glob

    import pyarrow.parquet as pq

    from qgdist.core.atomic import atomic_path
    from qgdist.pipelines.toy_data import toy_file

    if not cfg.pythia_dir:
        toy_file("cms", rows, path, seed=cfg.seed)
        return
    sources = sorted(glob.glob(os.path.join(cfg.pythia_dir, "cms", "*.parquet")))
    written = 0
    with atomic_path(path) as tmp:
        writer = None
        while written < rows:
            for src in sources:
                pf = pq.ParquetFile(src)
                for g in range(pf.metadata.num_row_groups):
                    if written >= rows:
                        break
                    table = pf.read_row_group(g)
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, table.schema, compression="snappy")
                    writer.write_table(table, row_group_size=1)   # one row group per jet, as the public files
                    written += table.num_rows
        writer.close()   # type: ignore[union-attr]


def _ef_blocks(cfg: BenchConvertConfig, workdir: str) -> tuple[Any, Any, int]:
    """(X blocks generator factory, y, M) of the 1x EnergyFlow jets: Pythia's or toy ones."""
    import glob

    import numpy as np

    from qgdist.pipelines.toy_data import toy_file

    if cfg.pythia_dir:
        files = sorted(glob.glob(os.path.join(cfg.pythia_dir, "energyflow", "*.npz")))
    else:
        files = [toy_file("energyflow", min(cfg.ef_jets, 30000), os.path.join(workdir, "toy_ef_seed.npz"),
                          seed=cfg.seed)]
    data = [np.load(f) for f in files]
    xs, ys = [d["X"] for d in data], [d["y"] for d in data]
    m = max(x.shape[1] for x in xs)
    return [np.pad(x, ((0, 0), (0, m - x.shape[1]), (0, 0))) for x in xs], np.concatenate(ys), m


def _ef_input(path: str, rows: int, blocks: list[Any], y: Any, m: int) -> None:
    """``rows`` EnergyFlow jets (the given ones, cycled) written as a deflated npz, streamed (never whole)."""
    import zipfile

    import numpy as np

    from qgdist.core.atomic import atomic_path

    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        with zf.open("X.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (rows, m, 4)})
            done = 0
            while done < rows:
                for x in blocks:
                    take = x[: rows - done]
                    f.write(np.ascontiguousarray(take, dtype="<f8").tobytes())
                    done += len(take)
                    if done >= rows:
                        break
        with zf.open("y.npy", "w") as f:
            np.lib.format.write_array(f, np.resize(y, rows).astype(np.float64), allow_pickle=False)


def make_inputs(cfg: BenchConvertConfig) -> dict[tuple[str, str], dict[str, Any]]:
    """The inputs, generated once and reused while their size and origin match (``<file>.done``)."""
    inputs = {}
    for fmt in cfg.formats:
        base = cfg.jets if fmt == "cms" else cfg.ef_jets
        ext = "parquet" if fmt == "cms" else "npz"
        ef = None
        for size, rows in (("1x", base), (f"{cfg.scale}x", base * cfg.scale)):
            path = os.path.join(cfg.workdir, f"{fmt}_{size}.{ext}")
            tag = f"{rows} {cfg.pythia_dir or f'toy seed {cfg.seed}'}"
            done = path + ".done"
            if not os.path.exists(done) or Path(done).read_text() != tag:
                t = time.perf_counter()
                if fmt == "cms":
                    _cms_input(path, rows, cfg)
                else:
                    ef = ef or _ef_blocks(cfg, cfg.workdir)
                    _ef_input(path, rows, *ef)
                Path(done).write_text(tag)
                print(f"made {path} ({rows} jets) in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            inputs[(fmt, size)] = {"path": path, "rows": rows, "bytes_per_jet": os.path.getsize(path) / rows}
    return inputs


# -- measuring ------------------------------------------------------------------------------------------------------
def measure(cmd: list[str]) -> dict[str, Any]:
    """Run ``cmd`` (a method entry point printing one JSON line); its record, wall seconds, start-up and memory."""
    from qgdist.bench.memory import measure_tree

    run = measure_tree(cmd, check=True)
    record = json.loads(run["stdout"].strip().splitlines()[-1])
    keep = ("wall_s", "peak_pss_mb", "peak_rss_mb", "sum_hwm_mb", "hwm_mb_by_process")
    return {**record, **{k: run[k] for k in keep}, "startup_s": run["wall_s"] - record["loop_s"]}


def _out_bytes_per_jet(out: str, rows: int) -> float:
    return sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out) if n.endswith(".tar")) / max(rows, 1)


def plan_runs(cfg: BenchConvertConfig, inputs: dict) -> list[tuple[str, str, str, list[str], str | None]]:
    """(format, size, method, command, output dir) of every measurement of one round."""
    me = [sys.executable, "-m", "qgdist.bench.convert_methods"]
    big = f"{cfg.scale}x"
    runs = []
    for fmt in cfg.formats:
        for size in ("1x", big):
            src = inputs[(fmt, size)]["path"]

            def out(method: str) -> str:
                return os.path.join(cfg.workdir, "out", f"{fmt}_{size}_{method}")

            if fmt == "cms":
                runs.append((fmt, size, "arrow_read", me + ["_arrow_read", src], None))
                if size == "1x":
                    runs.append((fmt, size, "seed", me + ["_seed", src, out("seed")], out("seed")))
                runs.append((fmt, size, "pyarrow", me + ["_pyarrow", src, out("pyarrow")], out("pyarrow")))
            else:
                runs.append((fmt, size, "npz_read", me + ["_npz_read", src], None))
                runs.append((fmt, size, "numpy", me + ["_numpy", src, out("numpy")], out("numpy")))
            for executor in ("local", "ray"):
                runs.append((fmt, size, executor, me + ["_ours", fmt, src, out(executor), executor,
                                                       str(cfg.num_cpus)], out(executor)))
    return runs


def run(cfg: BenchConvertConfig) -> dict[str, Any]:
    """Generate inputs, run every method ``repeat`` times interleaved, and return the result dict."""
    import shutil

    os.makedirs(cfg.workdir, exist_ok=True)
    inputs = make_inputs(cfg)
    runs = plan_runs(cfg, inputs)
    samples: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    load = [load_average()]
    for round_ in range(cfg.repeat):
        for fmt, size, method, cmd, out in runs:
            if out:
                shutil.rmtree(out, ignore_errors=True)
            print(f"round {round_ + 1}/{cfg.repeat}: {fmt} {size} {method} ...", file=sys.stderr)
            r = measure(cmd)
            if out:
                r["bytes_per_jet"] = _out_bytes_per_jet(out, r["rows"])
            samples.setdefault((fmt, size, method), []).append(r)
        load.append(load_average())
    methods: dict[str, dict[str, Any]] = {}
    for (fmt, size, method), rs in samples.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
        med["loop_rows_per_s"] = statistics.median(r["rows"] / r["loop_s"] for r in rs)
        med["runs"] = len(rs)
        med["hwm_mb_by_process"] = sorted(rs, key=lambda r: r["sum_hwm_mb"])[len(rs) // 2]["hwm_mb_by_process"]
        methods[f"{fmt}/{size}/{method}"] = med
    res = {"config": asdict(cfg), "cpus": os.cpu_count(), "load": load, "joined_ray": joined_ray(), "inputs":
           {f"{k[0]}/{k[1]}": v for k, v in inputs.items()}, "methods": methods}
    res["summary"] = summarise(cfg, res)
    return res


def summarise(cfg: BenchConvertConfig, res: dict[str, Any]) -> dict[str, Any]:
    m, big, out = res["methods"], f"{cfg.scale}x", {}
    for fmt in cfg.formats:
        read = "arrow_read" if fmt == "cms" else "npz_read"
        s: dict[str, Any] = {}
        for size in ("1x", big):
            ceiling = m[f"{fmt}/{size}/{read}"]["loop_rows_per_s"]
            local, reader = m[f"{fmt}/{size}/local"], m[f"{fmt}/{size}/{read}"]
            s[size] = {"read_ceiling_rows_per_s": ceiling,
                       "local_vs_read": local["loop_rows_per_s"] / ceiling,
                       "local_vs_read_cpu": reader["loop_cpu_s"] / local["loop_cpu_s"],
                       "ray_vs_read": m[f"{fmt}/{size}/ray"]["loop_rows_per_s"] / ceiling,
                       "ray_rows_per_s": m[f"{fmt}/{size}/ray"]["loop_rows_per_s"],
                       "bytes_per_jet": m[f"{fmt}/{size}/local"]["bytes_per_jet"],
                       "input_bytes_per_jet": res["inputs"][f"{fmt}/{size}"]["bytes_per_jet"]}
        for executor in ("ray", "local"):
            a, b = m[f"{fmt}/1x/{executor}"], m[f"{fmt}/{big}/{executor}"]
            s[f"memory_growth_{executor}"] = {"pss": b["peak_pss_mb"] / a["peak_pss_mb"] - 1,
                                              "sum_hwm": b["sum_hwm_mb"] / a["sum_hwm_mb"] - 1}
        if fmt == "cms":
            s["local_vs_seed_1x"] = m["cms/1x/local"]["loop_rows_per_s"] / m["cms/1x/seed"]["loop_rows_per_s"]
        out[fmt] = s
    return out


def table(res: dict[str, Any]) -> str:
    cfg = res["config"]
    lines = [f"{res['cpus']} CPUs; load average before/after each round: {' -> '.join(res['load'])}; medians of "
             f"{cfg['repeat']} interleaved runs",
             f"{'format/size/method':26s} {'rows':>7s} {'start-up s':>10s} {'loop s':>7s} {'loop CPU s':>10s} "
             f"{'loop rows/s':>11s} "
             f"{'KB/jet':>7s} {'peak PSS MB':>11s} {'peak RSS MB':>11s} {'sum HWM MB':>10s}"]

    def maybe(value: float | None, spec: str) -> str:   # "-": not measured (Ray workers' CPU, a reader's output)
        return format(value, spec) if value is not None else "-".rjust(int(spec.split(".")[0]))

    for name, r in res["methods"].items():
        kb = r["bytes_per_jet"] / 1e3 if "bytes_per_jet" in r else None
        lines.append(f"{name:26s} {r['rows']:7.0f} {r['startup_s']:10.1f} {r['loop_s']:7.2f} "
                     f"{maybe(r.get('loop_cpu_s'), '10.2f')} "
                     f"{r['loop_rows_per_s']:11.0f} {maybe(kb, '7.2f')} "
                     f"{r['peak_pss_mb']:11.0f} {r['peak_rss_mb']:11.0f} {r['sum_hwm_mb']:10.0f}")
    big = f"{cfg['scale']}x"
    m = res["methods"]
    for fmt, s in res["summary"].items():
        for size in ("1x", big):
            t = s[size]
            lines.append(f"{fmt} {size}: read ceiling {t['read_ceiling_rows_per_s']:.0f} rows/s (one core); local "
                         f"(one process) {t['local_vs_read']:.2f}x of it ({t['local_vs_read_cpu']:.2f}x per "
                         f"CPU-second), ray ({m[f'{fmt}/{size}/ray']['ray_cpus']:.0f} CPUs) "
                         f"{t['ray_vs_read']:.2f}x = {t['ray_rows_per_s']:.0f} rows/s (target >= 0.7x); "
                         f"{t['bytes_per_jet'] / 1e3:.2f} KB/jet out vs {t['input_bytes_per_jet'] / 1e3:.2f} in")
        for executor in ("ray", "local"):
            g = s[f"memory_growth_{executor}"]
            lines.append(f"{fmt} peak memory {big} vs 1x ({executor}): {100 * g['pss']:+.1f}% PSS, "
                         f"{100 * g['sum_hwm']:+.1f}% summed per-process peak RSS (target <= +10%)")
        if "local_vs_seed_1x" in s:
            lines.append(f"cms 1x: local (one core) {s['local_vs_seed_1x']:.1f}x the seed path's loop")
    if res.get("joined_ray"):
        lines.append(res["joined_ray"])
    return "\n".join(lines)


def main(cfg: BenchConvertConfig) -> int:
    """``qgdist bench convert``: run, print the table and the JSON, write ``workdir/bench_convert.json``."""
    from qgdist.core.atomic import write_json

    res = run(cfg)
    print(table(res))
    print(json.dumps(res, indent=1))
    write_json(os.path.join(cfg.workdir, "bench_convert.json"), res)
    return 0
