"""``qgdist evaluate`` (metrics table, ROC PNG, per-jet scores), ``qgdist predict`` (score any data with Ray) and
``qgdist export`` (ONNX, checked)."""

from __future__ import annotations

import argparse
import json

from qgdist.core.config import add_arguments, from_args
from qgdist.infer.evaluate import EvalConfig
from qgdist.infer.export import ExportConfig
from qgdist.infer.predict import PredictConfig

def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint on a split: metrics table, ROC PNG, per-jet scores parquet",
        description="Score every jet of one split with a trained checkpoint. Writes metrics.json, roc.png and "
                    "scores.parquet (file, row, is_quark, score, logit) into --out (default RUN_DIR/eval/SPLIT).")
    add_arguments(ev, EvalConfig)
    ev.set_defaults(func=run_evaluate, config_cls=EvalConfig)

    pr = subparsers.add_parser(
        "predict", help="score shards or raw CMS/EnergyFlow files with a checkpoint, distributed with Ray Data",
        description="Score every jet of --data with the checkpoint's model and preprocessing (its training "
                    "statistics, never the data's): shard directories, or raw parquet/npz files read like "
                    "qgdist convert reads them. A pool of Ray actors holds the model (GPUs when the cluster has "
                    "them) and writes part-*.parquet (file, row, is_quark, score, logit) into --out, then "
                    "summary.json (with metrics when labels exist) and roc.png.")
    add_arguments(pr, PredictConfig)
    pr.set_defaults(func=run_predict)

    ex = subparsers.add_parser(
        "export", help="export a checkpoint's model to ONNX and check it with onnxruntime",
        description="Write the model as ONNX (positional inputs image, jet | points, features, mask; output "
                    "logits; dynamic batch and particle axes), then load it back with onnxruntime and compare "
                    "its outputs with PyTorch's.")
    add_arguments(ex, ExportConfig)
    ex.set_defaults(func=run_export, config_cls=ExportConfig)


def run_evaluate(args: argparse.Namespace) -> int:
    from qgdist.infer.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(from_args(EvalConfig, args))
    print(result["table"])
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    from qgdist.infer.predict import predict

    predict(from_args(PredictConfig, args))
    return 0


def run_export(args: argparse.Namespace) -> int:
    from qgdist.infer.export import export_checkpoint

    cfg = from_args(ExportConfig, args)
    result = export_checkpoint(cfg)
    print(json.dumps(result, indent=1))
    print(f"wrote {result['onnx']}: onnxruntime agrees with PyTorch (max |diff| {result['max_abs_diff']:.2g})")
    return 0
