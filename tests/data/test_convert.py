"""The conversion on a real local Ray (file:// URIs), and what an interrupted conversion leaves behind."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

from qgdist.cli import main
from qgdist.data.config import DataConfig
from qgdist.data.convert import ConvertConfig, convert, verify_output
from qgdist.data.loader import ShardLoader
from qgdist.data.shards.manifest import read_manifest
from qgdist.data.sources.energyflow import _open_zip
from qgdist.data.sources.errors import BadRowError
from qgdist.generate.toy import ToyConfig, run


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from qgdist.core.ray import ensure_ray

    ensure_ray(None, num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.slow   # a local Ray
def test_ray_pipeline_matches_in_process_run_byte_for_byte(ray_local, tmp_path):
    run(ToyConfig("energyflow", 600, str(tmp_path / "a.npz"), seed=1))
    run(ToyConfig("cms", 20, str(tmp_path / "b.parquet"), seed=2))
    run(ToyConfig("root", 300, str(tmp_path / "c.root"), seed=3))     # ROOT read by entry range in Ray tasks
    for source, name, per_task in (("energyflow", "a.npz", 200), ("cms", "b.parquet", 8), ("columnar", "c.root", 100)):
        cfg = dict(source=source, inputs=[f"file://{tmp_path}/{name}"], rows_per_task=per_task, progress=False)
        by_ray = convert(ConvertConfig(out=f"file://{tmp_path}/ray_{source}", executor="ray", **cfg))
        local = convert(ConvertConfig(out=str(tmp_path / f"local_{source}"), executor="local", **cfg))
        assert by_ray.rows == local.rows and by_ray.rows["written"] == by_ray.rows["in"] > 0
        assert len({s.name.split("-")[1] for s in by_ray.shards}) == 3  # one task per unit, three units
        assert [(s.name, s.sha256) for s in by_ray.shards] == [(s.name, s.sha256) for s in local.shards]
        assert by_ray.stats == local.stats
        assert read_manifest(f"file://{tmp_path}/ray_{source}").shards == by_ray.shards


@pytest.mark.slow   # a local Ray
def test_a_deflated_file_spreads_over_the_tasks_like_a_stored_one_with_the_same_shards(ray_local, tmp_path,
                                                                                        monkeypatch):
    """A deflated npz is cut into units like a stored one (no --rows-per-task: at most 64 MiB of X a unit); one
    streaming reader inflates it once and every unit is decoded and written by its own task. The shards equal, byte for
    byte, those of the same jets in a stored npz of the same name (whose units read their own rows)."""
    import qgdist.data.sources.stream as stream

    run(ToyConfig("energyflow", 20000, str(tmp_path / "deflated" / "jets.npz"), seed=5))
    run(ToyConfig("energyflow", 20000, str(tmp_path / "stored" / "jets.npz"), seed=5, compress=False))
    by_ray = convert(ConvertConfig("energyflow", [str(tmp_path / "deflated" / "jets.npz")], str(tmp_path / "ray"),
                                   progress=False))
    opened = []
    monkeypatch.setattr(stream, "_open_zip", lambda path: opened.append(path) or _open_zip(path))
    local = convert(ConvertConfig("energyflow", [str(tmp_path / "deflated" / "jets.npz")], str(tmp_path / "local"),
                                  executor="local", progress=False))
    assert len(opened) == 1   # two units, one inflation of the file
    stored = convert(ConvertConfig("energyflow", [str(tmp_path / "stored" / "jets.npz")], str(tmp_path / "stored_out"),
                                   executor="local", progress=False))
    assert len({s.name.split("-")[1] for s in by_ray.shards}) == 2   # 20000 jets padded to M = 130: 16,131 a unit
    assert by_ray.rows == local.rows == stored.rows == {"in": 20000, "written": 20000, "rejected": 0}
    for other in (local, stored):
        assert [(s.name, s.sha256) for s in by_ray.shards] == [(s.name, s.sha256) for s in other.shards]
        assert by_ray.stats == other.stats


@pytest.mark.slow   # a local Ray
def test_a_streamed_units_rows_are_read_where_they_lie_in_the_object_store(ray_local, tmp_path):
    """``UNIT_BATCHES``: the task decodes a unit's raw rows in Ray's shared-memory object store, not in a copy on
    its own heap (Ray Data's default copies every batch: a unit's 64 MiB more in every task and scoring actor)."""
    import dataclasses

    from qgdist.data.sources.plan import plan_inputs
    from qgdist.data.sources.ray_units import UNIT_BATCHES, rows_of, unit_dataset

    run(ToyConfig("energyflow", 4000, str(tmp_path / "jets.npz"), seed=2))   # deflated: streamed units
    units, _, _ = plan_inputs("energyflow", [str(tmp_path / "jets.npz")], 2)

    def mapped_from(batch):
        """Per unit: the file mapped where its raw rows lie ("" for anonymous memory, such as the heap)."""
        import numpy as np

        out = []
        for _, raw in rows_of(batch):
            address = np.frombuffer(raw.x, np.uint8).ctypes.data
            with open("/proc/self/maps") as maps:
                for line in maps:
                    fields = line.split()
                    lo, hi = (int(v, 16) for v in fields[0].split("-"))
                    if lo <= address < hi:
                        out.append(fields[5] if len(fields) > 5 else "")
        return {"mapped_from": out}

    ds = unit_dataset([dataclasses.asdict(u) for u in units], units, consumers=2)
    found = [row["mapped_from"] for row in ds.map_batches(mapped_from, **UNIT_BATCHES, num_cpus=1).iter_rows()]
    assert len(found) == len(units) >= 2 and all(u.stream for u in units)
    assert all(path and "plasma" in path for path in found), found


@pytest.mark.slow   # a local Ray
def test_ray_pipeline_reports_bad_rows(ray_local, tmp_path):
    import numpy as np

    from qgdist.generate.formats import write_energyflow_npz

    X = np.zeros((30, 4, 4))
    X[:, :, 0], X[:, :, 3] = 10.0, 211.0
    y = np.ones(30)
    y[17] = -1
    write_energyflow_npz(str(tmp_path / "bad.npz"), X, y)
    with pytest.raises(BadRowError, match=r"bad.npz: row 17, field 'y'"):
        convert(ConvertConfig("energyflow", [str(tmp_path / "bad.npz")], str(tmp_path / "o"), rows_per_task=10,
                              progress=False))
    m = convert(ConvertConfig("energyflow", [str(tmp_path / "bad.npz")], str(tmp_path / "o"), rows_per_task=10,
                              progress=False, on_bad_row="quarantine"))
    assert m.rows == {"in": 30, "written": 29, "rejected": 1}


def _tars(d):
    return sorted(os.path.basename(p) for p in glob.glob(f"{d}/*.tar"))


def test_a_rerun_never_destroys_the_dataset_already_there(tmp_path, capsys):
    """A typo in the inputs, a rerun without --overwrite, and a --overwrite rerun killed halfway all leave the
    earlier dataset complete (inspect --verify passes); a finished --overwrite rerun replaces it entirely."""
    src, out = tmp_path / "big.npz", tmp_path / "out"
    run(ToyConfig("energyflow", 6000, str(src), seed=3, compress=False))
    convert(ConvertConfig("energyflow", [str(src)], str(out), rows_per_task=3000, executor="local", progress=False))
    before = (out / "manifest.json").read_text()
    assert len(_tars(out)) == 6

    def unchanged() -> bool:
        return (out / "manifest.json").read_text() == before and verify_output(str(out)) == [] and \
            main(["inspect", str(out), "--verify"]) == 0

    base = ["convert", "--source", "energyflow", "--out", str(out), "--no-ray", "--quiet"]
    for overwrite in ([], ["--overwrite"]):
        assert main(base + overwrite + [str(tmp_path / "typo.npz")]) == 2
        assert "typo.npz: whole file, field '<file>': file not found" in capsys.readouterr().err and unchanged()
    assert main(base + [str(src)]) == 2
    assert "already holds a converted dataset" in capsys.readouterr().err and unchanged()

    # A --overwrite rerun with smaller tasks, killed once it has written some shards of its own.
    proc = subprocess.Popen([sys.executable, "-m", "qgdist", *base, "--overwrite", "--rows-per-task", "40",
                             str(src)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not glob.glob(f"{out}/g-*/train-000003-*.tar"):
        assert proc.poll() is None, "conversion finished before it could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert unchanged()

    m = convert(ConvertConfig("energyflow", [str(src)], str(out), rows_per_task=2000, executor="local",
                              progress=False, overwrite=True))
    written = sorted(os.path.relpath(p, out) for p in glob.glob(f"{out}/**/*.tar", recursive=True))
    assert written == sorted(s.name for s in m.shards)   # nothing left of the first dataset or the killed rerun
    assert not glob.glob(f"{out}/**/*.tmp", recursive=True) and len(glob.glob(f"{out}/g-*")) == 1
    assert m.rows == {"in": 6000, "written": 6000, "rejected": 0} and verify_output(str(out)) == []
    # the new generation reads like any dataset
    assert sum(len(b["row"]) for b in ShardLoader(DataConfig(str(out), batch_size=500), "test",
                                                  training=False).collated(0)) == m.splits["test"]["samples"]
