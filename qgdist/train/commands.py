"""``qgdist train`` and ``qgdist quickstart``: flags -> ``TrainConfig`` -> the plain loop or Ray Train."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _model_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--model-arg wants KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_train_flags(p: argparse.ArgumentParser) -> None:
    """The flags of ``qgdist train`` (shared with benchmarks that train)."""
    p.add_argument("--data", required=True, help="converted dataset directory (holds manifest.json)")
    p.add_argument("--model", required=True, help="model name, e.g. particlenet-lite, resnet15")
    p.add_argument("--model-arg", type=_model_arg, action="append", default=[], metavar="KEY=VALUE",
                   help="extra model keyword (JSON value), repeatable")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (0: plain loop in this process)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256, help="per worker")
    p.add_argument("--recipe", choices=["paper", "seed", "custom"], default="paper",
                   help="paper: AdamW + one-cycle; seed: the seed notebooks' optimiser; custom: the flags below")
    p.add_argument("--optimizer", choices=["adamw", "adam", "sgd"], default="adamw")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--schedule", choices=["onecycle", "step", "constant"], default="onecycle")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loader-workers", type=int, default=0, help="DataLoader processes per worker")
    p.add_argument("--shuffle-buffer", type=int, default=2000)
    p.add_argument("--preset", default="kin", choices=["kin", "kinpid"], help="cloud feature preset")
    p.add_argument("--max-particles", type=int, default=128)
    p.add_argument("--run-name", default="qgdist")
    p.add_argument("--storage", default="runs", help="directory or fsspec URL (s3://...) holding <run-name>/; every worker must see it")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="MLflow server (default: $MLFLOW_TRACKING_URI, else a local store in the run dir)")
    p.add_argument("--no-track", action="store_true", help="no MLflow tracking")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a private one)")
    p.add_argument("--max-failures", type=int, default=2, help="worker-group restarts Ray may do")
    p.add_argument("--checkpoint-every", type=int, default=200, help="steps between mid-epoch checkpoints (0: off)")
    p.add_argument("--keep-last", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--resume-from", default=None, help="checkpoint directory to start from")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume although the checkpoint was written with another training config")
    p.add_argument("--log-every", type=int, default=20, help="steps between train-loss logs")
    p.add_argument("--no-progress", action="store_true")


def _absolute(path: str | None) -> str | None:
    """Local paths made absolute: Ray Train workers run in another working directory. URLs stay as they are."""
    return path if path is None or "://" in path else os.path.abspath(path)


def config_from_args(args: argparse.Namespace):
    """Map ``qgdist train`` flags onto a ``TrainConfig``."""
    from qgdist.train.config import TrainConfig

    args.data, args.storage, args.resume_from = map(_absolute, (args.data, args.storage, args.resume_from))
    return TrainConfig(
        data=args.data, model=args.model, model_kwargs=dict(args.model_arg),
        run_dir=os.path.join(args.storage, args.run_name), run_name=args.run_name, epochs=args.epochs,
        batch_size=args.batch_size, recipe=args.recipe, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, schedule=args.schedule, grad_clip=args.grad_clip or None,
        precision=args.precision, compile=args.compile, seed=args.seed, device="cuda" if args.gpu else "auto",
        loader_workers=args.loader_workers, shuffle_buffer=args.shuffle_buffer, preset=args.preset,
        max_particles=args.max_particles, checkpoint_every=args.checkpoint_every, keep_last=args.keep_last,
        max_steps=args.max_steps, track=not args.no_track, tracking_uri=args.tracking_uri,
        resume_from=args.resume_from, allow_config_change=args.allow_config_change, progress=not args.no_progress,
        log_every=args.log_every)


def run_train(args: argparse.Namespace) -> int:
    from qgdist.train.checkpoint import IncompatibleCheckpoint

    try:
        return _train(args)
    except IncompatibleCheckpoint as err:
        print(f"qgdist train: {err}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.workers == 0:
        from qgdist.train.loop import train

        out = train(cfg)
        print(f"done: global step {out['global_step']}, checkpoint {out['checkpoint']}")
        return 0
    from qgdist.train.ray_trainer import fit

    out = fit(cfg, args.storage, num_workers=args.workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker,
              max_failures=args.max_failures, address=args.address)
    print(f"done: {out['run_dir']}, checkpoint {out['checkpoint']}")
    return 0


def run_quickstart(args: argparse.Namespace) -> int:
    from qgdist.train.quickstart import QuickstartConfig, quickstart

    report = quickstart(QuickstartConfig(out=args.out, jets=args.jets, epochs=args.epochs, workers=args.workers))
    print(f"report: {report}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="train a model with Ray Train DDP (or the plain loop: --workers 0)")
    add_train_flags(p)
    p.set_defaults(func=run_train)
    q = subparsers.add_parser("quickstart", help="toy data in both formats -> convert -> train both models -> report")
    q.add_argument("--out", default="quickstart", help="directory for data, runs and the report")
    q.add_argument("--jets", type=int, default=6000, help="toy jets per format")
    q.add_argument("--epochs", type=int, default=3)
    q.add_argument("--workers", type=int, default=2)
    q.set_defaults(func=run_quickstart)
