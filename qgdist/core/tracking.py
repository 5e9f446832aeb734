"""Which MLflow tracker a command talks to, decided the same way by every command."""

from __future__ import annotations

import os

TRACKING_ENV = "MLFLOW_TRACKING_URI"


def resolve_tracking_uri(explicit: str | None = None) -> str | None:
    """``explicit`` (``--tracking-uri``) if given, else ``$MLFLOW_TRACKING_URI``, else None (the run's local store)."""
    return explicit or os.environ.get(TRACKING_ENV) or None
