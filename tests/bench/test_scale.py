"""``qgdist bench scale --mem-cap``: the stages run inside the cap, and a stage that does not fit in it is a
reported failure (an out-of-memory kill), not a crash of the bench."""

from __future__ import annotations

import json
import re

import pytest

from qgdist.bench.memcap import MemoryCap
from qgdist.bench.scale import BenchScaleConfig, run, table
from tests.commands import assert_finite, markdown_rows, number, qgdist


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
    """``qgdist bench scale`` run as a command: its table and bench_scale.json."""
    out = qgdist("bench", "scale", "--jets", 600, "--images", 0, "--mem-cap", 3.0, "--until", "convert",
                 "--workers", 1, "--jets-per-file", 300, "--workdir", tmp_path).stdout
    results = json.loads((tmp_path / "bench_scale.json").read_text())
    assert results["failed"] == []
    gen, conv = results["rows"]
    assert (gen["stage"], conv["stage"]) == ("generate clouds", "convert clouds")
    assert gen["rows"] == conv["rows"] == conv["written"] == 600
    assert conv["rejected"] == 0 and 0 < conv["train_rows"] < 600 and conv["shards"] >= 1
    assert assert_finite(results["rows"], "bench_scale.json") > 20
    for r in (gen, conv):
        assert r["cap_method"] == cgroup and r["cap_mb"] == 3000 and r["oom_kills"] == 0
        assert 0 < r["peak_anon_shmem_mb"] < 3000
        for key in ("loop_s", "wall_s", "peak_pss_mb", "max_hwm_mb", "bytes_out"):
            assert r[key] > 0, (r["stage"], key)
    assert conv["peak_anon_shmem_mb"] > 150   # Ray's processes were inside the cgroup too
    assert conv["ray_start_s"] > 0 and conv["bytes_in"] == gen["bytes_out"]
    for r in (gen, conv):   # each stage's memory over time: its samples, the peaks among them, within the cap
        line = r["timeline"]
        assert len(line["s"]) == len(line["pss_mb"]) == len(line["capped_mb"]) >= 2, r["stage"]
        assert line["s"] == sorted(line["s"]) and 0 < line["s"][-1] <= r["wall_s"]
        assert max(line["pss_mb"]) == pytest.approx(r["peak_pss_mb"], abs=0.1)
        assert max(line["capped_mb"]) == pytest.approx(r["peak_anon_shmem_mb"], abs=0.1)
    from PIL import Image   # the plot of those timelines, read back with a stock reader

    with Image.open(tmp_path / "bench_scale_memory.png") as png:
        assert png.format == "PNG" and png.size[0] > 2 * png.size[1]   # two panels side by side

    header = ["stage", "rows", "rows/s", "wall s", "peak PSS MB", "max proc HWM MB", "peak anon+shm MB", "cap MB",
              "OOM kills", "load before / after"]
    table = markdown_rows(out, header)
    assert [(t["stage"], t["rows"], t["cap MB"], t["OOM kills"]) for t in table] == [
        ("generate clouds", "600", "3,000", "0"), ("convert clouds", "600", "3,000", "0")]
    for t, r in zip(table, (gen, conv)):
        assert number(t["rows/s"]) == round(r["rows"] / r["loop_s"]) > 0
        assert number(t["peak anon+shm MB"]) == round(r["peak_anon_shmem_mb"])
        assert all(number(t[c]) >= 0 for c in ("wall s", "peak PSS MB", "max proc HWM MB"))
        assert re.fullmatch(r"[\d.]+ / [\d.]+", t["load before / after"])
    assert markdown_rows(out, ["stage", "scales", "rows/s ratio", "peak PSS ratio", "max proc HWM ratio",
                               "anon+shm ratio"]) == []   # one scale: no ratios


def test_a_stage_over_the_cap_is_a_reported_out_of_memory_failure(cgroup, tmp_path):
    cfg = BenchScaleConfig(jets=(20000,), images=(), mem_cap=0.12, until="convert", workdir=str(tmp_path))
    results = run(cfg)
    assert results["failed"] == ["generate clouds at 20,000"]
    (row,) = results["rows"]
    assert row["oom_kills"] >= 1 and "out-of-memory" in row["failed"]
    assert "| generate clouds | 20,000 | FAILED |" in table(results)


def test_every_larger_scale_is_compared_with_the_smallest():
    """Three scales give two ratio rows per stage (10x and 20x against 1x), not only the largest against 1x."""
    def row(scale: int, pss: float, rate: float) -> dict:
        return {"stage": "convert clouds", "scale": scale, "rows": scale, "rows_per_s": rate, "wall_s": 1.0,
                "peak_pss_mb": pss, "max_hwm_mb": pss / 2, "peak_anon_shmem_mb": pss * 0.9, "cap_mb": 4500,
                "oom_kills": 0, "load_before": "1.0 1.0 1.0", "load_after": "1.0 1.0 1.0"}

    results = {"rows": [row(100_000, 1000.0, 10.0), row(1_000_000, 1050.0, 12.0), row(2_000_000, 1200.0, 9.0)],
               "failed": []}
    ratios = markdown_rows(table(results), ["stage", "scales", "rows/s ratio", "peak PSS ratio", "max proc HWM ratio",
                                            "anon+shm ratio"])
    assert [(r["scales"], r["rows/s ratio"], r["peak PSS ratio"], r["anon+shm ratio"]) for r in ratios] == [
        ("1,000,000 / 100,000", "1.20", "1.05", "1.05"), ("2,000,000 / 100,000", "0.90", "1.20", "1.20")]
