"""A thin layer over Ray's ``JobSubmissionClient``: token authentication, waiting with live logs, log tails.

Ray 2.60 turns token authentication on by default. A cluster started with ``RAY_AUTH_MODE=token`` (or on its
default) only answers requests carrying ``Authorization: Bearer <token>``. We look for the token where Ray does
(``RAY_AUTH_TOKEN``, the file named by ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) plus an explicit
``--auth-token-file``, and send the header ourselves, so the client works whatever ``RAY_AUTH_MODE`` says locally.
A cluster started with ``RAY_AUTH_MODE=disabled`` ignores the header.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from qgdist.core.config import option
from qgdist.core.errors import ClusterError
from qgdist.core.secrets import redact

if TYPE_CHECKING:  # ray is imported lazily so that `qgdist --help` stays fast
    from ray.job_submission import JobSubmissionClient

#: Where a client finds the dashboard when --address is not given (the variable `ray job submit` reads too).
ADDRESS_ENV = "RAY_API_SERVER_ADDRESS"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class ClientConfig:
    """How to reach a Ray cluster's job server (its dashboard, port 8265 by default)."""

    address: str | None = option(None, f"job server URL, http://HOST:8265 (default: ${ADDRESS_ENV}, then "
                                       f"{DEFAULT_ADDRESS})")
    auth_token_file: str | None = option(None, "file holding the cluster's token (default: $RAY_AUTH_TOKEN, "
                                               "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); needed when the cluster "
                                               "runs with RAY_AUTH_MODE=token")

    def resolved_address(self) -> str:
        address = self.address or os.environ.get(ADDRESS_ENV) or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
        if "://" not in address:  # `ray job` accepts host:port; the client wants a URL
            address = f"http://{address}"
        return address.rstrip("/")


def find_auth_token(token_file: str | None = None) -> str | None:
    """The cluster token from ``token_file``, ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    if token_file:
        return _read_token(Path(token_file))
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return _read_token(Path(os.environ["RAY_AUTH_TOKEN_PATH"]))
    default = Path.home() / ".ray" / "auth_token"
    return _read_token(default) if default.is_file() else None


def _read_token(path: Path) -> str:
    try:
        token = path.read_text().strip()
    except OSError as err:
        raise ClusterError(f"cannot read the Ray auth token file {path}: {err.strerror}") from err
    if not token:
        raise ClusterError(f"the Ray auth token file {path} is empty")
    return token


def connect(config: ClientConfig) -> JobSubmissionClient:
    """A ``JobSubmissionClient`` for ``config``, with the bearer token when one is found."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = config.resolved_address()
    token = find_auth_token(config.auth_token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as err:
        raise ClusterError(
            f"the Ray cluster at {redact(address)} refused us ({'wrong' if token else 'no'} token): set "
            "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or --auth-token-file to the cluster's token (`ray get-auth-token` on "
            "the head prints it), or start a private test cluster with RAY_AUTH_MODE=disabled") from err
    except ConnectionError as err:
        raise ClusterError(
            f"no Ray job server at {redact(address)}: start one with `ray start --head --dashboard-host 127.0.0.1` "
            f"(needs ray[default]) or pass --address http://HOST:8265 ({redact(str(err))})") from err


def job_status(client: JobSubmissionClient, job_id: str) -> str:
    """The job's status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED); unknown ids raise ClusterError."""
    try:
        return str(client.get_job_status(job_id).value)
    except RuntimeError as err:
        raise ClusterError(f"job {job_id!r}: {err}") from err


def log_tail(client: JobSubmissionClient, job_id: str, lines: int = 40) -> str:
    """The last ``lines`` lines of the job's driver log."""
    return "\n".join(client.get_job_logs(job_id).splitlines()[-lines:])


def wait(client: JobSubmissionClient, job_id: str, follow: bool = True, out: TextIO | None = None,
         poll_s: float = 1.0, timeout_s: float | None = None) -> str:
    """Wait for the job to end, printing its log as it grows when ``follow``; returns the final status.

    We poll ``get_job_logs`` rather than use the async ``tail_job_logs`` websocket: polling survives dashboard
    restarts and proxies (KubeRay ingress) that drop websockets, and a 1 s poll is plenty for training logs.
    """
    out = out or sys.stdout
    printed = 0
    start = time.monotonic()
    while True:
        status = job_status(client, job_id)
        if follow:
            logs = client.get_job_logs(job_id)
            if len(logs) > printed:
                out.write(logs[printed:])
                out.flush()
                printed = len(logs)
        if status in TERMINAL_STATES:
            return status
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise ClusterError(f"job {job_id} still {status} after {timeout_s:.0f} s (it keeps running; "
                               f"`qgdist jobs stop {job_id}` ends it)")
        time.sleep(poll_s)


# -- qgdist jobs list | status | logs | stop -------------------------------------------------------------------------
@dataclass(frozen=True)
class ListConfig:
    """``qgdist jobs list``: every job of a cluster."""

    client: ClientConfig = ClientConfig()


@dataclass(frozen=True)
class StatusConfig:
    """``qgdist jobs status``: one job's status."""

    job_id: str = option(help="submission id of the job", positional=True)
    client: ClientConfig = ClientConfig()


@dataclass(frozen=True)
class LogsConfig:
    """``qgdist jobs logs``: one job's driver log."""

    job_id: str = option(help="submission id of the job", positional=True)
    follow: bool = option(False, "keep printing until the job ends", aliases={"-f": True})
    tail: int | None = option(None, "only the last LINES lines", metavar="LINES", min=1)
    client: ClientConfig = ClientConfig()


@dataclass(frozen=True)
class StopConfig:
    """``qgdist jobs stop``: stop one job."""

    job_id: str = option(help="submission id of the job", positional=True)
    wait: bool = option(False, "wait until the job has stopped")
    client: ClientConfig = ClientConfig()
