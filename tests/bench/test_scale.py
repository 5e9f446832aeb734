"""``qgdist bench scale --mem-cap``: the stages run inside the cap, and a stage that does not fit in it is a
reported failure (an out-of-memory kill), not a crash of the bench."""

from __future__ import annotations

import json

import pytest

from qgdist.bench.memcap import MemoryCap
from qgdist.bench.scale import BenchScaleConfig, run, table


@pytest.fixture(scope="module")
def cgroup():
    cap = MemoryCap(100 << 20, "qgdist-test-probe")
    method = cap.method
    cap.close()
    if method == "watchdog":
        pytest.skip("no writable cgroup memory controller here (v1 or v2): run as root on Linux to test the cap")
    return method


@pytest.mark.slow
def test_capped_stages_complete_and_record_their_peaks(cgroup, tmp_path):
    cfg = BenchScaleConfig(jets=(600,), images=(), mem_cap=3.0, until="convert", workers=1,
                           jets_per_file=300, workdir=str(tmp_path))
    results = run(cfg)
    assert results["failed"] == []
    gen, conv = results["rows"]
    assert (gen["stage"], conv["stage"]) == ("generate clouds", "convert clouds")
    assert gen["rows"] == conv["rows"] == conv["written"] == 600
    for r in (gen, conv):
        assert r["cap_method"] == cgroup and r["cap_mb"] == 3000 and r["oom_kills"] == 0
        assert 0 < r["peak_anon_shmem_mb"] < 3000
    assert conv["peak_anon_shmem_mb"] > 150   # Ray's processes were inside the cgroup too
    assert json.loads((tmp_path / "bench_scale.json").read_text())["rows"][1]["written"] == 600


def test_a_stage_over_the_cap_is_a_reported_out_of_memory_failure(cgroup, tmp_path):
    cfg = BenchScaleConfig(jets=(20000,), images=(), mem_cap=0.12, until="convert", workdir=str(tmp_path))
    results = run(cfg)
    assert results["failed"] == ["generate clouds at 20,000"]
    (row,) = results["rows"]
    assert row["oom_kills"] >= 1 and "out-of-memory" in row["failed"]
    assert "| generate clouds | 20,000 | FAILED |" in table(results)
