"""``qgdist evaluate`` (metrics table, ROC PNG, per-jet scores) and ``qgdist export`` (ONNX, checked)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TypeVar

from qgdist.core.config import add_arguments, from_args
from qgdist.train.evaluate import EvalConfig
from qgdist.train.export import ExportConfig

T = TypeVar("T")


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint on a split: metrics table, ROC PNG, per-jet scores parquet",
        description="Score every jet of one split with a trained checkpoint. Writes metrics.json, roc.png and "
                    "scores.parquet (file, row, is_quark, score, logit) into --out (default RUN_DIR/eval/SPLIT).")
    add_arguments(ev, EvalConfig)
    ev.set_defaults(func=run_evaluate, config_cls=EvalConfig)

    ex = subparsers.add_parser(
        "export", help="export a checkpoint's model to ONNX and check it with onnxruntime",
        description="Write the model as ONNX (positional inputs image, jet | points, features, mask; output "
                    "logits; dynamic batch and particle axes), then load it back with onnxruntime and compare "
                    "its outputs with PyTorch's.")
    add_arguments(ex, ExportConfig)
    ex.set_defaults(func=run_export, config_cls=ExportConfig)


def _config(cls: type[T], args: argparse.Namespace, command: str) -> T | None:
    """The command's config, or None after one line on stderr (a required flag missing, a bad --config file)."""
    try:
        return from_args(cls, args)
    except ValueError as err:
        print(f"qgdist {command}: {err}", file=sys.stderr)
        return None


def run_evaluate(args: argparse.Namespace) -> int:
    from qgdist.train.evaluate import evaluate_checkpoint

    cfg = _config(EvalConfig, args, "evaluate")
    if cfg is None:
        return 2
    result = evaluate_checkpoint(cfg)
    print(result["table"])
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from qgdist.train.export import export_checkpoint

    cfg = _config(ExportConfig, args, "export")
    if cfg is None:
        return 2
    result = export_checkpoint(cfg)
    print(json.dumps(result, indent=1))
    print(f"wrote {result['onnx']}: onnxruntime agrees with PyTorch (max |diff| {result['max_abs_diff']:.2g})")
    return 0
