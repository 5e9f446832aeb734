"""The benchmark's memory cap: the command runs inside it (its own cgroup), and exceeding it is a reported
out-of-memory failure (a cgroup's kernel kill, or the watchdog's where no controller is writable)."""

from __future__ import annotations

import sys

import pytest

from qgdist.bench.memcap import MemoryCap
from qgdist.bench.memory import measure_tree

# Holds ``MB`` megabytes (touched, so resident), prints its own memory cgroup and the limit qgdist sees there
# (what a private Ray's object store is sized from), then sleeps a little.
HOLD = """
import sys, time
from qgdist.core.memory import cgroup_limit
b = bytearray({mb} * 1_000_000)
b[::4096] = b"x" * len(b[::4096])
print(open("/proc/self/cgroup").read(), flush=True)
print("limit", cgroup_limit(), flush=True)
time.sleep(3)
"""


def _cgroup_or_skip() -> str:
    cap = MemoryCap(100 << 20, "qgdist-test-probe")
    method = cap.method
    cap.close()
    if method == "watchdog":
        pytest.skip("no writable cgroup memory controller here (v1 or v2): run as root on Linux to test the cap")
    return method


def test_the_command_runs_in_its_capped_cgroup_and_its_memory_is_seen():
    method = _cgroup_or_skip()
    run = measure_tree([sys.executable, "-c", HOLD.format(mb=120)], mem_cap=600_000_000, check=True)
    assert run["cap_method"] == method and run["oom_kills"] == 0 and run["returncode"] == 0
    own = run["cgroup"].split("/sys/fs/cgroup/")[1].split("/", 1)[1]   # the path below the controller's mount
    assert any(line.endswith(own) for line in run["stdout"].splitlines())   # the child was inside the cap
    assert 120 <= run["peak_anon_shmem_mb"] < 600 and run["cap_mb"] == 600
    limit = int(run["stdout"].split("limit ")[1].split()[0])
    assert abs(limit - 600_000_000) < 4096   # the kernel rounds the cap to pages


def test_exceeding_the_cap_is_a_reported_out_of_memory_failure():
    _cgroup_or_skip()
    cmd = [sys.executable, "-c", HOLD.format(mb=400)]
    run = measure_tree(cmd, mem_cap=150_000_000)
    assert run["oom_kills"] >= 1 and run["returncode"] != 0 and "/proc" not in run["stdout"]
    with pytest.raises(RuntimeError, match="out-of-memory kills under a 150 MB cap"):
        measure_tree(cmd, mem_cap=150_000_000, check=True)


def test_the_watchdog_kills_a_command_over_the_cap_where_no_cgroup_is_used():
    run = measure_tree([sys.executable, "-c", HOLD.format(mb=400)], mem_cap=150_000_000, cap_method="watchdog")
    assert run["cap_method"] == "watchdog" and run["oom_kills"] == 1 and run["killed"]
    assert measure_tree([sys.executable, "-c", HOLD.format(mb=20)], mem_cap=400_000_000,
                        cap_method="watchdog")["oom_kills"] == 0
