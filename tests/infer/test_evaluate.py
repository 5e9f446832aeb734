"""``qgdist evaluate`` and ``qgdist export`` on real checkpoints (written by the project's Checkpointer) and shards.

Outputs are read back with stock libraries: pyarrow for the scores, onnxruntime for the ONNX file. ``evaluate
--track`` (metrics and outputs added to the training run) is tested against a real MLflow server in
tests/track/test_tracker.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import pytest
import torch
from tests.trainkit import strict_json, write_dataset

from qgdist.cli import main
from qgdist.data.config import DataConfig
from qgdist.data.loader import ShardLoader
from qgdist.infer.evaluate import load_model
from qgdist.infer.export import INPUT_NAMES, example_inputs, knn_onnx
from qgdist.models import get_model, model_config
from qgdist.train.checkpoint import Checkpoint
from qgdist.train.checkpointer import Checkpointer
from qgdist.train.config import TrainConfig, resolve
from qgdist.train.metrics import compute_metrics

MODELS = {"cloud": ("particlenet-lite", {}), "image": ("resnet15", {"fmaps": [8, 8], "nblocks": 1})}
TEST_JETS = 37


@pytest.fixture(scope="module", params=["cloud", "image"])
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A shard dataset and a run directory holding one checkpoint of a freshly initialised model."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    data = write_dataset(str(root / "data"), kind, {"train": [40], "val": [16], "test": [20, TEST_JETS - 20]})
    name, kwargs = MODELS[kind]
    cfg = resolve(TrainConfig.of(data=data, model=name, model_kwargs=kwargs, storage=str(root), run_name="run"))
    torch.manual_seed(0)
    model = get_model(name, **kwargs, **({"in_features": 7} if kind == "cloud" else {}))
    with torch.no_grad():   # non-trivial BatchNorm statistics, so eval mode really differs from train mode
        for module in model.modules():
            if isinstance(getattr(module, "running_var", None), torch.Tensor):
                module.running_var.uniform_(0.5, 2.0)
    from qgdist.data.preprocessing import Preprocessing
    from qgdist.data.shards.manifest import read_manifest

    pre = Preprocessing.from_manifest(read_manifest(data), data)   # what a training run records
    Checkpointer(cfg.run).save(Checkpoint(model_name=name, model_config=model_config(model), weights=model.state_dict(),
                                          preprocessing=pre, config=cfg.to_dict(), fingerprint=cfg.fingerprint(),
                                          epoch=1, global_step=3), auc=0.5)
    return {"kind": kind, "data": data, "run_dir": Path(cfg.run_dir), "model": model.eval()}


def test_the_model_is_rebuilt_from_its_checkpoint_with_its_weights(run: dict) -> None:
    model, checkpoint, _ = load_model(run["run_dir"])
    assert checkpoint.global_step == 3 and not model.training
    for (name, want), got in zip(run["model"].state_dict().items(), model.state_dict().values()):
        assert torch.equal(want, got), name


def test_evaluate_writes_metrics_plot_and_scores(run: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "eval"
    assert main(["evaluate", "--checkpoint", str(run["run_dir"]), "--data", run["data"], "--split", "test",
                 "--out", str(out), "--batch-size", "8", "--no-progress"]) == 0
    assert "ROC AUC" in capsys.readouterr().out

    scores = pq.read_table(out / "scores.parquet").to_pydict()
    assert len(scores["row"]) == TEST_JETS and len(set(scores["row"])) == TEST_JETS   # every jet exactly once
    assert set(scores) == {"file", "row", "is_quark", "score", "logit"}
    np.testing.assert_allclose(scores["score"], 1 / (1 + np.exp(-np.array(scores["logit"]))), rtol=1e-5)

    # The scores are the model's: recompute them from the shards with the same loader, in the same order.
    loader = ShardLoader(DataConfig(run["data"], batch_size=64), "test", training=False)
    inputs, labels = next(loader.epoch(0))
    with torch.no_grad():
        logits = run["model"](**inputs)
    np.testing.assert_allclose(scores["logit"], logits.numpy(), rtol=1e-4, atol=1e-5)
    assert scores["is_quark"] == labels.to(torch.uint8).tolist()

    doc = strict_json((out / "metrics.json").read_text())
    expected = compute_metrics(torch.tensor(scores["logit"]), torch.tensor(scores["is_quark"]), logits=True)
    assert doc["n_jets"] == TEST_JETS and doc["split"] == "test" and doc["global_step"] == 3
    for key in ("auc", "acc", "rej30", "rej50"):
        # JSON has no infinity: a rejection with no gluon left (1/0) is written as null
        want = expected[key] if np.isfinite(expected[key]) else None
        assert doc[key] == pytest.approx(want, rel=1e-5), key
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels).item()
    assert doc["loss"] == pytest.approx(bce, rel=1e-4)
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_refuses_data_of_the_other_kind(run: dict, tmp_path: Path, capsys) -> None:
    theirs = "image" if run["kind"] == "cloud" else "cloud"
    other = write_dataset(str(tmp_path / "other"), theirs, {"train": [8], "test": [8]})
    assert main(["evaluate", "--checkpoint", str(run["run_dir"]), "--data", other, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{other} does not fit the model" in err and f"kind: model '{run['kind']}', data '{theirs}'" in err


def test_export_round_trips_through_onnxruntime(run: dict, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    assert main(["export", "--checkpoint", str(run["run_dir"]), "--onnx", str(path)]) == 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = INPUT_NAMES[run["kind"]]
    assert [i.name for i in session.get_inputs()] == list(names)
    # Real jets from the shards this time, at a batch size the export never saw.
    loader = ShardLoader(DataConfig(run["data"], batch_size=5), "test", training=False)
    for inputs, _ in list(loader.epoch(0))[:3]:
        got = session.run(["logits"], {n: inputs[n].numpy() for n in names})[0]
        with torch.no_grad():
            want = run["model"](**inputs).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_export_never_replaces_a_file_with_an_unchecked_one(run: dict, tmp_path: Path, capsys) -> None:
    """An existing ONNX file is refused without --overwrite, and with it is replaced only once the new file has
    passed its check: a failing check leaves the old file byte for byte."""
    from qgdist.infer.export import export_model

    path = tmp_path / "model.onnx"
    path.write_bytes(b"the user's earlier export")
    assert main(["export", "--checkpoint", str(run["run_dir"]), "--onnx", str(path)]) == 2
    assert "--overwrite" in capsys.readouterr().err and path.read_bytes() == b"the user's earlier export"

    def failing(tmp: Path) -> None:
        assert tmp != path and tmp.stat().st_size > 1000   # the new file exists, under another name
        raise AssertionError("onnxruntime disagrees")

    with pytest.raises(AssertionError, match="disagrees"):
        export_model(run["model"], path, check=failing)
    assert path.read_bytes() == b"the user's earlier export" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx"]
    assert main(["export", "--checkpoint", str(run["run_dir"]), "--onnx", str(path), "--overwrite"]) == 0
    ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


class _KnnModule(torch.nn.Module):
    def forward(self, points: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return knn_onnx(points, 16, mask)


def test_knn_onnx_in_onnxruntime_matches_training_knn_with_ties_and_short_jets(tmp_path: Path) -> None:
    from qgdist.models.knn import knn

    cloud = example_inputs(get_model("particlenet-lite"), batch=6, particles=24, seed=3)
    cloud["points"][1, :6] = 0.0   # exact ties: the lower index must win in both
    cloud["points"][2, :10] = torch.tensor([0.1, 0.0]).repeat(10, 1)
    points = torch.nn.functional.pad(cloud["points"], (0, 0, 0, 16))
    mask = torch.nn.functional.pad(cloud["mask"], (0, 16), value=False)
    torch.onnx.export(_KnnModule(), (points, mask), str(tmp_path / "knn.onnx"), input_names=["points", "mask"],
                      output_names=["idx"], dynamic_axes={"points": {0: "b", 1: "p"}, "mask": {0: "b", 1: "p"}},
                      opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(tmp_path / "knn.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"points": points.numpy(), "mask": mask.numpy()})[0])
    want = knn(points, 16, mask)
    assert torch.equal(got[mask], want[mask])
