"""``qgdist submit``: run one qgdist command as a Ray job on a cluster, optionally waiting for it.

The job's entrypoint is ``exec python -m qgdist COMMAND ARGS`` run by the cluster's shell in the job's working
directory, so with ``working_dir: .`` in the runtime_env the cluster runs the code you have checked out (``-m``
puts the working directory first on ``sys.path``). ``exec``: the shell becomes the qgdist process, so ``qgdist
jobs stop`` signals qgdist itself; a shell that forks it can be stopped between its start and the fork (Ray
lists the job's processes once), and the command then runs on, orphaned. ``$NAME`` / ``${NAME}`` inside ARGS
are left for that shell to expand from the runtime_env's ``env_vars`` (write them in single quotes locally);
nothing else is interpreted.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from qgdist.cluster import jobs_client
from qgdist.cluster.jobs_client import ClientConfig, ClusterError
from qgdist.core.config import CONFIG_FLAG, from_args, option
from qgdist.core.secrets import redact

_ENV_REF = re.compile(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))")


@dataclass(frozen=True)
class SubmitConfig:
    """One ``qgdist submit`` call: which qgdist command, its arguments, where and with what environment."""

    command: str = option(help="qgdist command to run (generate, convert, train, ...)", positional=True,
                          metavar="COMMAND")
    #: The job's own arguments: on the command line, everything after ``--``.
    args: list[str] = option([], "arguments of the qgdist command", cli=False)
    client: ClientConfig = ClientConfig()
    runtime_env_file: str | None = option(None, "runtime_env YAML (see jobs/*.yaml)", flag="--runtime-env",
                                          metavar="FILE")
    env: dict[str, str] = option({}, "set an env var of the job (overrides the runtime_env's)")
    pip: bool = option(True, "install the runtime_env's pip list on the cluster; --no-pip: the cluster already "
                             "runs the project's environment")
    submission_id: str | None = option(None, "job id to use (default: Ray makes one)")
    wait: bool = option(False, "follow the job to its end, streaming its log; exit 1 with the log tail unless it "
                               "SUCCEEDED")
    follow: bool = option(True, "with --wait, stream the job's log", aliases={"--quiet": False})
    check: bool = option(True, "parse ARGS locally with qgdist's own parser before submitting")
    #: The parsers ``check`` uses (the CLI's subparsers, by command name); None: no check.
    check_with: Mapping[str, argparse.ArgumentParser] | None = option(None, "parsers to check ARGS with", cli=False)
    timeout_s: float | None = option(None, "with --wait, give up waiting after this long (the job keeps running)",
                                     flag="--timeout", metavar="SECONDS", gt=0)
    tail_lines: int = option(40, "log lines shown when a job fails", flag="--tail", metavar="LINES", min=0)


def shell_word(arg: str) -> str:
    """Quote ``arg`` for a POSIX shell, leaving ``$NAME`` / ``${NAME}`` references to expand there."""
    parts, pos = [], 0
    for match in _ENV_REF.finditer(arg):
        if match.start() > pos:
            parts.append(shlex.quote(arg[pos:match.start()]))
        parts.append('"${%s}"' % (match.group(1) or match.group(2)))
        pos = match.end()
    if pos < len(arg) or not parts:
        parts.append(shlex.quote(arg[pos:]))
    return "".join(parts)


def build_entrypoint(command: str, args: list[str]) -> str:
    """The shell command line a Ray job runs for ``qgdist COMMAND ARGS``."""
    return " ".join(["exec", "python", "-m", "qgdist", shell_word(command), *map(shell_word, args)])


def load_runtime_env(path: str | None, env: dict[str, str] | None = None, drop_pip: bool = False) -> dict[str, Any]:
    """Read a runtime_env YAML (the format of ``ray job submit --runtime-env``), apply overrides, check it.

    A relative ``working_dir`` or ``py_modules`` entry is resolved against the submitting shell's current directory,
    as ``ray job submit`` does. Ray's own ``RuntimeEnv`` validates the result, so mistakes surface before upload.
    """
    import yaml
    from ray.runtime_env import RuntimeEnv

    runtime_env: dict[str, Any] = {}
    if path:
        try:
            runtime_env = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as err:
            raise ClusterError(f"cannot read runtime_env file {path}: {err.strerror}") from err
        except yaml.YAMLError as err:
            raise ClusterError(f"runtime_env file {path} is not valid YAML: {err}") from err
        if not isinstance(runtime_env, dict):
            raise ClusterError(f"runtime_env file {path} must hold a mapping, not {type(runtime_env).__name__}")
    if drop_pip:
        runtime_env.pop("pip", None)
    if env:
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **env}
    for key, value in (runtime_env.get("env_vars") or {}).items():
        if not isinstance(value, str):  # Ray demands strings; YAML turns `1` or `true` into other types
            raise ClusterError(f"runtime_env {path}: env_vars.{key} must be a string (quote it), got {value!r}")
    try:
        RuntimeEnv(**runtime_env)
    except (TypeError, ValueError) as err:
        raise ClusterError(f"runtime_env {path or '(flags)'} is invalid: {err}") from err
    return runtime_env


def check_command_args(parsers: Mapping[str, argparse.ArgumentParser], command: str, args: list[str],
                       env_vars: dict[str, str]) -> None:
    """Parse ``qgdist COMMAND ARGS`` locally, as the job will, so a typo fails in a second, not after upload.

    ``parsers`` maps command names to their argparse parsers (the CLI's subparsers). ``$NAME`` references take
    the runtime_env's value, else the local environment's, else stay as written. A command whose parser names its
    config class (``set_defaults(config_cls=...)``) also gets its config built, so a missing required setting is
    caught here too -- unless ARGS pass a ``--config`` file, which lives on the cluster.
    """
    if command not in parsers:
        raise ClusterError(f"unknown qgdist command {command!r}; choose from {', '.join(sorted(parsers))}")

    def expand(arg: str) -> str:
        def one(match: re.Match) -> str:
            name = match.group(1) or match.group(2)
            return env_vars.get(name, os.environ.get(name, match.group(0)))
        return _ENV_REF.sub(one, arg)

    try:
        namespace = parsers[command].parse_args(list(map(expand, args)))
    except SystemExit as err:  # argparse has printed the usage error already
        if err.code:
            raise ClusterError(f"qgdist {command} rejects these arguments (see above); nothing was submitted") from err
        return   # --help
    config_cls = getattr(namespace, "config_cls", None)
    if config_cls is not None and getattr(namespace, CONFIG_FLAG, None) is None:
        try:
            from_args(config_cls, namespace)
        except ValueError as err:
            raise ClusterError(f"qgdist {command} rejects these arguments: {err}; nothing was submitted") from err


def submit(config: SubmitConfig, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Submit the job; with ``wait``, follow it to the end. Returns the exit code (0 only if it SUCCEEDED)."""
    out, err = out or sys.stdout, err or sys.stderr
    runtime_env = load_runtime_env(config.runtime_env_file, config.env, drop_pip=not config.pip)
    if config.check and config.check_with is not None:
        check_command_args(config.check_with, config.command, config.args, runtime_env.get("env_vars") or {})
    entrypoint = build_entrypoint(config.command, config.args)
    client = jobs_client.connect(config.client)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env or None,
                               submission_id=config.submission_id, metadata={"qgdist_command": config.command})
    address = config.client.resolved_address()
    print(f"submitted {job_id} to {redact(address)}: {entrypoint}", file=err, flush=True)
    if not config.wait:
        print(job_id, file=out)
        return 0
    try:
        status = jobs_client.wait(client, job_id, follow=config.follow, out=out, timeout_s=config.timeout_s)
    except KeyboardInterrupt:
        print(f"\nstopped waiting; job {job_id} keeps running "
              f"(`qgdist jobs stop {job_id} --address {redact(address)}`)", file=err)
        return 130
    return report_end(client, job_id, status, config.tail_lines, err)


def report_end(client: Any, job_id: str, status: str, tail_lines: int, err: TextIO) -> int:
    """Say how the job ended; a job that did not succeed prints its log tail and gives exit code 1."""
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", file=err)
        return 0
    message = client.get_job_info(job_id).message or ""
    print(f"job {job_id} {status}: {message.splitlines()[0] if message else 'no message'}", file=err)
    print(f"--- last {tail_lines} log lines of {job_id} ---", file=err)
    print(jobs_client.log_tail(client, job_id, tail_lines), file=err)
    return 1
