"""The scoring actor of ``qgdist predict``: holds the model and scores whole units, one parquet part each.

``qgdist.infer.predict`` plans the units and hands them to a pool of these through Ray Data's ``map_batches`` (or
scores them in its own process with ``--no-ray``). An actor reads its unit's jets (a shard, or a row range of a
source file read by ``qgdist convert``'s readers), turns them into inputs with the *checkpoint's* preprocessing
through the loader's own ``Collate``, scores them in batches and writes ``part-<unit>.parquet`` atomically; only a
small JSON record travels back. Memory per actor is one unit plus one batch, whatever the dataset's size.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

PART = "part-{index:06d}.parquet"


class Scorer:
    """Holds the model; scores whole units and writes one parquet part per unit (``map_batches`` actor class)."""

    def __init__(self, checkpoint: str, out: str, batch_size: int, on_bad_row: str,
                 label_quark_value: int | None, device: str = "auto", prefix: str = "") -> None:
        from qgdist.core.device import resolve_device
        from qgdist.data.loader import Collate
        from qgdist.infer.evaluate import load_model

        self.device = resolve_device(device)
        self.model, loaded, _ = load_model(checkpoint)
        self.model.to(self.device)
        self.pre = loaded.preprocessing
        self.collate = Collate(self.pre)
        self.out, self.prefix, self.batch_size, self.on_bad_row = out, prefix, batch_size, on_bad_row
        self.label_quark_value = label_quark_value
        self.restarted = _restarted_actor()   # told once, in this actor's first record

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        from qgdist.data.sources.ray_units import rows_of

        records = []
        for item, raw in rows_of(batch):
            record = self.score(item, raw)
            if self.restarted:
                record["restarted"], self.restarted = True, False
            records.append(json.dumps(record))
        return {"record": np.array(records, dtype=object)}

    def score(self, unit: dict[str, Any], raw: Any = None) -> dict[str, Any]:
        """Score one unit; returns its record (jets, rows in, rejected rows, part file) or an ``error``.
        ``raw``: its raw rows when its file's streaming reader inflated them (``qgdist.data.sources.stream``)."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
        import torch

        from qgdist.core.atomic import atomic_path
        from qgdist.core.memory import release_free_memory
        from qgdist.core.storage import join
        from qgdist.data.loader import to_device

        rejected: list[dict[str, Any]] = []
        counts = {"rows_in": 0}
        files: list[str] = []
        rows: list[int] = []
        labels, logits = [], []
        for collated in self.collate.batches(self._samples(unit, rejected, counts, raw), self.batch_size):
            if rejected and self.on_bad_row == "error":
                return {"index": unit["index"], "error": rejected[0]}
            inputs, label = to_device(collated, self.device)
            with torch.no_grad():
                logits.append(self.model(**inputs).float())
            labels.append(label)
            files += list(collated["file"])
            rows += collated["row"].tolist()
        if rejected and self.on_bad_row == "error":
            return {"index": unit["index"], "error": rejected[0]}
        logit = torch.cat(logits).cpu().numpy() if logits else np.zeros(0, np.float32)
        label = torch.cat(labels).cpu().numpy().astype(np.uint8) if labels else np.zeros(0, np.uint8)
        table = pa.table({"file": pa.array(files, pa.string()), "row": pa.array(rows, pa.int64()),
                          "is_quark": pa.array(label, pa.uint8()),
                          "score": pa.array(1.0 / (1.0 + np.exp(-logit.astype(np.float64))), pa.float32()),
                          "logit": pa.array(logit, pa.float32())})
        name = self.prefix + PART.format(index=unit["index"])   # relative to out, as summary.json names it
        with atomic_path(join(self.out, name)) as tmp:
            pq.write_table(table, tmp)
        release_free_memory()   # the unit's batches freed: give their heap back (flat memory over many units)
        return {"index": unit["index"], "jets": len(rows), "rows_in": counts["rows_in"] or len(rows),
                "rejected": rejected, "part": name}

    def _samples(self, unit: dict[str, Any], rejected: list, counts: dict[str, int],
                 raw: Any = None) -> Iterator[Any]:
        """Chunks of jets: raw (tar-member dicts) from a shard, or decoded blocks read from a source file's rows by
        the same readers as ``qgdist convert`` (what it would write); ``Collate`` takes both."""
        if unit["type"] == "shard":
            from qgdist.data.loader import read_shard

            yield from read_shard(unit["path"])
            return
        from qgdist.data.sources.plan import READERS
        from qgdist.data.labels import LabelConvention
        from qgdist.data.sources import columnar
        from qgdist.data.sources.base import Unit

        source = unit["type"]
        u = Unit(**{**unit["unit"], "row_groups": tuple(unit["unit"]["row_groups"])})
        labels = (LabelConvention.default(source) if self.label_quark_value is None
                  else LabelConvention(source, self.label_quark_value))
        options = {"branches": columnar.Branches.of(unit["branches"])} if source == "columnar" else {}
        read = READERS[source].read
        for chunk in read(u, labels, "float32", rows=raw, **options) if raw is not None else \
                read(u, labels, "float32", **options):
            counts["rows_in"] += len(chunk) + len(chunk.rejected)
            rejected += [r.to_dict() for r in chunk.rejected]
            if len(chunk):
                yield chunk.block


def _restarted_actor() -> bool:
    """Whether this process is a Ray actor that Ray restarted (after its process or node was lost)."""
    try:
        import ray

        context = ray.get_runtime_context() if ray.is_initialized() else None
        return bool(context and context.get_actor_id() and context.was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 -- not an actor, or the GCS did not answer: nothing to tell
        return False


def source_unit(item: dict[str, Any]) -> Any:
    """The source-file unit an item scores (None for a shard)."""
    if item["type"] == "shard":
        return None
    from qgdist.data.sources.base import Unit

    return Unit(**{**item["unit"], "row_groups": tuple(item["unit"]["row_groups"])})
