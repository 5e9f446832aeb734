"""``qgdist bench KIND``: each benchmark module exposes ``register(subparsers)`` like the stage command modules."""

from __future__ import annotations

import argparse

from qgdist.subcommands import register_modules

BENCH_MODULES = [
    "qgdist.bench.convert",   # ingest throughput, bytes per jet, memory scaling
    "qgdist.bench.knn",       # batched kNN, dense vs PyG
    "qgdist.bench.step",      # train-step throughput per model
    "qgdist.bench.loader",    # loader jets/s per core
    "qgdist.bench.train",     # Ray Train vs plain loop
    "qgdist.bench.physics",   # Pythia jets -> shards -> models, next to the paper's numbers
]


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that print side-by-side ratios")
    register_modules(bench.add_subparsers(dest="bench", metavar="KIND", required=True), BENCH_MODULES)
