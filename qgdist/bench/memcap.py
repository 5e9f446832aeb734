"""A memory cap around a benchmarked command: a cgroup of its own (v1 or v2), or a watchdog where there is none.

``MemoryCap(cap_bytes, name)`` picks, in order:

* ``cgroup-v1``: a child of this process's memory cgroup (``/sys/fs/cgroup/memory/<own path>/<name>``) with
  ``memory.limit_in_bytes``; the kernel reclaims page cache and then OOM-kills a process of the group when its
  memory cannot fit. Page cache (files read and written) counts toward a v1 cgroup, so ``max_usage_in_bytes``
  reaches the cap whenever a stage moves more data than the cap; the figure that says what a stage *needs* is the
  peak of the non-reclaimable part, anonymous memory plus shared memory (Ray's object store in ``/dev/shm``),
  sampled from ``memory.stat`` (``peak_anon_shmem_mb``).
* ``cgroup-v2``: the same under the unified hierarchy (``memory.max``), where this process's cgroup delegates the
  memory controller to a child (it must already list ``memory`` in ``cgroup.subtree_control``, or accept it);
* ``watchdog``: elsewhere (no writable controller, not root, macOS): nothing can stop an allocation, so the
  measuring loop kills the command's process group once the tree's summed PSS passes the cap, and reports it as
  an out-of-memory kill. A spike shorter than the sampling interval can slip through: prefer a cgroup.

The command enters the cgroup before it executes (``sh -c 'echo $$ > cgroup.procs; exec ...'``), so every process
it starts, Ray's included, is inside. ``close()`` kills whatever is left in the group and removes it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from qgdist.core.memory import cgroup_mounts, own_cgroup

MB = 1e6


class MemoryCap:
    """A memory limit of ``cap_bytes`` for one command (see the module docstring); ``method`` says which kind
    (``prefer`` names one: ``cgroup-v1``, ``cgroup-v2`` or ``watchdog``; the watchdog is what is left)."""

    def __init__(self, cap_bytes: int, name: str, prefer: str | None = None) -> None:
        self.cap = int(cap_bytes)
        self.dir: Path | None = None
        self.method = "watchdog"
        self.peak_anon_shmem = self.peak_shmem = self.last_anon_shmem = 0
        for method in ("cgroup-v1", "cgroup-v2"):
            if prefer not in (None, method):
                continue
            try:
                self.dir = self._make(method, f"{name}-{os.getpid()}")
            except OSError:
                continue
            self.method = method
            break

    def _make(self, method: str, name: str) -> Path:
        version = method[-2:]
        mount, own = cgroup_mounts().get(version), own_cgroup().get(version)
        if mount is None or own is None:
            raise OSError(f"no {method} hierarchy")
        parent = mount / own.lstrip("/")
        if version == "v2" and "memory" not in (parent / "cgroup.subtree_control").read_text().split():
            (parent / "cgroup.subtree_control").write_text("+memory")
        path = parent / name
        path.mkdir(exist_ok=True)
        try:
            if version == "v1":
                (path / "memory.limit_in_bytes").write_text(str(self.cap))
                # no swap either (where swap accounting exists): the cap is on memory, not on memory + swap
                memsw = path / "memory.memsw.limit_in_bytes"
                if memsw.exists():
                    memsw.write_text(str(self.cap))
            else:
                (path / "memory.max").write_text(str(self.cap))
                if (path / "memory.swap.max").exists():
                    (path / "memory.swap.max").write_text("0")
        except OSError:
            path.rmdir()
            raise
        return path

    # -- running inside it ---------------------------------------------------------------------------------------
    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` made to enter the cgroup before it runs (unchanged for the watchdog)."""
        if self.dir is None:
            return cmd
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.dir / "cgroup.procs"), *cmd]

    def members(self) -> list[int]:
        """Pids in the cgroup (empty for the watchdog)."""
        if self.dir is None:
            return []
        try:
            return [int(p) for p in (self.dir / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def _stat(self) -> dict[str, int]:
        out: dict[str, int] = {}
        try:
            for line in (self.dir / "memory.stat").read_text().splitlines():   # type: ignore[operator]
                key, value = line.split()
                out[key] = int(value)
        except (OSError, TypeError, ValueError):
            pass
        return out

    def sample(self, tree_pss: int) -> bool:
        """Record one sample; True when the watchdog's cap is exceeded (the caller kills the command)."""
        if self.dir is None:
            self.last_anon_shmem = tree_pss
            self.peak_anon_shmem = max(self.peak_anon_shmem, tree_pss)
            return tree_pss > self.cap
        stat = self._stat()
        if self.method == "cgroup-v1":   # v1 counts shmem inside "cache"; rss is anonymous memory
            anon, shmem = stat.get("total_rss", stat.get("rss", 0)), stat.get("total_shmem", stat.get("shmem", 0))
        else:
            anon, shmem = stat.get("anon", 0), stat.get("shmem", 0)
        self.last_anon_shmem = anon + shmem
        self.peak_anon_shmem = max(self.peak_anon_shmem, anon + shmem)
        self.peak_shmem = max(self.peak_shmem, shmem)
        return False

    def oom_kills(self) -> int:
        """Processes the kernel killed for want of memory in this cgroup."""
        if self.dir is None:
            return 0
        name = "memory.oom_control" if self.method == "cgroup-v1" else "memory.events"
        try:
            for line in (self.dir / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except OSError:
            pass
        return 0

    def peak_usage(self) -> int:
        """The kernel's peak mark of the cgroup's charge (page cache included); 0 where unavailable."""
        if self.dir is None:
            return 0
        name = "memory.max_usage_in_bytes" if self.method == "cgroup-v1" else "memory.peak"
        try:
            return int((self.dir / name).read_text())
        except (OSError, ValueError):
            return 0

    def report(self, watchdog_killed: bool = False) -> dict[str, Any]:
        """What the cap saw: method, cap, peaks, out-of-memory kills."""
        return {"cap_mb": self.cap / MB, "cap_method": self.method, "cgroup": str(self.dir) if self.dir else None,
                "peak_anon_shmem_mb": self.peak_anon_shmem / MB, "peak_shmem_mb": self.peak_shmem / MB,
                "peak_cgroup_mb": self.peak_usage() / MB,
                "oom_kills": self.oom_kills() + int(watchdog_killed)}

    def close(self) -> None:
        """Kill what is left in the cgroup (a Ray worker that outlived its driver) and remove it."""
        if self.dir is None:
            return
        for _ in range(50):
            pids = self.members()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        try:
            self.dir.rmdir()
        except OSError:
            pass
        self.dir = None

    def __enter__(self) -> MemoryCap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
