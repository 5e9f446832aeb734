"""``qgdist tracker``: a local MLflow server with a sqlite backend, bound to 127.0.0.1, for the UI."""

from __future__ import annotations

import argparse
from pathlib import Path

from qgdist.core.config import add_arguments, from_args
from qgdist.track.server import TrackerConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tracker", help="start a local MLflow tracking server (sqlite, 127.0.0.1) and print its UI URL",
        description="Start `mlflow server` on 127.0.0.1 with a sqlite backend in --store. Point training at it "
                    "with `qgdist train --tracking-uri URL` (or MLFLOW_TRACKING_URI=URL), or pass a run's own "
                    "local store (RUN_DIR/mlflow) to browse a run that tracked without a server.")
    add_arguments(parser, TrackerConfig)
    parser.set_defaults(func=run_tracker, config_cls=TrackerConfig)


def run_tracker(args: argparse.Namespace) -> int:
    cfg = from_args(TrackerConfig, args)
    if cfg.replay is not None:
        from qgdist.core.tracking import resolve_tracking_uri

        return replay(cfg.replay, resolve_tracking_uri(cfg.tracking_uri))
    from qgdist.track.server import MlflowServer

    server = MlflowServer(cfg.server)
    print(f"starting MLflow server (store {cfg.server.store.resolve()}) ...", flush=True)
    server.start()
    print(f"MLflow UI: {server.url}\ntrain with: qgdist train ... --tracking-uri {server.url}\nCtrl-C stops it.",
          flush=True)
    try:
        server.process.wait()
    finally:
        server.stop()
    return 0


def replay(run_dir: Path, tracking_uri: str | None) -> int:
    from qgdist.track.delivery import UNSENT_FILE, replay_unsent

    if not (run_dir / UNSENT_FILE).exists():
        print(f"nothing to replay: {run_dir / UNSENT_FILE} does not exist")
        return 0
    sent = replay_unsent(run_dir, tracking_uri)
    from qgdist.core.secrets import redact

    print(f"replayed {sent} records from {run_dir / UNSENT_FILE} to {redact(tracking_uri or 'the local store')}")
    return 0
