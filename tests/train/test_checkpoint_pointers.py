"""The pointers of a run's checkpoints: ``latest.json`` moves with every save, ``best.json`` only to a higher
validation AUC; pruning keeps the last K and the best; ``--checkpoint`` finds a run's best (else latest) checkpoint,
or takes a checkpoint directory or file as named."""

from __future__ import annotations

import json

import pytest
import torch

from qgdist.core.errors import InputError
from qgdist.core.run import BEST, INDEX_FILE, LATEST, STATE_FILE
from qgdist.data.preprocessing import Preprocessing
from qgdist.train.checkpoint import Checkpoint
from qgdist.train.checkpointer import Checkpointer, DamagedCheckpoint, find_checkpoint, load_checkpoint


def _checkpoint(step: int, epoch: int = 0) -> Checkpoint:
    pre = Preprocessing(kind="cloud", source="energyflow", schema_version=2, preset="kin", max_particles=8,
                        jet_mean=(0.0, 0.0), jet_std=(1.0, 1.0), feature_names=("a",), feature_mean=(0.0,),
                        feature_std=(1.0,), label_convention="toy")
    return Checkpoint(model_name="particlenet-lite", model_config={}, weights={"w": torch.full((4,), float(step))},
                      preprocessing=pre, config={}, fingerprint={}, epoch=epoch, step=step % 10, global_step=step)


def _names(ckpt: Checkpointer) -> list[str]:
    return sorted(p.name for p in ckpt.root.iterdir())


def test_latest_follows_every_save_and_best_only_a_higher_auc(tmp_path):
    ckpt = Checkpointer(tmp_path / "run", keep_last=5)
    assert ckpt.latest() is None and ckpt.best() is None and ckpt.pointer(BEST) is None
    ckpt.save(_checkpoint(10, epoch=1))                    # mid-epoch: no AUC, no best
    assert ckpt.best() is None and ckpt.latest().name == "step-000000010"
    ckpt.save(_checkpoint(20, epoch=1), auc=0.70)
    ckpt.save(_checkpoint(30, epoch=2), auc=0.65)
    ckpt.save(_checkpoint(35, epoch=2))
    assert ckpt.best().name == "step-000000020" and ckpt.latest().name == "step-000000035"
    assert ckpt.pointer(BEST) == {"name": "step-000000020", "epoch": 1, "step": 0, "global_step": 20,
                                  "val_auc": 0.70}
    assert ckpt.pointer(LATEST) == {"name": "step-000000035", "epoch": 2, "step": 5, "global_step": 35,
                                    "val_auc": None}
    ckpt.save(_checkpoint(40, epoch=3), auc=0.71)
    assert ckpt.best().name == "step-000000040"
    assert load_checkpoint(ckpt.best()).global_step == 40


def test_a_best_pointer_without_an_auc_is_replaced_by_the_first_checkpoint_with_one(tmp_path):
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(_checkpoint(10), auc=0.5)
    ckpt.run.pointer(BEST).write_text(json.dumps({"name": "step-000000010", "val_auc": None}))
    ckpt.save(_checkpoint(20), auc=0.1)
    assert ckpt.best().name == "step-000000020"


def test_an_equal_auc_keeps_the_earlier_best(tmp_path):
    """The best is the first checkpoint to reach the highest AUC: a later tie is no better, and keeping the
    earlier one keeps what pruning must spare unchanged."""
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(_checkpoint(10), auc=0.8)
    ckpt.save(_checkpoint(20), auc=0.8)
    assert ckpt.best().name == "step-000000010"


def test_pruning_keeps_the_last_k_and_the_best(tmp_path):
    assert Checkpointer(tmp_path / "default").keep_last == 2   # --keep-last's default too (TrainConfig)
    ckpt = Checkpointer(tmp_path / "run", keep_last=2)
    ckpt.save(_checkpoint(10), auc=0.9)
    for step in (20, 30, 40):
        ckpt.save(_checkpoint(step), auc=0.5)
    assert _names(ckpt) == [BEST, LATEST, "step-000000010", "step-000000030", "step-000000040"]
    assert Checkpointer(tmp_path / "other", keep_last=0).keep_last == 1   # the latest is never pruned


def test_pruning_counts_only_committed_checkpoints(tmp_path):
    """A save that died before moving the pointer leaves a directory beyond the latest: it must not push a
    committed checkpoint out of the K kept (it is removed, being neither kept nor committed)."""
    ckpt = Checkpointer(tmp_path / "run", keep_last=2)
    ckpt.save(_checkpoint(10))
    ckpt.save(_checkpoint(20))
    (ckpt.root / "step-000000099").mkdir()
    ckpt.save(_checkpoint(30))
    assert _names(ckpt) == [LATEST, "step-000000020", "step-000000030"]


def test_a_damaged_best_pointer_stops_the_next_save_naming_it_after_the_commit(tmp_path):
    """The checkpoint is committed (``latest.json`` moved) before ``best.json`` is read; a damaged best pointer
    then stops the run with an error naming it, and nothing is pruned by it."""
    ckpt = Checkpointer(tmp_path / "run", keep_last=1)
    ckpt.save(_checkpoint(10))
    ckpt.run.pointer(BEST).write_text("{")
    with pytest.raises(DamagedCheckpoint, match="best.json: not a readable pointer") as err:
        ckpt.save(_checkpoint(20), auc=0.9)
    assert err.value.file == str(ckpt.run.pointer(BEST))
    assert ckpt.latest().name == "step-000000020" and "step-000000010" in _names(ckpt)


@pytest.mark.parametrize("text", ['["step-000000010"]', '{"name": "other"}', '{"epoch": 1}'])
def test_a_pointer_that_names_no_checkpoint_is_damaged(tmp_path, text):
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(_checkpoint(10))
    ckpt.run.pointer(LATEST).write_text(text)
    with pytest.raises(DamagedCheckpoint, match=r"latest.json: not a readable pointer \(no checkpoint name\)") as err:
        ckpt.latest()
    assert err.value.file == str(ckpt.run.pointer(LATEST))


def test_the_checkpoint_index_lists_the_state_file_with_its_size_and_hash(tmp_path):
    import hashlib

    path = Checkpointer(tmp_path / "run").save(_checkpoint(10))
    data = (path / STATE_FILE).read_bytes()
    assert json.loads((path / INDEX_FILE).read_text()) == {
        "global_step": 10, "files": {STATE_FILE: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]   # no temporary directory left


def test_an_index_that_does_not_list_the_state_file_is_damage(tmp_path):
    path = Checkpointer(tmp_path / "run").save(_checkpoint(10))
    (path / INDEX_FILE).write_text(json.dumps({"files": {}}))
    with pytest.raises(DamagedCheckpoint, match=f"{INDEX_FILE}: lists no {STATE_FILE}"):
        load_checkpoint(path)
    (path / INDEX_FILE).write_text("[]")
    with pytest.raises(DamagedCheckpoint, match=f"{INDEX_FILE}: lists no {STATE_FILE}"):
        load_checkpoint(path)


def test_checkpoint_finds_a_runs_best_else_its_latest_or_takes_what_is_named(tmp_path):
    ckpt = Checkpointer(tmp_path / "run")
    ckpt.save(_checkpoint(10))
    assert find_checkpoint(tmp_path / "run") == ckpt.latest()            # no best yet: the latest
    ckpt.save(_checkpoint(20), auc=0.8)
    ckpt.save(_checkpoint(30), auc=0.6)
    assert find_checkpoint(tmp_path / "run") == ckpt.root / "step-000000020"
    named = ckpt.root / "step-000000030"
    assert find_checkpoint(named) == named and find_checkpoint(named / STATE_FILE) == named / STATE_FILE
    model = tmp_path / "model.pt"
    model.write_bytes(_checkpoint(5).for_inference().to_bytes())
    assert find_checkpoint(model) == model and load_checkpoint(find_checkpoint(model)).global_step == 5


def test_checkpoint_refuses_a_folder_that_is_neither_run_nor_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: neither a checkpoint .no state.pt. nor a run directory") as err:
        find_checkpoint(tmp_path / "empty")
    assert err.value.field == "checkpoint" and err.value.file == str(tmp_path / "empty")


def test_each_kind_of_damage_names_the_file_to_look_at(tmp_path):
    """The error's ``file`` (and, for altered bytes, the hashes) say which file failed, as well as its message."""
    import hashlib

    path = Checkpointer(tmp_path / "run").save(_checkpoint(10))
    state, index = path / STATE_FILE, path / INDEX_FILE
    good = state.read_bytes()
    want = hashlib.sha256(good).hexdigest()
    state.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))   # one bit flipped
    got = hashlib.sha256(state.read_bytes()).hexdigest()
    with pytest.raises(DamagedCheckpoint) as err:
        load_checkpoint(path)
    assert str(err.value) == (f"{state}: {len(good)} bytes, sha256 {got[:12]}... (its index says {len(good)} "
                              f"bytes, {want[:12]}...)")
    assert (err.value.file, err.value.expected, err.value.got) == (str(state), want, got)
    for text, reason in (("{torn", "unreadable index"), (json.dumps({"files": {}}), f"lists no {STATE_FILE}")):
        index.write_text(text)
        with pytest.raises(DamagedCheckpoint) as err:
            load_checkpoint(path)
        assert str(err.value).startswith(f"{index}: {reason}") and err.value.file == str(index)
    index.unlink()   # no index: the file is checked by loading it
    state.write_bytes(b"not a torch file")
    with pytest.raises(DamagedCheckpoint) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{state}: unreadable (UnpicklingError: ") and err.value.file == str(state)
    state.unlink()
    with pytest.raises(DamagedCheckpoint) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: no {STATE_FILE}") and err.value.file == str(path)


def test_on_object_storage_each_file_lands_under_its_final_name_and_the_pointer_commits(tmp_path):
    """No atomic rename there (fsspec's memory:// stands in for S3 here; tests/train/test_s3.py runs moto's S3):
    the files are written in place, the index last, and the latest pointer makes the checkpoint the run's."""
    import hashlib

    ckpt = Checkpointer(f"memory://{tmp_path.name}/run")
    path = ckpt.save(_checkpoint(10))
    data = (path / STATE_FILE).read_bytes()
    assert json.loads((path / INDEX_FILE).read_text())["files"][STATE_FILE] == {
        "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert str(ckpt.latest()) == str(path) and load_checkpoint(path).global_step == 10
    assert torch.equal(load_checkpoint(ckpt.latest()).weights["w"], torch.full((4,), 10.0))
