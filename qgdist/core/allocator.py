"""``qgdist evaluate`` runs under mimalloc (from the ``cmeel-mimalloc`` wheel) where it is installed; any command
can, with ``QGDIST_MALLOC=mimalloc``.

Why evaluate: its scoring loop allocates a working set per batch whose size follows the batch's particle count.
glibc's malloc raises its mmap threshold as large blocks are freed, so those blocks land in its heap, which grows
with the number of batches between ``malloc_trim`` calls: ``qgdist evaluate`` of 80k jets peaked 13-20% above 10k
jets, and flattening it inside glibc (a trim after every batch, a fixed mmap threshold) cost 20-30% of the scoring
speed. Under mimalloc the same two runs peaked alike (0.99x) and the 80k run took 17-19% less time
(docs/operations.md, "What changed", item 5).

Why not every command: a command that starts Ray passes the allocator to all of Ray's processes, and the bench's
2-worker training then peaked ~660 MB higher under mimalloc than under glibc (100k jets under a 4.5 GB cap), a bit
slower too. So the default is per command (``DEFAULTS``) and ``QGDIST_MALLOC`` (``mimalloc`` or ``glibc``)
overrides it.

An allocator has to be chosen before a process starts, so the command re-executes itself once (same pid) with
``LD_PRELOAD`` naming the library, before torch is imported; what it starts inherits it. The library missing, or
not Linux, means glibc.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from importlib import metadata

#: ``mimalloc`` or ``glibc``, for any command (default: ``DEFAULTS``).
MALLOC_ENV = "QGDIST_MALLOC"
#: Commands that run under mimalloc unless told otherwise (measured: in-process scoring); the others use glibc.
DEFAULTS = {"evaluate": "mimalloc"}


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


def wanted_library(command: str | None, environ: Mapping[str, str] = os.environ) -> str | None:
    """The allocator library ``qgdist COMMAND`` should run with, or None for glibc's malloc."""
    choice = environ.get(MALLOC_ENV) or DEFAULTS.get(command or "", "glibc")
    if choice not in ("mimalloc", "glibc"):
        print(f"qgdist: {MALLOC_ENV}: must be mimalloc or glibc, not {choice!r}", file=sys.stderr)
        raise SystemExit(2)
    return mimalloc_library() if choice == "mimalloc" else None


def _preload_list(environ: Mapping[str, str]) -> list[str]:
    return environ.get("LD_PRELOAD", "").replace(":", " ").split()


def preloaded(library: str, environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``library`` is already in ``LD_PRELOAD`` (by any path to the same file, a link included)."""
    real = os.path.realpath(library)
    return any(os.path.realpath(p) == real for p in _preload_list(environ))


def run_with_chosen_allocator(command: str | None) -> None:
    """Re-execute ``qgdist COMMAND`` with mimalloc preloaded, or without it where glibc is chosen and a parent
    preloaded it, unless it already runs so.

    Call it first thing in the entry point, before heavy imports: ``exec`` replaces the process (same pid, argv,
    and environment but ``LD_PRELOAD``), so nothing done before it survives.
    """
    want = wanted_library(command)
    if want is None and not os.environ.get("LD_PRELOAD"):
        return   # glibc, and nothing preloaded: no need to look for the library (most commands)
    library = want or mimalloc_library()
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
