"""End to end on files in the weaver/ParT layout: ROOT, jagged parquet and HDF5 convert together, a Particle
Transformer trains on them, and it scores the raw files (and the EnergyFlow npz of the same jets) exactly as it
scores the converted shards."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("uproot")
pytest.importorskip("h5py")

from qgdist.data.convert import ConvertConfig, convert  # noqa: E402
from qgdist.data.sources.errors import BadRowError  # noqa: E402
from qgdist.generate.toy import ToyConfig, run  # noqa: E402
from qgdist.train.config import TrainConfig, resolve  # noqa: E402
from qgdist.infer.evaluate import EvalConfig, evaluate_checkpoint  # noqa: E402
from qgdist.train.loop import train  # noqa: E402
from qgdist.infer.predict import PredictConfig, predict  # noqa: E402

# convert + train + evaluate + predict: 218 s at a load of 11 on the 2 shared cores (2026-12-06), so marked slow
pytestmark = pytest.mark.slow

TINY = {"embed_dims": [16, 32, 16], "pair_embed_dims": [8, 8], "num_heads": 4, "num_layers": 2,
        "num_cls_layers": 1}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("part")
    raw = root / "raw"
    run(ToyConfig("root", 600, str(raw / "a.root"), seed=21))
    run(ToyConfig("parquet-jagged", 200, str(raw / "b.parquet"), seed=22))
    run(ToyConfig("h5", 200, str(raw / "c.h5"), seed=23))
    manifest = convert(ConvertConfig(source="columnar", inputs=[str(raw)], out=str(root / "shards"),
                                     executor="local", progress=False))
    cfg = resolve(TrainConfig.of(data=str(root / "shards"), model="particle-transformer", model_kwargs=TINY,
                                 workers=0, epochs=3, batch_size=64, lr=1e-3, storage=str(root / "runs"),
                                 run_name="part", track=False, progress=False, checkpoint_every=0))
    train(cfg)
    run_dir = str(root / "runs" / "part")
    ev = evaluate_checkpoint(EvalConfig(checkpoint=run_dir, data=str(root / "shards"), split="test",
                                        out=str(root / "eval"), progress=False))
    return {"root": root, "raw": raw, "run": run_dir, "manifest": manifest, "eval": ev}


def _logits(path) -> dict[tuple[str, int], float]:
    table = pq.read_table(path, columns=["file", "row", "logit"]).to_pydict()
    return {(f, r): v for f, r, v in zip(table["file"], table["row"], table["logit"])}


def _scored(out) -> dict[tuple[str, int], float]:
    scored = {}
    for part in sorted(out.glob("part-*.parquet")):
        scored |= _logits(part)
    return scored


def test_root_parquet_and_hdf5_convert_train_and_score(trained, tmp_path):
    m = trained["manifest"]
    assert m.source == "columnar" and m.rows == {"in": 1000, "written": 1000, "rejected": 0}
    assert sorted(i.rsplit("/", 1)[-1] for i in m.inputs) == ["a.root", "b.parquet", "c.h5"]
    ev = trained["eval"]
    assert ev["metrics"]["auc"] > 0.65, ev["metrics"]        # it learned (chance: 0.5)
    reference = _logits(ev["paths"]["scores"])
    # the raw files are the training files: scoring them is refused unless asked for, and counted
    summary = predict(PredictConfig(checkpoint=trained["run"], data=[str(trained["raw"])], out=str(tmp_path / "p"),
                                    executor="local", progress=False, score_seen=True))
    assert summary["input"] == "columnar" and summary["jets"] == 1000 and summary["rejected"] == 0
    assert summary["seen_jets"] == m.splits["train"]["samples"] + m.splits["val"]["samples"]
    scored = _scored(tmp_path / "p")
    assert {f for f, _ in scored} == {"a.root", "b.parquet", "c.h5"}
    assert reference.keys() <= scored.keys()
    assert max(abs(scored[k] - reference[k]) for k in reference) < 1e-5     # raw files score as their shards


def test_onnx_export_of_part_is_refused_in_one_line(trained, tmp_path, capsys):
    from qgdist.cli import main

    assert main(["export", "--checkpoint", trained["run"], "--onnx", str(tmp_path / "part.onnx")]) == 2
    assert "ONNX export of particle-transformer (inputs vectors besides points, features, mask) is not supported" \
        in capsys.readouterr().err
    assert not (tmp_path / "part.onnx").exists()


def test_the_npz_of_the_same_jets_scores_the_same_and_bad_files_are_named(trained, tmp_path):
    npz = tmp_path / "a.npz"
    run(ToyConfig("energyflow", 600, str(npz), seed=21))                     # the jets of a.root
    summary = predict(PredictConfig(checkpoint=trained["run"], data=[str(npz)], out=str(tmp_path / "n"),
                                    executor="local", progress=False))
    root = predict(PredictConfig(checkpoint=trained["run"], data=[str(trained["raw"] / "a.root")],
                                 out=str(tmp_path / "r"), executor="local", progress=False, score_seen=True))
    assert summary["jets"] == root["jets"] == 600
    a = {r: v for (_, r), v in _scored(tmp_path / "n").items()}
    b = {r: v for (_, r), v in _scored(tmp_path / "r").items()}
    # the ROOT file holds float32 four-momenta, the npz float64 (pt, y, phi): scores agree to that precision
    assert a.keys() == b.keys() and np.max(np.abs(np.array([a[r] - b[r] for r in a]))) < 1e-3
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "bad.root").write_bytes(b"\x00" * 1000)
    with pytest.raises(BadRowError, match=r"bad.root: whole file, field '<file>': not a readable ROOT file"):
        predict(PredictConfig(checkpoint=trained["run"], data=[str(tmp_path / "junk")], out=str(tmp_path / "j"),
                              executor="local", progress=False))
