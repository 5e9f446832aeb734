"""Run a command and measure its whole process tree: wall time, peak memory (summed and per process).

Benchmarks run what they measure as a child process (its imports and start-up then count, and nothing of the
benchmark's own process does), sampling every ``interval`` seconds, or less often where a sample costs more than
``SAMPLER_SHARE`` of a core: reading a process's PSS walks its page tables in the kernel, ~2.7 ms per process of a
private Ray here (27 ms for ten, every 0.2 s: 13% of a core taken from what is measured, more with more
processes, so a bench of many processes was handicapped against one of few):

* ``peak_pss_mb`` / ``peak_rss_mb``: the largest sum over the tree (PSS counts shared pages once, split among
  the processes sharing them; RSS counts them in each);
* ``max_hwm_mb``: the largest single process's kernel peak mark (VmHWM), which catches peaks between samples;
  ``sum_hwm_mb`` sums every process's mark; ``hwm_mb_by_process``: name -> [summed marks, processes];
* ``timeline``: the summed PSS (and, under a cap, the capped memory) over time, at most ``TIMELINE_POINTS``
  points, each the largest sample of its stretch: where in a run its peak came.

With ``mem_cap`` (bytes) the command runs inside a memory limit (``qgdist.bench.memcap``: a cgroup of its own, or
a PSS watchdog where no cgroup controller is writable) and the result adds the cap's report: method, cap, the
cgroup's peaks and ``oom_kills`` (processes killed for want of memory; a run with kills is a failure).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

#: Points kept of a run's memory over time (each the largest of the samples it stands for).
TIMELINE_POINTS = 400
#: At most this share of one core goes to sampling: a sample that takes longer stretches the pause after it.
SAMPLER_SHARE = 0.05


def sampler_pause(interval: float, sample_s: float) -> float:
    """Seconds to wait after a sample that took ``sample_s``: ``interval``, or longer so that sampling takes at
    most ``SAMPLER_SHARE`` of the time."""
    return max(interval, sample_s / SAMPLER_SHARE - sample_s)


def _hwm(pid: int) -> int:
    """The kernel's peak-RSS mark of a process (VmHWM), in bytes; 0 where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def process_name(p: Any) -> str:
    """A process's name; for a Python process, its script or module (Ray workers, agents, the method itself)."""
    name = p.name()
    if name.startswith("python"):
        args = [a for a in p.cmdline()[1:] if not a.startswith("-")]
        name = os.path.basename(args[0]) if args else name
    return name


def tree_memory(root: Any, hwm: dict[int, int], names: dict[int, str] | None = None) -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over ``root`` and all its descendants; updates per-pid peak marks (and
    process names)."""
    import psutil

    pss = rss = 0
    for p in [root] + root.children(recursive=True):
        try:
            info = p.memory_full_info()
            pss += getattr(info, "pss", info.rss)
            rss += info.rss
            hwm[p.pid] = max(hwm.get(p.pid, 0), _hwm(p.pid))
            if names is not None and names.get(p.pid, "sh") == "sh":   # a capped command is sh until it execs
                names[p.pid] = process_name(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pss, rss


def measure_tree(cmd: list[str], env: dict[str, str] | None = None, interval: float = 0.2,
                 kill_when: Callable[[], bool] | None = None, check: bool = False,
                 mem_cap: int | None = None, cap_method: str | None = None) -> dict[str, Any]:
    """Run ``cmd`` in a new session; its wall seconds, output and the tree's memory (see the module docstring).

    ``kill_when``: polled at each sample; when it returns True the whole session is SIGKILLed (a lost machine),
    and the result says ``killed``. A non-zero exit is returned (``returncode``), or with ``check`` raised as a
    RuntimeError holding the end of the command's stderr (so is an out-of-memory kill under ``mem_cap``).
    """
    from qgdist.bench.memcap import MemoryCap

    cap = MemoryCap(mem_cap, "qgdist-bench", prefer=cap_method) if mem_cap else None
    try:
        return _measure(cmd, env, interval, kill_when, check, cap)
    finally:
        if cap is not None:
            cap.close()


def _measure(cmd: list[str], env: dict[str, str] | None, interval: float, kill_when: Callable[[], bool] | None,
             check: bool, cap: Any) -> dict[str, Any]:
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cap.wrap(cmd) if cap else cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                                 **(env or {})})
    root, peak, hwm, names, killed, over_cap = psutil.Process(proc.pid), [0, 0], {}, {}, False, False
    samples: list[tuple[float, float, float | None]] = []   # (s since start, tree PSS MB, capped memory MB)
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k=k, f=f: out.__setitem__(k, f.read()))
               for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
    for t in readers:
        t.start()
    while proc.poll() is None:
        sampled = time.perf_counter()
        pss, rss = tree_memory(root, hwm, names)
        sampled = time.perf_counter() - sampled
        peak = [max(peak[0], pss), max(peak[1], rss)]
        if cap is not None and not killed and cap.sample(pss):
            over_cap = True   # the watchdog's out-of-memory kill
        samples.append((time.perf_counter() - start, pss / 1e6, cap.last_anon_shmem / 1e6 if cap else None))
        if not killed and (over_cap or (kill_when is not None and kill_when())):
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(sampler_pause(interval, sampled))
    for t in readers:
        t.join()
    by_name: dict[str, list[float]] = {}
    for pid, mark in hwm.items():
        entry = by_name.setdefault(names.get(pid, "?"), [0.0, 0])
        entry[0] += mark / 1e6
        entry[1] += 1
    capped = cap.report(over_cap) if cap is not None else {}
    if check and (proc.returncode != 0 or capped.get("oom_kills")):
        oom = f", {capped['oom_kills']} out-of-memory kills under a {capped['cap_mb']:.0f} MB cap" \
            if capped.get("oom_kills") else ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}{oom}):\n{out.get('stderr', '')[-3000:]}")
    return capped | {"wall_s": time.perf_counter() - start, "returncode": proc.returncode, "killed": killed,
            "stdout": out.get("stdout", ""), "stderr": out.get("stderr", ""),
            "peak_pss_mb": peak[0] / 1e6, "peak_rss_mb": peak[1] / 1e6,
            "max_hwm_mb": max(hwm.values(), default=0) / 1e6, "sum_hwm_mb": sum(hwm.values()) / 1e6,
            "hwm_mb_by_process": by_name, "timeline": timeline(samples)}


def timeline(samples: list[tuple[float, float, float | None]],
             points: int = TIMELINE_POINTS) -> dict[str, list[float | None]]:
    """``samples`` (seconds, PSS MB, capped MB or None) cut into at most ``points`` equal runs of samples, each
    kept as its last time and its largest values, so that no peak is averaged away: ``{"s", "pss_mb",
    "capped_mb"}`` (``capped_mb``: the cgroup's anonymous + shared memory, or the watchdog's PSS; None uncapped)."""
    step = max(1, -(-len(samples) // points))
    out: dict[str, list[float | None]] = {"s": [], "pss_mb": [], "capped_mb": []}
    for i in range(0, len(samples), step):
        part = samples[i:i + step]
        capped = [c for _, _, c in part if c is not None]
        out["s"].append(round(part[-1][0], 2))
        out["pss_mb"].append(round(max(p for _, p, _ in part), 1))
        out["capped_mb"].append(round(max(capped), 1) if capped else None)
    return out
