"""``qgdist evaluate`` runs under mimalloc where it is installed, other commands under glibc unless
``QGDIST_MALLOC=mimalloc`` (qgdist.core.allocator), and a private Ray a command starts inherits its allocator;
``QGDIST_MALLOC=glibc`` opts out; a bad value is one line and exit 2.

Each case runs in a fresh interpreter (an allocator is chosen before a process starts) and reads the process's own
memory map, where a preloaded library shows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qgdist.core.allocator import (
    MALLOC_ENV,
    mimalloc_library,
    preloaded,
    wanted_library,
)

pytestmark = pytest.mark.skipif(mimalloc_library() is None, reason="cmeel-mimalloc is not installed (not x86-64 Linux)")

#: What ``console()`` does before the command: choose the allocator (maybe exec again); then report this process.
PROBE = """
import json, os, sys
from qgdist.core.allocator import run_with_chosen_allocator
run_with_chosen_allocator(sys.argv[1])
def mapped():
    return any("libmimalloc" in line for line in open("/proc/self/maps"))
report = {"pid": os.getpid(), "mimalloc": mapped()}
if "--ray" in sys.argv:
    import ray
    from qgdist.core.ray import ensure_ray
    ensure_ray(num_cpus=1, dashboard=False)
    report["ray_worker_mimalloc"] = ray.get(ray.remote(mapped).remote())
    ray.shutdown()
print(json.dumps(report))
"""


def probe(malloc: str | None, command: str, *args: str, preload: str | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k not in (MALLOC_ENV, "LD_PRELOAD")}
    if malloc is not None:
        env[MALLOC_ENV] = malloc
    if preload is not None:
        env["LD_PRELOAD"] = preload
    proc = subprocess.Popen([sys.executable, "-c", PROBE, command, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=300)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return done, (json.loads(out.splitlines()[-1]) | {"launched_pid": proc.pid} if proc.returncode == 0 else {})


def test_evaluate_reexecutes_itself_under_mimalloc_in_the_same_process():
    done, report = probe(None, "evaluate")
    assert done.returncode == 0, done.stderr
    assert report["mimalloc"] is True
    assert report["pid"] == report["launched_pid"]   # exec, not a child: signals and exit codes reach the command


def test_glibc_opts_out_and_a_bad_choice_is_one_line_and_exit_2(tmp_path):
    done, report = probe("glibc", "evaluate")
    assert done.returncode == 0 and report["mimalloc"] is False, done.stderr
    link = tmp_path / "libmimalloc.so"   # a parent (an image, a wrapper) preloaded it, through a link
    link.symlink_to(mimalloc_library())
    done, report = probe("glibc", "evaluate", preload=str(link))
    assert done.returncode == 0 and report["mimalloc"] is False, done.stderr   # taken out again
    assert report["pid"] == report["launched_pid"]
    done, _ = probe("jemalloc", "evaluate")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["qgdist: QGDIST_MALLOC: must be mimalloc or glibc, not 'jemalloc'"]


def test_evaluate_defaults_to_mimalloc_other_commands_to_glibc_and_the_variable_overrides_both():
    library = mimalloc_library()
    assert wanted_library("evaluate", {}) == library
    assert wanted_library("train", {}) is None and wanted_library(None, {}) is None
    assert wanted_library("train", {MALLOC_ENV: "mimalloc"}) == library
    assert wanted_library("evaluate", {MALLOC_ENV: "glibc"}) is None


def test_a_library_preloaded_through_a_link_counts_as_preloaded(tmp_path):
    link = tmp_path / "libmimalloc.so"
    link.symlink_to(mimalloc_library())
    assert preloaded(mimalloc_library(), {"LD_PRELOAD": f"/opt/other.so:{link}"})
    assert not preloaded(mimalloc_library(), {"LD_PRELOAD": "/opt/other.so"})
    assert not preloaded(mimalloc_library(), {})


@pytest.mark.slow   # a private Ray (~10 s)
def test_a_private_ray_started_by_a_command_under_mimalloc_runs_its_workers_under_it():
    done, report = probe("mimalloc", "train", "--ray")
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["mimalloc"] is True and report["ray_worker_mimalloc"] is True
