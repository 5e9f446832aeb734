"""``qgdist tracker``: a local MLflow server with a sqlite backend, bound to 127.0.0.1, for the UI."""

from __future__ import annotations

import argparse
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
    parser.set_defaults(func=run_tracker)


def run_tracker(args: argparse.Namespace) -> int:
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
