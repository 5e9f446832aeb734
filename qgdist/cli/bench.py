"""``qgdist bench KIND``: each kind's flags are the fields of its bench's config (``qgdist.bench.*``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

from qgdist.bench import convert, knn, loader, physics, predict, scale, step, train
from qgdist.cli.parser import Parser
from qgdist.core.config import add_arguments, from_args

#: kind -> (bench module, its config class, the function that runs a config, one-line help), in --help order.
KINDS: dict[str, tuple[Any, type, Callable[[Any], Any], str]] = {
    "convert": (convert, convert.BenchConvertConfig, convert.main,
                "ingest throughput vs the seed and pyarrow paths, bytes/jet, memory"),
    "knn": (knn, knn.KnnBenchConfig, knn.run, "batched kNN time: ours vs cdist / shift trick / PyG"),
    "step": (step, step.StepBenchConfig, step.run, "training-step throughput per model (jets/s)"),
    "loader": (loader, loader.LoaderBenchConfig, loader.run,
               "loader jets/s per core for both formats vs model consumption"),
    "train": (train, train.TrainBenchConfig, train.run, "Ray Train scaling 1 -> N workers (efficiency), Ray start-up cost"),
    "predict": (predict, predict.BenchPredictConfig, predict.run,
                "qgdist predict jets/s from raw files and shards, memory at 1x and 10x input"),
    "scale": (scale, scale.BenchScaleConfig, scale.run,
              "every stage at 100k..2M clouds and images, under a memory cap: flat memory, rows in = scored"),
    "physics": (physics, physics.PhysicsBenchConfig, physics.run_physics,
                "Pythia jets -> shards -> ParticleNet(-Lite)/ResNet-15 vs the paper"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print side-by-side ratios")
    kinds = bench.add_subparsers(dest="bench", metavar="KIND", required=True)
    for kind, (module, cls, _, helptext) in KINDS.items():
        p = kinds.add_parser(kind, help=helptext, description=module.__doc__,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p, cls)
        p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Build the kind's config from the parsed flags and run it; the bench prints its own table."""
    _, cls, fn, _ = KINDS[args.bench]
    cfg = from_args(cls, args)
    out = fn(cfg)
    return out if isinstance(out, int) and not isinstance(out, bool) else 0


def run_kind(kind: str, argv: Sequence[str] | None = None) -> int:
    """``qgdist bench KIND ARGV...`` without building the rest of the command line (scripts, tests)."""
    module, cls, _, _ = KINDS[kind]
    parser = Parser(prog=f"qgdist bench {kind}", description=module.__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, cls)
    args = parser.parse_args(argv)
    args.bench = kind
    return run_bench(args)
