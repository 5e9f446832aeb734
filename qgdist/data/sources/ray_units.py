"""Units of work as a Ray Data dataset, the rows of deflated files inflated once by a streaming read task.

``unit_dataset(items, units)`` is what ``qgdist convert`` and ``qgdist predict`` map their work over, in place of
``ray.data.from_items(items)``. Each row is ``{"item": <the item's JSON>, "x", "y", "meta"}``:

* an item whose unit reads its own rows (a stored npz, parquet row groups, a shard) is one read task of one row,
  with null ``x``/``y``/``meta``;
* the units of one deflated file (``Unit.stream``) are one *generator* read task: it walks the member once
  (``qgdist.data.sources.stream.inflate``) and yields one block per unit, carrying that unit's raw rows. The
  next stage's tasks or actors decode them in parallel, so the file spreads over every CPU like a stored one.

Memory is bounded by Ray Data's backpressure: a read task blocks once ``_max_num_blocks_in_streaming_gen_buffer``
of its blocks wait unconsumed, and the executor reads no more of an operator's outputs than its object-store
budget allows. Every unit is its own block (``BLOCK_BYTES``), so units spread over tasks one by one. Read tasks ask
for no CPU (inflating is light; the consumers may be actors holding every CPU, which would starve a read task that
needed one), and at most ``inflaters`` of them run at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

from qgdist.data.sources.base import Unit
from qgdist.data.sources.stream import stream_groups

#: Blocks bigger than this are not merged with the next one: far below one unit's rows, so one unit per block.
BLOCK_BYTES = 1 << 20


def _table(item: str, columns: dict[str, Any] | None) -> Any:
    import pyarrow as pa

    columns = columns or {"x": None, "y": None, "meta": None}
    return pa.table({"item": pa.array([item], pa.string()), "x": pa.array([columns["x"]], pa.large_binary()),
                     "y": pa.array([columns["y"]], pa.large_binary()), "meta": pa.array([columns["meta"]], pa.string())})


def _plain(item: str) -> Iterator[Any]:
    yield _table(item, None)


def _streamed(items: dict[int, str], group: tuple[Unit, ...]) -> Iterator[Any]:
    from qgdist.data.sources.stream import inflate

    for unit, rows in inflate(group):
        yield _table(items[unit.index], rows.to_columns())


def unit_dataset(items: Sequence[dict[str, Any]], units: Sequence[Unit | None], inflaters: int = 1) -> Any:
    """A Ray Data dataset of ``items`` (JSON-able work descriptions) with, for each ``stream`` unit among
    ``units`` (``units[i]`` is item i's source unit, or None), its raw rows (see the module docstring)."""
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

    ray.data.DataContext.get_current().target_max_block_size = BLOCK_BYTES
    return ray.data.read_datasource(Units(), num_cpus=0, concurrency=max(1, inflaters),
                                    override_num_blocks=max(1, len(plain) + len(groups)))
