"""How much memory this process may use: the tightest cgroup limit above it, else the machine's memory.

Ray sizes its object store (30% of the memory it sees) and its memory monitor from the files at the root of the
cgroup mount (``/sys/fs/cgroup/memory/memory.limit_in_bytes``, ``/sys/fs/cgroup/memory.max``). Inside a container
with its own cgroup namespace those are the container's; in a job placed in a cgroup of its own (a batch system,
``systemd-run -p MemoryMax=``, ``qgdist bench scale --mem-cap``) they are the host's, and an object store sized
from the host's memory can exceed the job's limit. ``memory_limit`` reads the limit of the cgroup this process is
in (and of every cgroup above it), cgroup v1 or v2.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Ray's own default share of memory for its object store (``DEFAULT_OBJECT_STORE_MEMORY_PROPORTION``).
OBJECT_STORE_SHARE = 0.3
#: v1 reports "no limit" as a huge page-aligned number.
_UNLIMITED = 1 << 60


def cgroup_mounts() -> dict[str, Path]:
    """cgroup v1 memory mount and cgroup v2 mount points: ``{"v1": path, "v2": path}`` where present."""
    found: dict[str, Path] = {}
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                _, where, kind, options = line.split()[:4]
                if kind == "cgroup" and "memory" in options.split(","):
                    found.setdefault("v1", Path(where))
                elif kind == "cgroup2":
                    found.setdefault("v2", Path(where))
    except OSError:
        pass
    return found


def own_cgroup(pid: int | str = "self") -> dict[str, str]:
    """This process's cgroup paths: ``{"v1": "/a/b"}`` (memory controller) and/or ``{"v2": "/x"}``."""
    paths: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                if "memory" in controllers.split(","):
                    paths["v1"] = path
                elif controllers == "":
                    paths["v2"] = path
    except OSError:
        pass
    return paths


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit() or int(text) >= _UNLIMITED:
        return None
    return int(text)


def cgroup_limit() -> int | None:
    """The smallest memory limit of this process's cgroup and its ancestors, in bytes; None when unlimited or
    unknown. Only the levels the mount exposes are read (a container sees its own subtree)."""
    mounts, own, limits = cgroup_mounts(), own_cgroup(), []
    for version, name in (("v1", "memory.limit_in_bytes"), ("v2", "memory.max")):
        if version not in mounts or version not in own:
            continue
        level = mounts[version] / own[version].lstrip("/")
        while True:
            if (limit := _read_limit(level / name)) is not None:
                limits.append(limit)
            if level == mounts[version]:
                break
            level = level.parent
    return min(limits) if limits else None


def machine_memory() -> int:
    """Physical memory of the machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def object_store_bytes() -> int | None:
    """The object store a private Ray should get here: Ray's default share of the cgroup limit when that limit is
    below the machine's memory (None: leave it to Ray, which then sees the right amount)."""
    limit = cgroup_limit()
    if limit is None or limit >= machine_memory():
        return None
    return int(limit * OBJECT_STORE_SHARE)


#: Batches between heap trims in a loop over batches (``trim_every``): milliseconds each, against seconds of batches.
TRIM_EVERY = 50
#: ... in a loop that only scores (validation, ``qgdist evaluate``). Without a backward pass a batch's own working set
#: is small, and the freed heap piling up between trims sets the peak: in a 2-rank validation of 90k jets, every
#: 10 batches kept each rank's peak RSS 130-220 MB lower than every 50, at the same wall time (docs/operations.md).
#: In training every 10 changed nothing: there the step's own working set sets the peak.
SCORING_TRIM_EVERY = 10


def trim_every(batches: int, every: int = TRIM_EVERY) -> None:
    """``release_free_memory`` once every ``every`` batches (``batches``: how many a loop has done so far).

    Training, validation and evaluation loops call it: their batches are padded to their longest jet, so without
    it glibc's heap grows with the number of batches run, not with what the loop holds.
    """
    if batches % every == 0:
        release_free_memory()


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere).

    glibc keeps freed memory in its heap and raises its mmap threshold as large blocks are freed, so a process
    that allocates many variably-sized temporaries (batches of jets padded to their longest jet, decoded
    blocks) grows with the amount of work it has done, not with what it holds. Workers call this after each unit
    of work: a few milliseconds, against seconds of work per unit. Arrow's own allocator (jemalloc or mimalloc,
    which keeps freed pages for reuse) is asked to return its unused memory too.
    """
    import sys

    global _libc
    if "pyarrow" in sys.modules:
        sys.modules["pyarrow"].default_memory_pool().release_unused()
    if _libc is None:
        import ctypes
        import ctypes.util

        try:
            lib = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None
