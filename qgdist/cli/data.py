"""``qgdist convert``: CMS parquet / EnergyFlow npz / columnar files -> WebDataset shards + manifest.json;
``qgdist inspect``.

Both parsers are generated from the stage's configs (``ConvertConfig``, ``InspectConfig`` in
``qgdist.data.convert``); the old spellings ``--no-ray`` and ``--quiet`` are aliases of ``--executor local`` and
``--no-progress``.
"""

from __future__ import annotations

import argparse

from qgdist.core.config import add_arguments, from_args
from qgdist.data.convert import ConvertConfig, InspectConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert CMS parquet / EnergyFlow npz / ROOT, jagged parquet, HDF5 "
                                              "files into WebDataset shards",
                              description="Stream source files into compact tar shards (Ray Data tasks over row "
                                          "ranges) and write manifest.json last.")
    add_arguments(p, ConvertConfig)
    p.set_defaults(func=run_convert)

    q = subparsers.add_parser("inspect", help="summarise a converted directory; --verify checks every shard's sha256")
    add_arguments(q, InspectConfig, config_file=False)
    q.set_defaults(func=run_inspect)


def run_convert(args: argparse.Namespace) -> int:
    from qgdist.data.convert import convert

    convert(from_args(ConvertConfig, args))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from qgdist.data.convert import verify_output
    from qgdist.data.shards.manifest import read_manifest

    cfg = from_args(InspectConfig, args)
    m = read_manifest(cfg.dir)
    print(f"{cfg.dir}: {m.source} ({m.kind}, {m.dtype}), {m.label_convention}")
    print(f"rows in {m.rows['in']}, written {m.rows['written']}, rejected {m.rows['rejected']}")
    for split, t in m.splits.items():
        print(f"  {split:5s} {t['shards']:4d} shards {t['samples']:9d} jets {t['bytes'] / 1e6:10.1f} MB")
    for q in m.quarantine[: cfg.show]:
        print(f"  rejected {q['file']} row {q['row']} field {q['field']}: {q['reason']}")
    if not cfg.verify:
        return 0
    problems = verify_output(cfg.dir)
    print("\n".join(problems) if problems else f"all {len(m.shards)} shards match their sha256")
    return 1 if problems else 0
