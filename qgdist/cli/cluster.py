"""``qgdist submit`` and ``qgdist jobs list|status|logs|stop``: Ray jobs on a cluster's job server."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from qgdist.cluster.jobs_client import ListConfig, LogsConfig, StatusConfig, StopConfig
from qgdist.cluster.submit import SubmitConfig
from qgdist.cli.parser import Parser
from qgdist.core.config import add_arguments, from_args


class _ArgsAfterDoubleDash(Parser):
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


def register(subparsers: argparse._SubParsersAction) -> None:
    submit = subparsers.add_parser(
        "submit", help="run a qgdist command as a Ray job on a cluster",
        description="Submit `python -m qgdist COMMAND ARGS` as a Ray job. Put ARGS after `--`. `$NAME` in ARGS "
                    "expands on the cluster from the runtime_env's env_vars (quote it locally).")
    submit.__class__ = _ArgsAfterDoubleDash  # argparse offers no per-subparser class; this one only adds `--`
    submit.usage = "qgdist submit COMMAND [options] [-- ARGS ...]"
    add_arguments(submit, SubmitConfig)
    submit.set_defaults(func=_run_submit, config_cls=SubmitConfig, command_parsers=subparsers.choices)

    jobs = subparsers.add_parser("jobs", help="list, inspect, follow or stop Ray jobs on a cluster")
    actions = jobs.add_subparsers(dest="jobs_action", metavar="ACTION", required=True)
    for name, cls, run, text in (("list", ListConfig, _run_list, "all jobs, newest last"),
                                 ("status", StatusConfig, _run_status, "a job's status; exit 1 if FAILED/STOPPED"),
                                 ("logs", LogsConfig, _run_logs, "a job's log"),
                                 ("stop", StopConfig, _run_stop, "stop a job")):
        parser = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_arguments(parser, cls, config_file=False)
        parser.set_defaults(func=run, config_cls=cls)


def _guarded(run: Callable[[Any, argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Build the command's config from the flags, then run it. A ClusterError or a bad config becomes one clear
    line on stderr and exit code 2 (1 is reserved for failed jobs), through ``qgdist.cli.main``."""
    def wrapper(args: argparse.Namespace) -> int:
        return run(from_args(args.config_cls, args), args)
    wrapper.__doc__ = run.__doc__
    return wrapper


@_guarded
def _run_submit(config: SubmitConfig, args: argparse.Namespace) -> int:
    from dataclasses import replace

    from qgdist.cluster.submit import submit

    return submit(replace(config, args=list(args.job_args), check_with=args.command_parsers))


@_guarded
def _run_list(config: ListConfig, args: argparse.Namespace) -> int:
    from qgdist.cluster import jobs_client

    client = jobs_client.connect(config.client)
    jobs = sorted(client.list_jobs(), key=lambda job: job.start_time or 0)
    print(f"{'SUBMISSION ID':<34} {'STATUS':<10} ENTRYPOINT")
    for job in jobs:
        print(f"{job.submission_id or job.job_id or '-':<34} {job.status.value:<10} {job.entrypoint}")
    return 0


@_guarded
def _run_status(config: StatusConfig, args: argparse.Namespace) -> int:
    from qgdist.cluster import jobs_client

    client = jobs_client.connect(config.client)
    status = jobs_client.job_status(client, config.job_id)
    message = client.get_job_info(config.job_id).message
    print(f"{config.job_id} {status}" + (f": {message}" if message else ""))
    return 1 if status in ("FAILED", "STOPPED") else 0


@_guarded
def _run_logs(config: LogsConfig, args: argparse.Namespace) -> int:
    from qgdist.cluster import jobs_client

    client = jobs_client.connect(config.client)
    jobs_client.job_status(client, config.job_id)  # a clear error for an unknown id
    if config.follow:
        status = jobs_client.wait(client, config.job_id, follow=True)
        return 0 if status == "SUCCEEDED" else 1
    text = (jobs_client.log_tail(client, config.job_id, config.tail) if config.tail
            else client.get_job_logs(config.job_id))
    print(text, end="" if text.endswith("\n") else "\n")
    return 0


@_guarded
def _run_stop(config: StopConfig, args: argparse.Namespace) -> int:
    from qgdist.cluster import jobs_client

    client = jobs_client.connect(config.client)
    jobs_client.job_status(client, config.job_id)
    stopped = client.stop_job(config.job_id)
    status = jobs_client.wait(client, config.job_id, follow=False) if config.wait else jobs_client.job_status(
        client, config.job_id)
    print(f"{config.job_id} {status}" + ("" if stopped else " (had already ended)"))
    return 0
