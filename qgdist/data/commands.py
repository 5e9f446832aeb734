"""``qgdist convert``: CMS parquet / EnergyFlow npz -> WebDataset shards + manifest.json; ``qgdist inspect``."""

from __future__ import annotations

import argparse
import sys


def _size(text: str) -> int:
    """``64MB``, ``512KiB``, ``1e6`` -> bytes."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    t = text.strip().lower()
    for suffix, factor in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * factor)
    return int(float(t))


def _run(args: argparse.Namespace) -> int:
    from qgdist.data.convert import ConvertConfig, convert
    from qgdist.data.sources.errors import BadRowError
    from qgdist.data.split import parse_fractions

    cfg = ConvertConfig(
        source=args.source, inputs=args.inputs, out=args.out, shard_size=_size(args.shard_size),
        split=parse_fractions(args.split), on_bad_row=args.on_bad_row, dtype=args.dtype,
        label_quark_value=args.label_quark_value, address=args.address, num_cpus=args.num_cpus,
        rows_per_task=args.rows_per_task, executor="local" if args.no_ray else "ray", progress=not args.quiet)
    try:
        convert(cfg)
    except BadRowError as err:
        print(f"error: {err}\n(use --on-bad-row quarantine to skip bad rows and list them in the manifest)",
              file=sys.stderr)
        return 2
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from qgdist.data.convert import verify_output
    from qgdist.data.shards.manifest import read_manifest

    m = read_manifest(args.dir)
    print(f"{args.dir}: {m.source} ({m.kind}, {m.dtype}), {m.label_convention}")
    print(f"rows in {m.rows['in']}, written {m.rows['written']}, rejected {m.rows['rejected']}")
    for split, t in m.splits.items():
        print(f"  {split:5s} {t['shards']:4d} shards {t['samples']:9d} jets {t['bytes'] / 1e6:10.1f} MB")
    for q in m.quarantine[: args.show]:
        print(f"  rejected {q['file']} row {q['row']} field {q['field']}: {q['reason']}")
    if not args.verify:
        return 0
    problems = verify_output(args.dir)
    print("\n".join(problems) if problems else f"all {len(m.shards)} shards match their sha256")
    return 1 if problems else 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("convert", help="convert CMS parquet / EnergyFlow npz files into WebDataset shards",
                              description="Stream source files into compact tar shards (Ray Data tasks over row "
                                          "ranges) and write manifest.json last.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or globs (paths or fsspec URLs)")
    p.add_argument("--source", choices=["cms", "energyflow"], required=True)
    p.add_argument("--out", required=True, help="output directory (path or fsspec URL)")
    p.add_argument("--shard-size", default="64MiB", help="target shard size, e.g. 64MiB (default)")
    p.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions (hash of file name and row)")
    p.add_argument("--on-bad-row", choices=["error", "quarantine"], default="error",
                   help="error: stop at the first bad row (exit 2); quarantine: skip, count and list them")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage precision of image values / particle kinematics")
    p.add_argument("--label-quark-value", type=int, choices=[0, 1], default=None,
                   help="raw y that means quark (default: cms 0, energyflow 1)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: start a private local Ray)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the private local Ray (default: all)")
    p.add_argument("--rows-per-task", type=int, default=None, help="rows per read task (default: cms 1024, "
                                                                     "energyflow 16384)")
    p.add_argument("--no-ray", action="store_true", help="run the same tasks in this process, without Ray")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_run)

    q = subparsers.add_parser("inspect", help="summarise a converted directory; --verify checks every shard's sha256")
    q.add_argument("dir", help="output directory of qgdist convert (path or fsspec URL)")
    q.add_argument("--verify", action="store_true", help="re-hash every shard; exit 1 on any mismatch")
    q.add_argument("--show", type=int, default=10, help="quarantine entries to print")
    q.set_defaults(func=_inspect)
