"""The methods ``qgdist bench convert`` times, each run in its own process (``python -m
qgdist.bench.convert_methods NAME ARGS...`` prints one JSON record): the baselines (the seed notebook's path, the
straightforward single-process pyarrow and numpy paths, the read ceilings) and ours (``qgdist convert``).

Every method that writes writes the same schema-2 chunk shards through the same writer. A method's imports are
done before its loop is timed (``METHODS``), so they count as start-up, as ours do.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

T0 = time.perf_counter()   # entry points count start-up from here (after the interpreter itself)


def _writer(out: str) -> Any:
    from qgdist.data.shards.schema import CHUNK_JETS
    from qgdist.data.shards.writer import ChunkWriter, ShardWriter

    os.makedirs(out, exist_ok=True)
    return ChunkWriter(ShardWriter(out, "train", lambda k: f"train-000000-{k:03d}.tar"), CHUNK_JETS)


def _image_chunk(images: Any, pt: Any, m0: Any, y: Any, first: int, name: str) -> Any:
    """The same sparse chunk columns as ours, from dense (k, C*H*W) float32 images, with ``np.nonzero``."""
    import numpy as np

    from qgdist.data.shards.schema import IMAGE_JET, ImageChunk

    img, pix = np.nonzero(images)
    jets = np.zeros(len(images), IMAGE_JET)
    jets["row"] = np.arange(first, first + len(images))
    jets["is_quark"], jets["pt"], jets["mass"] = y == 0, pt, m0
    jets["n"] = np.bincount(img, minlength=len(images))
    return ImageChunk(file=name, source="cms", jets=jets, pix=pix.astype(np.uint16), val=images[img, pix])


def seed_path(src: str, out: str) -> int:
    """The seed notebook: pandas reads the file, a Python comprehension flattens each jet's nested lists."""
    import numpy as np
    import pandas as pd

    df = pd.read_parquet(src)
    X_jets = np.stack([
        np.array([item for sublist1 in x for sublist2 in sublist1 for item in sublist2],
                 dtype=np.float32).reshape(len(x), len(x[0]), len(x[0][0]))
        for x in df["X_jets"].values])
    writer = _writer(out)
    for lo in range(0, len(X_jets), 32):
        sl = slice(lo, lo + 32)
        writer.add(_image_chunk(X_jets[sl].reshape(len(X_jets[sl]), -1), df["pt"].values[sl], df["m0"].values[sl],
                                df["y"].values[sl], lo, os.path.basename(src)))
    writer.close()
    return len(X_jets)


def pyarrow_path(src: str, out: str, rows: int = 32) -> int:
    """Single process: coalesced row-group reads, Arrow flatten to dense float32, np.nonzero, our chunk shards."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src)
    n, groups, writer = 0, list(range(pf.metadata.num_row_groups)), _writer(out)
    for lo in range(0, len(groups), rows):
        table = pf.read_row_groups(groups[lo: lo + rows], columns=["X_jets", "pt", "m0", "y"], use_threads=False)
        x = table.column("X_jets").combine_chunks().flatten().flatten().flatten().to_numpy()
        images = x.reshape(table.num_rows, -1).astype("float32")
        pt, m0, y = (table.column(c).to_numpy() for c in ("pt", "m0", "y"))
        writer.add(_image_chunk(images, pt, m0, y, n, os.path.basename(src)))
        n += table.num_rows
    writer.close()
    return n


def arrow_read(src: str, rows: int = 32) -> int:
    """Only Arrow's decode of the rows, one thread, reads as ours (32 row groups, the four columns)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(src, pre_buffer=True)
    groups = list(range(pf.metadata.num_row_groups))
    return sum(pf.read_row_groups(groups[lo: lo + rows], columns=["X_jets", "pt", "m0", "y"],
                                  use_threads=False).num_rows for lo in range(0, len(groups), rows))


def _npz_blocks(src: str, rows: int = 1024) -> Any:
    """``X`` blocks (k, M, 4) float64 streamed out of the npz exactly as our reader reads them, and ``y``."""
    import zipfile

    import numpy as np

    zf = zipfile.ZipFile(src)
    y = np.load(zf.open("y.npy"), allow_pickle=False)
    with zf.open("X.npy") as f:
        version = np.lib.format.read_magic(f)
        shape, _, dtype = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)(f)
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        for lo in range(0, shape[0], rows):
            k = min(rows, shape[0] - lo)
            yield np.frombuffer(f.read(k * row_bytes), dtype=dtype).reshape((k,) + tuple(shape[1:])), y[lo: lo + k]


def npz_read(src: str) -> int:
    """Only the read: ``X`` inflated block by block (as ours), ``y`` whole."""
    return sum(len(x) for x, _ in _npz_blocks(src))


def numpy_path(src: str, out: str) -> int:
    """Single process: the same reads, padding dropped with a boolean mask, our chunk shards."""
    import numpy as np

    from qgdist.data.shards.schema import CLOUD_JET, CloudChunk

    n, writer = 0, _writer(out)
    for x, y in _npz_blocks(src):
        mask = x[..., 0] != 0
        particles = x[mask]
        jets = np.zeros(len(x), CLOUD_JET)
        jets["row"], jets["is_quark"], jets["n"] = np.arange(n, n + len(x)), y == 1, mask.sum(axis=1)
        writer.add(CloudChunk(file=os.path.basename(src), source="energyflow", jets=jets,
                              kin=particles[:, :3].astype(np.float32), pid=particles[:, 3].astype(np.int32)))
        n += len(x)
    writer.close()
    return n


def _warm_worker() -> int:
    import particle  # noqa: F401
    import qgdist.data.convert  # noqa: F401

    time.sleep(0.5)   # hold the CPU so that the next warm-up task starts another worker
    return os.getpid()


def ours(fmt: str, src: str, out: str, executor: str, num_cpus: str) -> dict[str, Any]:
    """``qgdist convert`` in this process; Ray's start (``ensure_ray``) is start-up, the conversion is the loop."""
    from qgdist.data.convert import ConvertConfig, convert

    ray_s = 0.0
    if executor == "ray":
        t = time.perf_counter()
        import ray

        from qgdist.core.ray import ensure_ray

        ensure_ray(None, int(num_cpus) if num_cpus != "None" else None, dashboard=False)
        # Start-up, not conversion: one worker process per CPU started and its imports done (Ray Data's tasks then
        # run in these workers), as a long-lived cluster has them.
        warm = ray.remote(num_cpus=1)(_warm_worker)
        ray.get([warm.remote() for _ in range(int(ray.cluster_resources().get("CPU", 1)))])
        ray_s = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    m = convert(ConvertConfig(fmt, [src], out, executor=executor, progress=False,
                              num_cpus=int(num_cpus) if num_cpus != "None" else None))
    loop, cpu = time.perf_counter() - t, time.process_time() - cpu
    record = {"rows": m.rows["written"], "loop_s": loop, "ray_start_s": ray_s}
    if executor == "ray":   # its CPU is in Ray's workers; their number is the cluster's (--num-cpus, or joined)
        return record | {"ray_cpus": ray.cluster_resources().get("CPU", 0)}
    return record | {"loop_cpu_s": cpu}


#: method entry point -> (function, modules it imports: imported before its loop is timed, as start-up)
METHODS = {"_seed": (seed_path, ("numpy", "pandas", "pyarrow.parquet", "qgdist.data.shards.writer")),
           "_pyarrow": (pyarrow_path, ("numpy", "pyarrow.parquet", "qgdist.data.shards.writer")),
           "_arrow_read": (arrow_read, ("pyarrow.parquet",)),
           "_npz_read": (npz_read, ("numpy", "zipfile")),
           "_numpy": (numpy_path, ("numpy", "zipfile", "qgdist.data.shards.writer"))}

if __name__ == "__main__":  # method entry points, each run in its own process by ``measure``
    import importlib

    name, args = sys.argv[1], sys.argv[2:]
    if name == "_ours":
        for module in ("numpy", "pyarrow.parquet", "particle", "qgdist.data.convert", "tqdm"):
            importlib.import_module(module)
        record = ours(*args)
    else:
        fn, modules = METHODS[name]
        for module in modules:
            importlib.import_module(module)
        t, cpu = time.perf_counter(), time.process_time()
        rows = fn(*args)
        record = {"rows": rows, "loop_s": time.perf_counter() - t, "loop_cpu_s": time.process_time() - cpu}
    record["process_s"] = time.perf_counter() - T0
    print(json.dumps(record))
