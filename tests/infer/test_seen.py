"""A model knows which jets it trained and validated on: evaluate and predict count them in what they are asked to
score, and refuse unless told to score anyway; a run refuses to resume on another dataset.

The expected counts are measured independently: by reading the (row) of every jet in the training dataset's
train+val shards and in the scored split back from the shards, and intersecting them.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from qgdist.cli import main
from qgdist.core.errors import IncompatibleCheckpoint, InputError
from qgdist.data.config import DataConfig
from qgdist.data.convert import ConvertConfig, convert
from qgdist.data.identity import TrainedOn
from qgdist.data.loader import ShardLoader
from qgdist.data.preprocessing import Preprocessing
from qgdist.data.shards.manifest import read_manifest
from qgdist.infer.evaluate import EvalConfig, evaluate_checkpoint
from qgdist.infer.predict import PredictConfig, predict
from qgdist.models import get_model, model_config
from qgdist.pipelines.toy_data import toy_file
from qgdist.train.checkpoint import Checkpoint
from qgdist.train.checkpointer import Checkpointer
from qgdist.train.config import TrainConfig, resolve
from qgdist.train.loop import train

TINY = {"conv_params": ((4, (8, 8)),), "fc_params": ((16, 0.1),)}


def _convert(raw: str, out, split=(0.8, 0.1, 0.1)) -> str:
    convert(ConvertConfig(source="energyflow", inputs=[raw], out=str(out), split=split, executor="local",
                          progress=False))
    return str(out)


def _rows(data: str, splits: tuple[str, ...]) -> set[int]:
    rows: set[int] = set()
    for split in splits:
        if read_manifest(data).splits[split]["samples"]:
            for batch in ShardLoader(DataConfig(data, batch_size=64), split, training=False).collated(0):
                rows |= set(batch["row"].tolist())
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Dataset A (a toy file, default split), a checkpoint trained on A, and B: the same file converted again
    with another split, plus a renamed copy converted with A's split."""
    root = tmp_path_factory.mktemp("seen")
    raw = toy_file("energyflow", 600, root / "raw" / "qg.npz", seed=21)
    copy = root / "copy" / "renamed.npz"
    copy.parent.mkdir()
    shutil.copyfile(raw, copy)
    a = _convert(raw, root / "a")
    b = _convert(raw, root / "b", split=(0.2, 0.1, 0.7))
    renamed = _convert(str(copy), root / "renamed")
    manifest = read_manifest(a)
    cfg = resolve(TrainConfig.of(data=a, model="particlenet-lite", model_kwargs=TINY, storage=str(root), run_name="r"))
    model = get_model("particlenet-lite", **TINY, in_features=7)
    Checkpointer(cfg.run).save(Checkpoint(
        model_name="particlenet-lite", model_config=model_config(model), weights=model.state_dict(),
        preprocessing=Preprocessing.from_manifest(manifest, a), config=cfg.to_dict(), fingerprint=cfg.fingerprint(),
        epoch=1, global_step=3, dataset=TrainedOn.of_manifest(manifest, a).to_dict()), auc=0.5)
    return {"root": root, "raw": raw, "a": a, "b": b, "renamed": renamed, "run": cfg.run_dir}


def test_a_dataset_knows_its_sources_and_its_id(world, tmp_path):
    a, b = read_manifest(world["a"]), read_manifest(world["b"])
    sha = hashlib.sha256(open(world["raw"], "rb").read()).hexdigest()
    assert a.sources == {"qg.npz": {"sha256": sha, "bytes": len(open(world["raw"], "rb").read()), "rows": 600}}
    assert len(a.dataset_id) == 16 and a.dataset_id != b.dataset_id     # same file, other split: another dataset
    again = read_manifest(_convert(world["raw"], tmp_path / "again"))
    assert again.dataset_id == a.dataset_id                              # same file, same settings: the same one


@pytest.mark.parametrize("other", ["b", "renamed"])
def test_evaluate_counts_and_refuses_jets_the_model_trained_on(world, other, tmp_path, capsys):
    trained = _rows(world["a"], ("train", "val"))
    scored = _rows(world[other], ("test",))
    expected = len(trained & scored) if other == "b" else len(scored - _rows(world["a"], ("test",)))
    assert expected > 30   # not vacuous: most of the scored test split was A's training data
    code = main(["evaluate", "--checkpoint", world["run"], "--data", world[other], "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert code == 2 and f"holds {expected} jets the model trained or validated on" in err, err
    assert "--score-seen-jets" in err and not (tmp_path / "e").exists()   # refused before writing anything
    out = evaluate_checkpoint(EvalConfig(checkpoint=world["run"], data=world[other], out=str(tmp_path / "e"),
                                         score_seen=True, progress=False))
    doc = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert doc["seen_jets"] == expected and out["n_jets"] == len(scored)


def test_evaluate_on_the_models_own_test_split_sees_nothing(world, tmp_path):
    evaluate_checkpoint(EvalConfig(checkpoint=world["run"], data=world["a"], out=str(tmp_path), progress=False))
    assert json.loads((tmp_path / "metrics.json").read_text())["seen_jets"] == 0


def test_predict_on_the_raw_training_file_is_refused(world, tmp_path):
    seen = len(_rows(world["a"], ("train", "val")))
    with pytest.raises(InputError, match=f"holds {seen} jets the model trained or validated on"):
        predict(PredictConfig(checkpoint=world["run"], data=[world["raw"]], out=str(tmp_path / "p"),
                              executor="local", progress=False))
    summary = predict(PredictConfig(checkpoint=world["run"], data=[world["raw"]], out=str(tmp_path / "p"),
                                    executor="local", progress=False, score_seen=True))
    assert summary["seen_jets"] == seen and summary["jets"] == 600


def test_a_run_refuses_to_resume_on_another_dataset(world, tmp_path):
    kw = dict(model="particlenet-lite", model_kwargs=TINY, storage=str(tmp_path), run_name="pn", workers=0,
              epochs=1, batch_size=32, max_steps=2, track=False, progress=False)
    train(resolve(TrainConfig.of(data=world["a"], **kw)))
    a, b = read_manifest(world["a"]).dataset_id, read_manifest(world["b"]).dataset_id
    with pytest.raises(IncompatibleCheckpoint, match=f"trained on dataset {a} .*--data is dataset {b}"):
        train(resolve(TrainConfig.of(data=world["b"], **(kw | {"max_steps": 4}))))
    # with the explicit escape it goes on, and says so
    out = train(resolve(TrainConfig.of(data=world["b"], **(kw | {"max_steps": 4, "allow_config_change": True}))))
    assert out.global_step == 4
    assert torch.load(f"{out.checkpoint}/state.pt", weights_only=True)["dataset"]["dataset_id"] == b


def test_a_predict_rerun_never_destroys_the_scores_already_there(world, tmp_path):
    """Refused without --overwrite; a --overwrite rerun failing on a bad row after writing parts leaves the
    earlier scores complete; a finished one replaces them entirely."""
    import numpy as np
    import pyarrow.parquet as pq

    from qgdist.data.sources.errors import BadRowError

    unseen = toy_file("energyflow", 300, tmp_path / "unseen.npz", seed=99)
    out = tmp_path / "scores"
    kw = dict(checkpoint=world["run"], out=str(out), executor="local", progress=False, rows_per_task=100)
    first = predict(PredictConfig(data=[unseen], **kw))
    before = (out / "summary.json").read_text()

    def whole() -> bool:
        names = json.loads((out / "summary.json").read_text())["parts"]
        return (out / "summary.json").read_text() == before and \
            sum(pq.read_table(out / n).num_rows for n in names) == first["jets"] == 300

    with pytest.raises(InputError, match="already holds scores"):
        predict(PredictConfig(data=[unseen], **kw))
    with np.load(unseen) as f:
        X, y = f["X"].copy(), f["y"]
    X[250, 0, 0] = np.inf   # the third unit: two parts are written first
    np.savez(tmp_path / "bad.npz", X=X, y=y)
    with pytest.raises(BadRowError, match="row 250"):
        predict(PredictConfig(data=[str(tmp_path / "bad.npz")], overwrite=True, **kw))
    assert whole()
    again = predict(PredictConfig(data=[unseen], overwrite=True, **(kw | {"rows_per_task": 150})))
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "ray.log")
    assert files == sorted(again["parts"] + [again["roc"], "summary.json"]) and len(again["parts"]) == 2


def test_an_evaluation_is_replaced_only_when_asked_and_only_once_complete(world, tmp_path, capsys):
    args = ["evaluate", "--checkpoint", world["run"], "--data", world["a"], "--out", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    first = json.loads((tmp_path / "metrics.json").read_text())
    assert first["files"] == {"roc": "roc.png", "scores": "scores.parquet"}
    assert main(args) == 2 and "already holds an evaluation" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    second = json.loads((tmp_path / "metrics.json").read_text())
    assert second["files"]["scores"].startswith("g-") and second["auc"] == first["auc"]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        [*second["files"].values(), "metrics.json"])
