"""``qgdist tracker``: a local MLflow server with a sqlite backend, bound to 127.0.0.1, for the UI."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tracker", help="start a local MLflow tracking server (sqlite, 127.0.0.1) and print its UI URL",
        description="Start `mlflow server` on 127.0.0.1 with a sqlite backend in --store. Point training at it "
                    "with `qgdist train --tracking-uri URL`, or pass a run's own local store "
                    "(RUN_DIR/mlflow) to browse a run that tracked without a server.")
    parser.add_argument("--store", type=Path, default=Path("mlflow-store"),
                        help="directory for mlflow.db and artifacts/ (default: ./mlflow-store)")
    parser.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default 5000)")
    parser.add_argument("--replay", type=Path, metavar="RUN_DIR",
                        help="instead of serving: send what a run could not deliver during a tracker outage "
                             "(RUN_DIR/mlflow_unsent.jsonl) to --tracking-uri, then exit")
    parser.add_argument("--tracking-uri", default=None,
                        help="with --replay: the tracker the run logged to (default: $MLFLOW_TRACKING_URI, "
                             "else the run's own local store)")
    parser.set_defaults(func=run_tracker)


def run_tracker(args: argparse.Namespace) -> int:
    if args.replay is not None:
        return replay(args.replay, args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
    from qgdist.track.server import MlflowServer, ServerConfig

    server = MlflowServer(ServerConfig(store=args.store, port=args.port))
    print(f"starting MLflow server (store {args.store.resolve()}) ...", flush=True)
    server.start()
    print(f"MLflow UI: {server.url}\ntrain with: qgdist train ... --tracking-uri {server.url}\nCtrl-C stops it.",
          flush=True)
    try:
        server.process.wait()
    finally:
        server.stop()
    return 0


def replay(run_dir: Path, tracking_uri: str | None) -> int:
    from qgdist.track.tracker import UNSENT_FILE, replay_unsent

    if not (run_dir / UNSENT_FILE).exists():
        print(f"nothing to replay: {run_dir / UNSENT_FILE} does not exist")
        return 0
    sent = replay_unsent(run_dir, tracking_uri)
    print(f"replayed {sent} records from {run_dir / UNSENT_FILE} to {tracking_uri or 'the local store'}")
    return 0
