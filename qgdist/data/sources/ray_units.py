"""Units of work as a Ray Data dataset, the rows of deflated files inflated once by a streaming read task.

``unit_dataset(items, units)`` is what ``qgdist convert`` and ``qgdist predict`` map their work over, in place of
``ray.data.from_items(items)``. Each row is ``{"item": <the item's JSON>, "x", "y", "meta"}``:

* an item whose unit reads its own rows (a stored npz, parquet row groups, a shard) is one read task of one row,
  with null ``x``/``y``/``meta``;
* the units of one deflated file (``Unit.stream``) are one *generator* read task: it walks the member once
  (``qgdist.data.sources.stream.inflate``) and yields one block per unit, carrying that unit's raw rows. The
  next stage's tasks or actors decode them in parallel, so the file spreads over every CPU like a stored one.

Memory is bounded by Ray Data's backpressure: a read task blocks once ``_max_num_blocks_in_streaming_gen_buffer``
(2) of its blocks wait unconsumed, and the executor reads no more of an operator's outputs than its object-store
budget allows. Every unit is its own block (``BLOCK_BYTES``), so units spread over tasks one by one. Read tasks ask
for no CPU (inflating is light; the consumers may be actors holding every CPU, which would starve a read task that
needed one), and at most ``inflaters`` of them run at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from qgdist.data.sources.base import Unit
from qgdist.data.sources.stream import Rows, stream_groups

#: Blocks bigger than this are not merged with the next one: far below one unit's rows, so one unit per block.
BLOCK_BYTES = 1 << 20
#: How a stage maps over the dataset: ``ds.map_batches(fn, **UNIT_BATCHES)``, one unit a call, as an Arrow table
#: read in place in the object store. Ray Data's default (``zero_copy_batch=False``) copies every batch into the
#: worker's heap first, for functions that write into it: a streamed unit's raw rows (up to 64 MiB) once more per
#: unit in every conversion task and scoring actor. ``rows_of`` only reads.
UNIT_BATCHES = {"batch_size": 1, "batch_format": "pyarrow", "zero_copy_batch": True}


def _binary(data: Any) -> Any:
    """A one-value large_binary Arrow array over ``data`` (a buffer), without copying it."""
    import numpy as np
    import pyarrow as pa

    view = memoryview(data) if data is not None else None
    offsets = pa.py_buffer(np.array([0, view.nbytes if view is not None else 0], np.int64))
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(view if view is not None else b"")])


def _table(item: str, rows: Any) -> Any:
    """One block: the item, and its unit's raw rows (none for a unit that reads its own)."""
    import pyarrow as pa

    x, y, meta = (rows.x, rows.y.astype("float64").tobytes(), rows.meta()) if rows is not None else (b"", b"", None)
    return pa.table({"item": pa.array([item], pa.string()), "x": _binary(x), "y": _binary(y),
                     "meta": pa.array([meta], pa.string())})


def _plain(item: str) -> Iterator[Any]:
    yield _table(item, None)


def _streamed(items: dict[int, str], group: tuple[Unit, ...]) -> Iterator[Any]:
    from qgdist.data.sources.stream import inflate

    from qgdist.core.memory import release_free_memory

    for unit, rows in inflate(group):
        yield _table(items[unit.index], rows)
        del rows   # the next unit's rows are inflated while this block waits in the object store
        release_free_memory()


def rows_of(batch: Any) -> list[tuple[dict[str, Any], Rows | None]]:
    """The items of a ``UNIT_BATCHES`` batch with their units' raw rows (views of its Arrow buffers, which lie in
    the object store: not copied)."""
    from qgdist.data.sources.stream import Rows

    out = []
    for i in range(batch.num_rows):
        meta = batch.column("meta")[i].as_py()
        raw = None
        if meta is not None:
            x, y = (_value(batch.column(name), i) for name in ("x", "y"))
            raw = Rows.from_parts(x, y, meta)
        out.append((json.loads(batch.column("item")[i].as_py()), raw))
    return out


def _value(column: Any, i: int) -> memoryview:
    """Row ``i`` of a large_binary column as a view of its Arrow buffer."""
    import numpy as np

    chunks = column.chunks if hasattr(column, "chunks") else [column]
    for chunk in chunks:
        if i < len(chunk):
            offsets = np.frombuffer(chunk.buffers()[1], np.int64)[chunk.offset + i: chunk.offset + i + 2]
            return memoryview(chunk.buffers()[2])[int(offsets[0]):int(offsets[1])]
        i -= len(chunk)
    raise IndexError(i)


def unit_dataset(items: Sequence[dict[str, Any]], units: Sequence[Unit | None], consumers: int,
                 inflaters: int = 1) -> Any:
    """A Ray Data dataset of ``items`` (JSON-able work descriptions) with, for each ``stream`` unit among
    ``units`` (``units[i]`` is item i's source unit, or None), its raw rows (see the module docstring); read it
    with ``map_batches(fn, **UNIT_BATCHES)`` and ``rows_of``. ``consumers``: the tasks or
    actors that will work on it at once (they set the object-store budget)."""
    import ray
    from ray.data import Datasource, ReadTask
    from ray.data.block import BlockMetadata

    texts = [json.dumps(item) for item in items]
    by_index = {u.index: texts[i] for i, u in enumerate(units) if u is not None and u.stream}
    plain = [texts[i] for i, u in enumerate(units) if u is None or not u.stream]
    groups = stream_groups([u for u in units if u is not None and u.stream])
    if len(by_index) != sum(map(len, groups)):
        raise ValueError("stream units need distinct indexes")

    class Units(Datasource):
        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[ReadTask]:
            tasks = [ReadTask(lambda t=t: _plain(t), BlockMetadata(1, len(t), None, None)) for t in plain]
            tasks += [ReadTask(lambda g=g: _streamed(by_index, g), BlockMetadata(len(g), None, None, (g[0].path,)))
                      for g in groups]
            return tasks

        def estimate_inmemory_data_size(self) -> int | None:
            return None

    ctx = ray.data.DataContext.get_current()
    ctx.target_max_block_size = BLOCK_BYTES
    if groups:   # room for one unit per consumer and one per reader in the object store, not the whole input
        budget = (max(1, consumers) + inflaters) * max(_payload_bytes(g) for g in groups)
        limits = ctx.execution_options.resource_limits
        ctx.execution_options.resource_limits = limits.copy(object_store_memory=max(budget, 64 << 20))
    return ray.data.read_datasource(Units(), num_cpus=0, concurrency=max(1, inflaters),
                                    override_num_blocks=max(1, len(plain) + len(groups)))


def _payload_bytes(group: tuple[Unit, ...]) -> int:
    """The largest unit's raw rows in a deflated file (from its npy header, as planning read it)."""
    import numpy as np

    from qgdist.data.sources.energyflow import _header, _member, _open_zip

    f, zf = _open_zip(group[0].path)
    with f, zf:
        shape, xdtype, _ = _header(zf, _member(zf, "X", group[0].path), group[0].path)
    return max(u.rows for u in group) * int(np.prod(shape[1:])) * xdtype.itemsize
