"""The ``qgdist`` command runs under mimalloc (from the ``cmeel-mimalloc`` wheel) where it is installed.

Why: scoring and training allocate a working set per batch whose size follows the batch's particle count. glibc's
malloc raises its mmap threshold as large blocks are freed, so those blocks land in its heap, which grows with the
number of batches between ``malloc_trim`` calls: ``qgdist evaluate`` of 80k jets peaked 13-30% above 10k jets,
and flattening it inside glibc (a trim after every batch, a fixed mmap threshold) cost 20-30% of the scoring
speed (docs/operations.md). mimalloc reuses freed pages per size class: measured on the same 10k and 80k jets, a
flat peak (530 and 520 MB) and 20-35% less time, with ~50x fewer page faults.

An allocator has to be chosen before a process starts, so the command re-executes itself once with
``LD_PRELOAD`` naming the library, before torch is imported. Everything the command starts inherits it: a private
Ray (its daemons and its workers), training and scoring workers, subprocesses. Workers of a Ray cluster do not:
there the image or the runtime environment sets ``LD_PRELOAD`` (``k8s/image/Dockerfile`` does).
``QGDIST_MALLOC=glibc`` keeps glibc's malloc, taking the library out of ``LD_PRELOAD`` if the image put it there
(the library missing, or not Linux, also means glibc).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from importlib import metadata

#: ``mimalloc`` (the default, where installed) or ``glibc``.
MALLOC_ENV = "QGDIST_MALLOC"


def mimalloc_library() -> str | None:
    """The path of the installed ``libmimalloc.so``, or None (not installed, or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        dist = metadata.distribution("cmeel-mimalloc")
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if str(file).endswith("/libmimalloc.so"):
            path = str(dist.locate_file(file))
            return path if os.path.isfile(path) else None
    return None


def wanted_library(environ: Mapping[str, str] = os.environ) -> str | None:
    """The allocator library this process should run with, or None for glibc's malloc."""
    choice = environ.get(MALLOC_ENV) or "mimalloc"
    if choice not in ("mimalloc", "glibc"):
        print(f"qgdist: {MALLOC_ENV}: must be mimalloc or glibc, not {choice!r}", file=sys.stderr)
        raise SystemExit(2)
    return mimalloc_library() if choice == "mimalloc" else None


def _preload_list(environ: Mapping[str, str]) -> list[str]:
    return environ.get("LD_PRELOAD", "").replace(":", " ").split()


def preloaded(library: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``library`` is already in ``LD_PRELOAD`` (by any path to the same file: the image's link)."""
    real = os.path.realpath(library)
    return any(os.path.realpath(p) == real for p in _preload_list(environ))


def run_with_chosen_allocator() -> None:
    """Re-execute this command with mimalloc preloaded, or without it under ``QGDIST_MALLOC=glibc`` (an image may
    preload it for every process), unless it already runs so.

    Call it first thing in the entry point, before heavy imports: ``exec`` replaces the process (same pid, argv,
    and environment but ``LD_PRELOAD``), so nothing done before it survives.
    """
    library = mimalloc_library()
    want = wanted_library()
    if library is None or (want is not None) == preloaded(library):
        return
    real = os.path.realpath(library)
    others = [p for p in _preload_list(os.environ) if os.path.realpath(p) != real]
    env = dict(os.environ, LD_PRELOAD=" ".join(([library] if want else []) + others))
    if not env["LD_PRELOAD"]:
        del env["LD_PRELOAD"]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
