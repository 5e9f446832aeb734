"""Checkpoints survive damage: every file is listed with its sha256 and verified on load; a resume skips a
damaged latest checkpoint (saying so) and continues from the newest intact one; an explicitly named damaged
checkpoint is an error naming the file."""

from __future__ import annotations

import json

import pytest
import torch

from qgdist.core.run import INDEX_FILE, LATEST, STATE_FILE
from qgdist.data.preprocessing import Preprocessing
from qgdist.train.checkpoint import Checkpoint, TrainingState
from qgdist.train.checkpointer import Checkpointer, DamagedCheckpoint, load_checkpoint


def _checkpoint(step: int) -> Checkpoint:
    pre = Preprocessing(kind="cloud", source="energyflow", schema_version=2, preset="kin", max_particles=8,
                        jet_mean=(0.0, 0.0), jet_std=(1.0, 1.0), feature_names=("a",), feature_mean=(0.0,),
                        feature_std=(1.0,), label_convention="toy")
    training = TrainingState(optimizer={}, scheduler={"last_epoch": step}, scaler={}, schedule_steps=9,
                             rng=[{}], loader=[{"epoch": 0, "step": step, "world_size": 1}])
    return Checkpoint(model_name="particlenet-lite", model_config={}, weights={"w": torch.full((64,), float(step))},
                      preprocessing=pre, config={}, fingerprint={}, step=step, global_step=step, training=training)


@pytest.fixture
def run(tmp_path):
    """A run with checkpoints at steps 2, 4 and 6 (6 the latest)."""
    ckpt = Checkpointer(tmp_path, keep_last=3)
    for step in (2, 4, 6):
        ckpt.save(_checkpoint(step))
    return ckpt


def _resumed_step(ckpt: Checkpointer) -> tuple[int, list[str]]:
    point = ckpt.resume_point()
    return point.checkpoint.global_step, point.skipped


def test_intact_checkpoints_resume_from_the_latest(run):
    assert _resumed_step(run) == (6, [])
    index = json.loads((run.latest() / INDEX_FILE).read_text())
    assert index["files"][STATE_FILE]["bytes"] == (run.latest() / STATE_FILE).stat().st_size


@pytest.mark.parametrize("damage", ["truncated state", "altered state", "missing state", "torn index"])
def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_one(run, damage):
    latest = run.latest()
    state = latest / STATE_FILE
    if damage == "truncated state":
        state.write_bytes(state.read_bytes()[:1000])
    elif damage == "altered state":   # same size, one byte flipped inside the weights: only the hash can tell
        data = bytearray(state.read_bytes())
        data[len(data) // 2] ^= 0xFF
        state.write_bytes(bytes(data))
    elif damage == "missing state":
        state.unlink()
    else:
        (latest / INDEX_FILE).write_text('{"files": {"state.pt": ')
    step, skipped = _resumed_step(run)
    assert step == 4
    assert len(skipped) == 1 and "step-000000006" in skipped[0] and skipped[0].endswith("skipped"), skipped


def test_a_torn_pointer_falls_back_to_the_newest_intact_checkpoint(run):
    (run.root / LATEST).write_text('{"name": "step-0000')
    step, skipped = _resumed_step(run)
    assert step == 6 and "latest.json" in skipped[0]


def test_when_every_checkpoint_is_damaged_the_run_refuses_to_start_afresh(run):
    for name in ("step-000000002", "step-000000004", "step-000000006"):
        (run.root / name / STATE_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(DamagedCheckpoint, match="every checkpoint is damaged") as err:
        run.resume_point()
    lines = str(err.value).splitlines()
    assert lines[0] == f"{run.root}: every checkpoint is damaged, so the run cannot continue:"
    assert [line.split("/")[-2] for line in lines[1:4]] == ["step-000000006", "step-000000004", "step-000000002"]
    assert all(line.startswith("  checkpoint ") and line.endswith(": skipped") for line in lines[1:4])
    assert lines[4:] == ["Move the run directory aside (or use another --run-name) to start afresh."]
    assert err.value.file == str(run.root)


def test_a_checkpoint_beyond_the_latest_pointer_is_never_resumed_from(run, tmp_path):
    """A save killed before its pointer moved (object storage has no atomic rename) left an intact step 8 behind:
    it was never committed, so the run continues from step 6."""
    import shutil

    orphan = Checkpointer(tmp_path / "elsewhere").save(_checkpoint(8))
    shutil.copytree(orphan, run.root / orphan.name)
    assert _resumed_step(run) == (6, [])


def test_a_named_checkpoint_is_the_resume_point_as_named(run):
    named = run.root / "step-000000004"
    point = run.resume_point(str(named))
    assert str(point.path) == str(named) and point.checkpoint.global_step == 4 and point.skipped == []


def test_an_explicitly_named_damaged_checkpoint_is_an_error_naming_the_file(run, tmp_path):
    state = run.latest() / STATE_FILE
    state.write_bytes(state.read_bytes()[:-10])
    with pytest.raises(DamagedCheckpoint, match=r"step-000000006/state.pt: \d+ bytes, sha256 .* index says"):
        run.resume_point(str(run.latest()))
    # a file without an index (model.pt) is checked by loading it
    model = tmp_path / "model.pt"
    model.write_bytes(_checkpoint(1).for_inference().to_bytes()[:500])
    with pytest.raises(DamagedCheckpoint, match="model.pt: unreadable"):
        load_checkpoint(model)
