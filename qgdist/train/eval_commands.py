"""``qgdist evaluate`` (metrics table, ROC PNG, per-jet scores) and ``qgdist export`` (ONNX, checked)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    ev = subparsers.add_parser(
        "evaluate", help="evaluate a checkpoint on a split: metrics table, ROC PNG, per-jet scores parquet",
        description="Score every jet of one split with a trained checkpoint. Writes metrics.json, roc.png and "
                    "scores.parquet (file, row, is_quark, score, logit) into --out (default RUN_DIR/eval/SPLIT).")
    ev.add_argument("--checkpoint", required=True,
                    help="checkpoint directory, its state.pt, or a run directory (best checkpoint, else latest)")
    ev.add_argument("--data", required=True, help="shard directory (manifest.json + tar shards)")
    ev.add_argument("--split", default="test", choices=["train", "val", "test"])
    ev.add_argument("--out", default=None, help="output directory (default RUN_DIR/eval/SPLIT)")
    ev.add_argument("--batch-size", type=int, default=512)
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--track", action="store_true",
                    help="also log SPLIT/* metrics and the outputs into the MLflow run that trained the checkpoint")
    ev.add_argument("--tracking-uri", default=None,
                    help="MLflow server of that run (default: the run directory's local store)")
    ev.set_defaults(func=run_evaluate)

    ex = subparsers.add_parser(
        "export", help="export a checkpoint's model to ONNX and check it with onnxruntime",
        description="Write the model as ONNX (positional inputs image, jet | points, features, mask; output "
                    "logits; dynamic batch and particle axes), then load it back with onnxruntime and compare "
                    "its outputs with PyTorch's.")
    ex.add_argument("--checkpoint", required=True, help="checkpoint directory, its state.pt, or a run directory")
    ex.add_argument("--onnx", required=True, help="output .onnx file")
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument("--atol", type=float, default=1e-4, help="tolerated absolute difference of the logits")
    ex.set_defaults(func=run_export)


def run_evaluate(args: argparse.Namespace) -> int:
    from qgdist.train.evaluate import EvalConfig, evaluate_checkpoint

    result = evaluate_checkpoint(EvalConfig(checkpoint=args.checkpoint, data=args.data, split=args.split,
                                            out=args.out, batch_size=args.batch_size, device=args.device,
                                            progress=not args.no_progress, track=args.track,
                                            tracking_uri=args.tracking_uri))
    print(result["table"])
    for name, path in result["paths"].items():
        print(f"{name}: {path}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from qgdist.train.export import ExportConfig, export_checkpoint

    result = export_checkpoint(ExportConfig(checkpoint=args.checkpoint, onnx=args.onnx, opset=args.opset,
                                            atol=args.atol))
    print(json.dumps(result, indent=1))
    print(f"wrote {result['onnx']}: onnxruntime agrees with PyTorch (max |diff| {result['max_abs_diff']:.2g})")
    return 0
