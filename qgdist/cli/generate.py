"""``qgdist generate toy|pythia``: parsers generated from ``ToyConfig`` and ``PythiaConfig``.

Old spellings stay: ``toy --stored`` (= ``--no-compress``), ``pythia --no-ray`` / ``--no-compress``.
"""

from __future__ import annotations

import argparse
import time

from qgdist.core.config import add_arguments, from_args
from qgdist.generate import pythia
from qgdist.generate.mc_settings import PythiaConfig
from qgdist.generate.toy import ToyConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="write jets in the public source formats (toy or Pythia)")
    generators = gen.add_subparsers(dest="generator", metavar="GENERATOR", required=True)

    t = generators.add_parser("toy", help="fast numpy toy jets in the CMS parquet or EnergyFlow npz format")
    add_arguments(t, ToyConfig)
    t.set_defaults(func=run_toy)

    p = generators.add_parser("pythia", help="real quark/gluon jets from Pythia 8 + FastJet (EnergyFlow recipe)",
                              description=pythia.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p, PythiaConfig)
    p.set_defaults(func=run_pythia)


def run_toy(args: argparse.Namespace) -> int:
    from qgdist.generate.toy import run

    cfg = from_args(ToyConfig, args)
    start = time.perf_counter()
    run(cfg)
    seconds = time.perf_counter() - start
    print(f"wrote {cfg.jets} toy {cfg.format} jets to {cfg.out} in {seconds:.1f} s "
          f"({cfg.jets / max(seconds, 1e-9):.0f} jets/s)")
    return 0


def run_pythia(args: argparse.Namespace) -> int:
    cfg = from_args(PythiaConfig, args)   # PythiaConfig.validate() runs here
    s = pythia.run_pythia(cfg)
    print(f"{s['jets']} jets ({s['quark_jets']} quark, {s['gluon_jets']} gluon) in {s['tasks']} tasks -> {cfg.out}; "
          f"acceptance quark {s['acceptance']['quark']:.3f} gluon {s['acceptance']['gluon']:.3f}; "
          f"mean multiplicity quark {s['mean_multiplicity']['quark']:.1f} gluon {s['mean_multiplicity']['gluon']:.1f}; "
          f"{s['wall_seconds']} s")
    return 0
