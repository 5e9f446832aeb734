"""Conversion of CMS parquet / EnergyFlow npz / columnar (ROOT, jagged parquet, HDF5) files into WebDataset shards, as a Ray Data pipeline.

The driver reads only file footers and headers to plan **units** (row ranges of one file; for CMS whole row
groups), so one large file spreads over every CPU of every node. ``ray.data.from_items(units).map(convert_unit)``
then runs one task per unit: it reads its rows in coalesced blocks, validates them, encodes chunks of jets (schema
2, ``qgdist.data.shards.schema``), writes its own shards per split (``{split}-{unit:06d}-{k:03d}.tar``, atomically)
and returns a small JSON record: shards, rejected rows and partial statistics of its train rows. The driver consumes
records as they stream in, shows progress, merges the statistics (in unit order) and writes ``manifest.json`` last.

Nothing is written before every input is found and planned. An existing dataset in ``--out`` is refused unless
``--overwrite``, and then the new shards are written beside it (in a generation folder ``g-<id>/``) and the old
ones deleted only after the new manifest is written (``qgdist.core.output``): a rerun that fails or is killed
leaves the earlier dataset complete.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import posixpath
import re
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np

from qgdist.core.config import option
from qgdist.core.memory import release_free_memory
from qgdist.core.nodes import NodeWatch
from qgdist.core.output import Output
from qgdist.core.storage import join, list_names
from qgdist.data.identity import dataset_id, source_records
from qgdist.data.labels import LabelConvention
from qgdist.data.shards.manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest, write_manifest
from qgdist.data.shards.schema import CHUNK_JETS
from qgdist.data.shards.writer import ChunkWriter, ShardWriter
from qgdist.data.sources import columnar
from qgdist.data.sources.base import Unit, file_name
from qgdist.data.sources.errors import BadRowError, Rejected
from qgdist.data.sources.plan import KINDS, READERS, Source, expand_inputs, plan_inputs
from qgdist.data.sources.ray_units import UNIT_BATCHES, rows_of, unit_dataset
from qgdist.data.sources.stream import Rows, with_rows
from qgdist.data.split import DEFAULT_FRACTIONS, SPLIT_NAMES, assign_splits, fractions_problem, parse_fractions
from qgdist.data.stats import StatSums

_OUR_FILES = re.compile(r"^(?:\.)?(?:train|val|test)-\d{6}-\d{3}\.tar(?:\.tmp)?$")
_SIZE_UNITS = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}


def parse_size(text: str) -> int:
    """``64MiB``, ``512KB``, ``1e6`` -> bytes."""
    t = text.strip().lower()
    for suffix, factor in _SIZE_UNITS.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * factor)
    return int(float(t))


@dataclass(frozen=True)
class ConvertConfig:
    """``qgdist convert`` settings."""

    source: Source = option(help="source format: CMS End-to-End parquet, EnergyFlow npz, or columnar (ROOT "
                                 "TTrees, jagged parquet, HDF5 in the weaver/ParT layout)")
    inputs: list[str] = option(help="files, directories or globs (paths or fsspec URLs)",
                               positional=True, metavar="INPUT")
    out: str = option(help="output directory (path or fsspec URL)")
    shard_size: int = option(64 << 20, "target bytes per shard, e.g. 64MiB, 512KB, 1e6 (a task's shards never "
                             "span tasks)", parse=parse_size, metavar="SIZE", min=1)
    split: tuple[float, float, float] = option(
        DEFAULT_FRACTIONS, "train,val,test fractions (hash of file name and row)", parse=parse_fractions,
        metavar="TRAIN,VAL,TEST", min=0, max=1, check=fractions_problem)
    chunk_jets: int = option(CHUNK_JETS, "jets per chunk, i.e. per tar sample (stored as columns)", min=1)
    compress: bool = option(True, "gzip the members that compress well (image pixels and values)")
    on_bad_row: Literal["error", "quarantine"] = option(
        "error", "error: stop at the first bad row (exit 2); quarantine: skip, count and list them")
    dtype: Literal["float32", "float16"] = option(
        "float32", "storage precision of image values / particle kinematics")
    label_quark_value: Literal[0, 1] | None = option(
        None, "raw y that means quark (default: the source's convention, cms 0, energyflow 1, columnar 1)")
    branches: dict[str, str] = option(
        {}, "columnar: branch names that differ from the weaver/ParT layout (qgdist.data.sources.columnar.Branches:"
        " tree, label, pid, px, py, pz, energy, pt, rapidity, eta, phi, counts), e.g. pid= for no PDG ids",
        flag="--branch", metavar="KEY=BRANCH")
    address: str | None = option(None, "Ray cluster to join (default: start a private local Ray)")
    num_cpus: int | None = option(None, "CPUs of the private local Ray (default: all)", min=1)
    rows_per_task: int | None = option(None, "rows per read task (default: cms 1024; energyflow 16384, fewer "
                                                "in files padded wider than 128 particles: 64 MiB of X)", min=1)
    executor: Literal["ray", "local"] = option(
        "ray", "ray: Ray Data tasks; local: the same task code in this process, without Ray",
        aliases={"--no-ray": "local"})
    progress: bool = option(True, "progress bar and closing summary on stderr", aliases={"--quiet": False})
    overwrite: bool = option(False, "replace a dataset already in --out (written beside it; the old one stays whole "
                                    "until the new manifest is written)")
    verbose: bool = option(False, "show Ray's own log lines on the terminal (else they go to OUT/ray.log when "
                                  "OUT is a local directory)")

    def __post_init__(self) -> None:
        # A --config YAML file may give these as text ("64MiB", "0.8,0.1,0.1"): keep the parsed values.
        if isinstance(self.shard_size, str):
            object.__setattr__(self, "shard_size", parse_size(self.shard_size))
        if isinstance(self.split, str):
            object.__setattr__(self, "split", parse_fractions(self.split))
        elif not isinstance(self.split, tuple):
            object.__setattr__(self, "split", tuple(self.split))
        if self.branches and self.source != "columnar":
            raise ValueError(f"branch: --branch applies to --source columnar, not {self.source}")
        columnar.Branches.of(self.branches)   # an unknown key or an incomplete choice is a bad option

    def reader_options(self) -> dict[str, Any]:
        """Keyword arguments of the source reader's ``plan`` and ``read`` beyond the common ones."""
        return {"branches": columnar.Branches.of(self.branches)} if self.source == "columnar" else {}

    def labels(self) -> LabelConvention:
        if self.label_quark_value is None:
            return LabelConvention.default(self.source)
        return LabelConvention(self.source, self.label_quark_value)


@dataclass(frozen=True)
class InspectConfig:
    """``qgdist inspect`` settings."""

    dir: str = option(help="output directory of qgdist convert (path or fsspec URL)", positional=True)
    verify: bool = option(False, "re-hash every shard; exit 1 on any mismatch")
    show: int = option(10, "quarantine entries to print", min=0)


def convert_unit(unit: dict[str, Any], cfg: dict[str, Any], prefix: str = "", rows: Rows | None = None) -> dict[str, Any]:
    """One task: read, validate, encode and write the shards of one unit (named ``prefix`` + ``{split}-{unit}-{k}``);
    returns a JSON-able record. ``rows``: the unit's raw rows when its file's streaming reader inflated them.

    Everything is done on whole decoded blocks (columns of many jets): the split of each jet, the chunks written
    per split, and the train statistics; no Python loop visits jets one by one.
    """
    u = Unit(**{**unit, "row_groups": tuple(unit["row_groups"])})
    c = ConvertConfig(**cfg)
    name = file_name(u.path)
    writers = {s: ChunkWriter(ShardWriter(c.out, s, lambda k, s=s: f"{prefix}{s}-{u.index:06d}-{k:03d}.tar",
                                          c.shard_size),
                              c.chunk_jets, c.compress) for s in SPLIT_NAMES}
    stats, rejected, rows_in, written = StatSums(), [], 0, 0
    read, options = READERS[c.source].read, c.reader_options()
    for chunk in read(u, c.labels(), c.dtype, rows=rows, **options) if rows is not None else \
            read(u, c.labels(), c.dtype, **options):
        rows_in += len(chunk) + len(chunk.rejected)
        rejected += [r.to_dict() for r in chunk.rejected]
        if rejected and c.on_bad_row == "error":
            for w in writers.values():
                w.abort()
            return {"unit": u.index, "error": rejected[0], "rows_in": rows_in, "written": written}
        block = chunk.block
        if block is None or not len(block):
            continue
        splits = assign_splits(name, block.jets["row"], c.split)
        for s, split in enumerate(SPLIT_NAMES):
            part = block if (splits == s).all() else block.take(np.flatnonzero(splits == s))
            writers[split].add(part)
            if s == 0:
                stats.add(part)
        written += len(block)
    shards = [dataclasses.asdict(info) for w in writers.values() for info in w.close()]
    release_free_memory()   # the unit's blocks are freed: give their heap back (flat memory over many units)
    return {"unit": u.index, "rows_in": rows_in, "written": written, "rejected": rejected, "shards": shards,
            "stats": stats.sums}


def _ray_results(units: list[Unit], cfg: dict[str, Any], prefix: str) -> Iterator[dict[str, Any]]:
    """Run ``convert_unit`` over Ray Data, one block (and task) per unit, yielding records as they finish."""
    import logging

    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # our own bar counts rows; Ray's per-operator bars would interleave with it
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    ds = unit_dataset([dataclasses.asdict(u) for u in units], units, consumers=cpus, inflaters=1 + cpus // 8)
    ds = ds.map_batches(lambda batch: {"record": [json.dumps(convert_unit(item, cfg, prefix, raw))
                                                  for item, raw in rows_of(batch)]},
                        **UNIT_BATCHES, num_cpus=1)
    for row in ds.iter_rows():
        yield json.loads(row["record"])


def _local_results(units: list[Unit], cfg: dict[str, Any], prefix: str) -> Iterator[dict[str, Any]]:
    for u, rows in with_rows(units):   # a deflated file's units inflated once, in order
        yield convert_unit(dataclasses.asdict(u), cfg, prefix, rows)


def verify_output(out: str) -> list[str]:
    """Problems of a converted directory: shards missing, altered (size or sha256) or not in the manifest."""
    import hashlib

    from qgdist.data.shards.manifest import read_manifest

    manifest = read_manifest(out)
    fs, root = fsspec.core.url_to_fs(out)
    problems = []
    for shard in manifest.shards:
        path = posixpath.join(root, shard.name)
        if not fs.exists(path):
            problems.append(f"{shard.name}: missing")
            continue
        sha, size = hashlib.sha256(), 0
        with fs.open(path, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
                size += len(block)
        if size != shard.bytes or sha.hexdigest() != shard.sha256:
            problems.append(f"{shard.name}: {size} bytes, sha256 {sha.hexdigest()[:12]}... does not match")
    listed = {s.name for s in manifest.shards}
    # where the manifest's shards are: the top level, or its generation folder (others are an unfinished rerun's)
    folders = {posixpath.dirname(name) for name in listed} | {""}
    problems += [f"{posixpath.join(folder, name)}: not in the manifest" for folder in sorted(folders)
                 for name in list_names(join(out, folder) if folder else out)
                 if _OUR_FILES.match(name) and posixpath.join(folder, name) not in listed]
    return problems


def convert(cfg: ConvertConfig) -> Manifest:
    """Convert ``cfg.inputs`` into shards plus ``manifest.json`` under ``cfg.out``; returns the manifest.

    Raises ``BadRowError`` (naming file, row and field) at the first bad row unless ``on_bad_row="quarantine"``.
    """
    from tqdm import tqdm

    if cfg.source not in READERS or cfg.on_bad_row not in ("error", "quarantine") or \
            cfg.dtype not in ("float32", "float16") or cfg.chunk_jets < 1:
        raise ValueError(f"bad config: source={cfg.source!r} on_bad_row={cfg.on_bad_row!r} dtype={cfg.dtype!r} "
                         f"chunk_jets={cfg.chunk_jets!r}")
    ray_seconds, cpus, own_ray_log = time.perf_counter(), 1, False
    if cfg.executor == "ray":
        import ray

        from qgdist.core.ray import ensure_ray

        own_ray_log = not ray.is_initialized() and not cfg.verbose and "://" not in cfg.out
        ensure_ray(cfg.address, cfg.num_cpus, verbose=cfg.verbose, dashboard=False)
        cpus = int(ray.cluster_resources().get("CPU", 1))
    start = time.perf_counter()
    ray_seconds = start - ray_seconds
    # Every input is found and planned (footers, headers) before the output is touched: a typo never costs the
    # user the dataset already there.
    inputs = expand_inputs(cfg.inputs, cfg.source)
    units, rows_total, quarantine = plan_inputs(cfg.source, inputs, cpus, cfg.rows_per_task, cfg.on_bad_row,
                                                cfg.reader_options())
    output = Output(cfg.out, MANIFEST_NAME, "a converted dataset", cfg.overwrite, ours=_OUR_FILES)
    old = [s.name for s in read_manifest(cfg.out).shards] if output.committed() else []
    prefix = output.begin()
    # The inputs' sha256 (the dataset's identity) is read while the tasks convert: the driver waits anyway.
    rows_by_path = collections.Counter()
    for u in units:
        rows_by_path[u.path] += u.rows
    hashing = ThreadPoolExecutor(1).submit(source_records, sorted(rows_by_path), dict(rows_by_path))
    if own_ray_log:   # Ray started or joined here: its lines into OUT/ray.log, once the inputs are planned
        from qgdist.core.ray import quiet_ray_loggers

        quiet_ray_loggers(cfg.out)
    settings = dataclasses.asdict(cfg)
    run_units = _ray_results if cfg.executor == "ray" and units else _local_results
    results = run_units(units, settings, prefix)
    shards: list[ShardInfo] = []
    unit_stats: dict[int, dict[str, Any]] = {}
    rows_in, written = sum(1 for r in quarantine if r.row is not None), 0
    bar = tqdm(total=rows_total, unit="rows", desc=f"convert {cfg.source}", disable=not cfg.progress,
               file=sys.stderr, smoothing=0.1)
    # A node lost under the tasks: one line; Ray runs its tasks again elsewhere (a unit's shards are rewritten).
    watch = NodeWatch(on_lost=lambda node: bar.write(
        f"node {node.address} lost: Ray runs its conversion tasks again on the other nodes", file=sys.stderr)
    ) if run_units is _ray_results else nullcontext()
    with bar, watch:
        bar.update(rows_in)
        for record in results:
            if "error" in record:
                raise BadRowError.from_record(Rejected(**record["error"]))
            rows_in += record["rows_in"]
            written += record["written"]
            quarantine += [Rejected(**r) for r in record["rejected"]]
            shards += [ShardInfo(**s) for s in record["shards"]]
            unit_stats[record["unit"]] = record["stats"]
            bar.update(record["rows_in"])
            bar.set_postfix(rejected=len(quarantine), refresh=False)
    stats = StatSums()
    for unit in sorted(unit_stats):  # in unit order, whatever order tasks finished in: the same sums to the last bit
        stats.merge(StatSums(unit_stats[unit]))
    rejected = sum(1 for r in quarantine if r.row is not None)
    if rows_in != rows_total or written + rejected != rows_in:  # a bug, never bad input: refuse to write
        raise RuntimeError(f"row accounting broken: planned {rows_total}, in {rows_in}, "
                           f"written {written} + rejected {rejected}")
    manifest = Manifest(
        source=cfg.source, kind=KINDS[cfg.source], dtype=cfg.dtype, label_convention=cfg.labels().describe(),
        inputs=inputs, split_fractions=dict(zip(SPLIT_NAMES, cfg.split)),
        chunk_jets=cfg.chunk_jets, shards=sorted(shards, key=lambda s: s.name),
        rows={"in": rows_in, "written": written, "rejected": rejected},
        quarantine=[r.to_dict() for r in sorted(quarantine, key=lambda r: (r.file, r.row or -1))],
        stats=stats.finish(), sources=hashing.result())
    manifest.dataset_id = dataset_id(manifest)
    write_manifest(manifest, cfg.out)   # the commit
    output.finish(old)
    if cfg.progress:
        print(summary(manifest, time.perf_counter() - start), file=sys.stderr)
        if lost := [node.address for node in getattr(watch, "lost", [])]:
            print(f"{len(lost)} node(s) lost ({', '.join(lost)}); their tasks ran again on the other nodes",
                  file=sys.stderr)
        if cfg.executor == "ray":
            print(f"(plus {ray_seconds:.1f} s to start or join Ray)", file=sys.stderr)
    return manifest


def summary(m: Manifest, seconds: float) -> str:
    """The closing lines of a conversion: rows, shards per split, bytes per jet, time."""
    total = sum(s.bytes for s in m.shards)
    per_jet = total / max(m.rows["written"], 1)
    lines = [f"rows in {m.rows['in']}, written {m.rows['written']}, rejected {m.rows['rejected']}"
             + (f" ({len(m.quarantine)} quarantine entries)" if m.quarantine else ""),
             "shards: " + ", ".join(f"{k} {v['shards']} ({v['samples']} jets)" for k, v in m.splits.items()),
             f"{total / 1e6:.1f} MB, {per_jet / 1e3:.2f} KB per jet; {seconds:.1f} s, "
             f"{m.rows['in'] / max(seconds, 1e-9):.0f} rows/s"]
    return "\n".join(lines)
