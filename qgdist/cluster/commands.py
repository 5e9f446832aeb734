"""``qgdist submit`` and ``qgdist jobs list|status|logs|stop``: Ray jobs on a cluster's job server."""

from __future__ import annotations

import argparse
import sys

from qgdist.cluster.jobs_client import ADDRESS_ENV, ClientConfig, ClusterError


class _ArgsAfterDoubleDash(argparse.ArgumentParser):
    """Takes everything after the first ``--`` as the job's ARGS, so submit's own options may follow COMMAND.

    (A plain ``nargs="*"`` positional would be matched, empty, right after COMMAND and reject the rest.)
    """

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        job_args: list[str] = []
        if "--" in args:
            cut = args.index("--")
            args, job_args = args[:cut], args[cut + 1:]
        namespace, extras = super().parse_known_args(args, namespace)
        namespace.job_args = job_args
        return namespace, extras


def _connection_flags() -> argparse.ArgumentParser:
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument("--address", default=None,
                       help=f"job server URL, http://HOST:8265 (default: ${ADDRESS_ENV}, then http://127.0.0.1:8265)")
    flags.add_argument("--auth-token-file", default=None,
                       help="file holding the cluster's token (default: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
                            "~/.ray/auth_token); needed when the cluster runs with RAY_AUTH_MODE=token")
    return flags


def register(subparsers: argparse._SubParsersAction) -> None:
    connection = _connection_flags()

    submit = subparsers.add_parser(
        "submit", parents=[connection], help="run a qgdist command as a Ray job on a cluster",
        description="Submit `python -m qgdist COMMAND ARGS` as a Ray job. Put ARGS after `--`. `$NAME` in ARGS "
                    "expands on the cluster from the runtime_env's env_vars (quote it locally).")
    submit.add_argument("job_command", metavar="COMMAND", help="qgdist command to run (generate, convert, train, ...)")
    submit.__class__ = _ArgsAfterDoubleDash  # argparse offers no per-subparser class; this one only adds `--`
    submit.usage = "qgdist submit COMMAND [options] [-- ARGS ...]"
    submit.add_argument("--wait", action="store_true", help="follow the job to its end, streaming its log; "
                                                           "exit 1 with the log tail unless it SUCCEEDED")
    submit.add_argument("--quiet", action="store_true", help="with --wait, do not stream the log")
    submit.add_argument("--runtime-env", default=None, metavar="FILE", help="runtime_env YAML (see jobs/*.yaml)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                        help="set an env var of the job (overrides the runtime_env's); repeatable")
    submit.add_argument("--no-pip", action="store_true",
                        help="drop the runtime_env's pip list: the cluster already runs the project's environment")
    submit.add_argument("--submission-id", default=None, help="job id to use (default: Ray makes one)")
    submit.add_argument("--no-check", action="store_true", help="do not parse ARGS locally before submitting")
    submit.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="with --wait, give up waiting after this long (the job keeps running)")
    submit.add_argument("--tail", type=int, default=40, metavar="LINES", help="log lines shown when a job fails")
    submit.set_defaults(func=_run_submit, command_parsers=subparsers.choices)

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow or stop Ray jobs on a cluster")
    actions = jobs.add_subparsers(dest="jobs_action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[connection], help="all jobs, newest last")
    listing.set_defaults(func=_run_list)
    status = actions.add_parser("status", parents=[connection], help="a job's status; exit 1 if FAILED/STOPPED")
    status.add_argument("job_id")
    status.set_defaults(func=_run_status)
    logs = actions.add_parser("logs", parents=[connection], help="a job's log")
    logs.add_argument("job_id")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    logs.add_argument("--tail", type=int, default=None, metavar="LINES", help="only the last LINES lines")
    logs.set_defaults(func=_run_logs)
    stop = actions.add_parser("stop", parents=[connection], help="stop a job")
    stop.add_argument("job_id")
    stop.add_argument("--wait", action="store_true", help="wait until the job has stopped")
    stop.set_defaults(func=_run_stop)


def _client_config(args: argparse.Namespace) -> ClientConfig:
    return ClientConfig(address=args.address, auth_token_file=args.auth_token_file)


def _guarded(run):
    """Turn a ClusterError into one clear line on stderr and exit code 2 (1 is reserved for failed jobs)."""
    def wrapper(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except ClusterError as err:
            print(f"qgdist: {err}", file=sys.stderr)
            return 2
    wrapper.__doc__ = run.__doc__
    return wrapper


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ClusterError(f"--env wants KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


@_guarded
def _run_submit(args: argparse.Namespace) -> int:
    from qgdist.cluster.submit import SubmitConfig, submit

    config = SubmitConfig(
        command=args.job_command, args=list(args.job_args), client=_client_config(args),
        runtime_env_file=args.runtime_env, env=_parse_env(args.env), drop_pip=args.no_pip,
        submission_id=args.submission_id, wait=args.wait, follow=not args.quiet,
        check_with=None if args.no_check else args.command_parsers, timeout_s=args.timeout, tail_lines=args.tail)
    return submit(config)


@_guarded
def _run_list(args: argparse.Namespace) -> int:
    from qgdist.cluster import jobs_client

    client = jobs_client.connect(_client_config(args))
    jobs = sorted(client.list_jobs(), key=lambda job: job.start_time or 0)
    print(f"{'SUBMISSION ID':<34} {'STATUS':<10} ENTRYPOINT")
    for job in jobs:
        print(f"{job.submission_id or job.job_id or '-':<34} {job.status.value:<10} {job.entrypoint}")
    return 0


@_guarded
def _run_status(args: argparse.Namespace) -> int:
    from qgdist.cluster import jobs_client

    client = jobs_client.connect(_client_config(args))
    status = jobs_client.job_status(client, args.job_id)
    message = client.get_job_info(args.job_id).message
    print(f"{args.job_id} {status}" + (f": {message}" if message else ""))
    return 1 if status in ("FAILED", "STOPPED") else 0


@_guarded
def _run_logs(args: argparse.Namespace) -> int:
    from qgdist.cluster import jobs_client

    client = jobs_client.connect(_client_config(args))
    jobs_client.job_status(client, args.job_id)  # a clear error for an unknown id
    if args.follow:
        status = jobs_client.wait(client, args.job_id, follow=True)
        return 0 if status == "SUCCEEDED" else 1
    text = jobs_client.log_tail(client, args.job_id, args.tail) if args.tail else client.get_job_logs(args.job_id)
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


@_guarded
def _run_stop(args: argparse.Namespace) -> int:
    from qgdist.cluster import jobs_client

    client = jobs_client.connect(_client_config(args))
    jobs_client.job_status(client, args.job_id)
    stopped = client.stop_job(args.job_id)
    status = jobs_client.wait(client, args.job_id, follow=False) if args.wait else jobs_client.job_status(
        client, args.job_id)
    print(f"{args.job_id} {status}" + ("" if stopped else " (had already ended)"))
    return 0
