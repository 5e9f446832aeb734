"""The benchmarks' process-tree measurement: memory of children counted, a kill takes the whole session."""

from __future__ import annotations

import sys
import time

import pytest

from qgdist.bench.memory import SAMPLER_SHARE, measure_tree, sampler_pause

# A parent that starts a child holding ~200 MB, then both sleep; the child writes its pid first.
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c",
    "import time; b = bytearray(200_000_000); b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); "
    "time.sleep(60)"], stdout=sys.stdout)
time.sleep(60)
"""


def test_a_childs_memory_counts_and_a_kill_ends_the_whole_tree():
    start = time.monotonic()
    run = measure_tree([sys.executable, "-c", TREE], kill_when=lambda: time.monotonic() - start > 4)
    assert run["killed"] and run["returncode"] != 0
    assert run["wall_s"] < 30                    # the sleeping child did not keep the run alive
    assert "ready" in run["stdout"]
    assert run["max_hwm_mb"] > 190 and run["peak_rss_mb"] > 190   # the child's 200 MB, seen from the parent's run


def test_a_normal_exit_is_measured_and_not_killed():
    run = measure_tree([sys.executable, "-c", "print('hi')"])
    assert run["returncode"] == 0 and not run["killed"] and run["stdout"].strip() == "hi"


def test_a_costly_sample_stretches_the_pause_so_sampling_stays_within_its_share():
    assert sampler_pause(0.2, 0.001) == 0.2                       # a cheap sample: the interval
    pause = sampler_pause(0.2, 0.05)                              # ten Ray processes' PSS took ~27 ms here
    assert pause > 0.2 and 0.05 / (0.05 + pause) == pytest.approx(SAMPLER_SHARE)   # sampling's share, at most
