"""A trained model scores data it never saw: preprocessing travels in the checkpoint, ``qgdist predict`` scores
raw files and shards on Ray, and evaluate, predict and the exported ONNX model agree jet by jet.

The scenario of issue 12: train on one toy file, then score another file generated with another seed and
converted on its own with every jet in the test split (so that dataset has no train-split statistics at all).
"""

from __future__ import annotations

import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from qgdist.data.convert import ConvertConfig, convert
from qgdist.data.config import DataConfig
from qgdist.data.loader import ShardLoader
from qgdist.data.preprocessing import PreprocessingMismatch
from qgdist.pipelines.toy_data import toy_file
from qgdist.train.config import TrainConfig, resolve
from qgdist.infer.evaluate import EvalConfig, evaluate_checkpoint
from qgdist.train.loop import train
from qgdist.infer.predict import PredictConfig, predict
from tests.commands import qgdist
from tests.trainkit import strict_json, write_dataset

TINY = {"conv_params": [[8, [16, 16]]], "fc_params": [[32, 0.1]]}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory):
    root = tmp_path_factory.mktemp("unseen")
    raw_a = toy_file("energyflow", 2000, root / "a" / "train_qg.npz", seed=11)
    raw_b = toy_file("energyflow", 1000, root / "b" / "other_qg.npz", seed=12)
    convert(ConvertConfig(source="energyflow", inputs=[raw_a], out=str(root / "shards_a"), executor="local",
                          progress=False))
    convert(ConvertConfig(source="energyflow", inputs=[raw_b], out=str(root / "shards_b"), split=(0.0, 0.0, 1.0),
                          executor="local", progress=False))
    cfg = resolve(TrainConfig.of(data=str(root / "shards_a"), model="particlenet-lite", model_kwargs=TINY,
                                 workers=0, epochs=3, batch_size=64, storage=str(root / "runs"), run_name="pn",
                                 track=False, progress=False, checkpoint_every=0))
    train(cfg)
    run = str(root / "runs" / "pn")
    own = evaluate_checkpoint(EvalConfig(checkpoint=run, data=str(root / "shards_a"), split="test",
                                         out=str(root / "eval_a"), progress=False))
    other = evaluate_checkpoint(EvalConfig(checkpoint=run, data=str(root / "shards_b"), split="test",
                                           out=str(root / "eval_b"), progress=False))
    return {"root": root, "run": run, "raw_b": raw_b, "shards_b": str(root / "shards_b"), "own": own,
            "other": other}


def _auc_error(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley & McNeil (1982): the standard error of an AUC estimated from n_pos signal and n_neg background."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    return math.sqrt((auc * (1 - auc) + (n_pos - 1) * (q1 - auc * auc) + (n_neg - 1) * (q2 - auc * auc))
                     / (n_pos * n_neg))


def _scores(path) -> dict[tuple[str, int], float]:
    table = pq.read_table(path, columns=["file", "row", "logit"]).to_pydict()
    return {(f, r): v for f, r, v in zip(table["file"], table["row"], table["logit"])}


def test_unseen_data_scores_like_the_training_sets_own_test_split(scenario):
    own, other = scenario["own"]["metrics"], scenario["other"]["metrics"]
    n_own, n_other = scenario["own"]["n_jets"], scenario["other"]["n_jets"]
    assert n_other == 1000 and own["auc"] > 0.7, own          # it learned (chance: 0.5)
    # Same generator, so the same AUC within statistical error (each side's Hanley-McNeil error, 3 sigma).
    sigma = math.hypot(_auc_error(own["auc"], n_own // 2, n_own // 2), _auc_error(other["auc"], 500, 500))
    assert abs(own["auc"] - other["auc"]) < 3 * sigma, (own, other, sigma)
    assert abs(own["acc"] - other["acc"]) < 0.1 and other["acc"] > 0.6, (own, other)   # the bug gave 0.500
    # The other dataset has no statistics of its own: standardising with them is an error, never a default.
    with pytest.raises(ValueError, match="no train-split normalisation statistics"):
        ShardLoader(DataConfig(scenario["shards_b"]), "test", training=False)


@pytest.mark.slow
def test_predict_on_raw_files_and_shards_equals_evaluate(scenario, tmp_path):
    reference = _scores(scenario["other"]["paths"]["scores"])
    # `qgdist predict` on Ray as a user runs it: a command, its own Ray, its closing line on stderr
    done = qgdist("predict", "--checkpoint", scenario["run"], "--data", scenario["raw_b"], "--out", tmp_path / "raw",
                  "--workers", 2, "--num-cpus", 2, "--rows-per-task", 250)
    raw = strict_json((tmp_path / "raw" / "summary.json").read_text())
    # A quiet terminal: Ray's C++ warning about the actor pool's constructor arguments (ray-project/ray#57733)
    # goes to the output's ray.log, not to the user.
    err = done.stderr
    assert "core_worker" not in err and "(raylet)" not in err, err[-2000:]
    assert "constructor arguments in the object store" in (tmp_path / "raw" / "ray.log").read_text()
    closing = re.search(r"^scored (\d+) jets \((\d+) rejected\) in ([\d.]+) s, (\d+) jets/s; auc ([\d.]+) acc ([\d.]+) "
                        r"1/eps_B@50% ([\d.]+|inf)\n(.*)$", err, re.M)
    assert closing, err[-2000:]
    assert (int(closing[1]), int(closing[2])) == (raw["jets"], raw["rejected"]) and float(closing[3]) > 0
    assert int(closing[4]) == round(raw["jets_per_s"]) > 0
    assert float(closing[5]) == pytest.approx(raw["metrics"]["auc"], abs=5e-5)
    assert closing[8] == str(tmp_path / "raw" / "summary.json")
    shards = predict(PredictConfig(checkpoint=scenario["run"], data=[scenario["shards_b"]],
                                   out=str(tmp_path / "shards"), executor="local", progress=False))
    # the deflated file's units, inflated once by one streaming reader, scored in this process
    local = predict(PredictConfig(checkpoint=scenario["run"], data=[scenario["raw_b"]], out=str(tmp_path / "local"),
                                  executor="local", rows_per_task=250, progress=False))
    for summary, out in ((raw, tmp_path / "raw"), (shards, tmp_path / "shards"), (local, tmp_path / "local")):
        assert summary["jets"] == 1000 and summary["rejected"] == 0
        parts = sorted(out.glob("part-*.parquet"))
        assert len(parts) == len(summary["parts"]) and (out / "roc.png").stat().st_size > 1000
        scored = {}
        for part in parts:
            scored |= _scores(part)
        assert scored.keys() == reference.keys()
        diff = max(abs(scored[k] - reference[k]) for k in reference)
        assert diff < 1e-5, diff
        assert summary["metrics"]["auc"] == pytest.approx(scenario["other"]["metrics"]["auc"], abs=1e-6)
        # summary.json is strict JSON (no NaN/Infinity tokens) and its loss is the BCE of the scores, as evaluate's
        written = strict_json((out / "summary.json").read_text())
        assert written["metrics"]["loss"] == pytest.approx(scenario["other"]["metrics"]["loss"], rel=1e-4)
    assert len(raw["parts"]) == 4          # 1000 rows in units of 250, spread over 2 actors


def test_onnx_model_carries_the_preprocessing_and_gives_the_same_scores(scenario, tmp_path):
    import onnxruntime as ort
    import torch

    from qgdist.data.loader import Collate, read_shard
    from qgdist.data.shards.manifest import read_manifest
    from qgdist.infer.evaluate import load_model
    from qgdist.infer.export import ExportConfig, export_checkpoint, onnx_preprocessing

    path = export_checkpoint(ExportConfig(checkpoint=scenario["run"], onnx=str(tmp_path / "pn.onnx")))["onnx"]
    _, checkpoint, _ = load_model(scenario["run"])
    pre = onnx_preprocessing(path)
    assert pre == checkpoint.preprocessing
    shard = read_manifest(scenario["shards_b"]).shards_of("test")[0].name
    batch = next(Collate(pre).batches(read_shard(f"{scenario['shards_b']}/{shard}"), 200))   # the first 200 jets
    pad = 16   # the exported graph pads by k masked particles itself; a few more keep topk well defined
    inputs = {n: torch.nn.functional.pad(batch[n], (0, 0, 0, pad) if n != "mask" else (0, pad)).numpy()
              for n in ("points", "features", "mask")}
    logits = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["logits"], inputs)[0]
    reference = _scores(scenario["other"]["paths"]["scores"])
    want = np.array([reference[(f, int(r))] for f, r in zip(batch["file"], batch["row"])])
    assert np.max(np.abs(logits - want)) < 1e-4


def test_data_that_does_not_fit_the_model_is_refused(scenario, tmp_path):
    images = write_dataset(str(tmp_path / "images"), "image", {"train": [8], "test": [8]})
    with pytest.raises(PreprocessingMismatch, match="kind: model 'cloud', data 'image'; source: model "
                                                     "'energyflow', data 'cms'"):
        evaluate_checkpoint(EvalConfig(checkpoint=scenario["run"], data=images, split="test", progress=False))
    cms = toy_file("cms", 4, tmp_path / "x.parquet")
    with pytest.raises(PreprocessingMismatch, match="cms files, but the model was trained on energyflow"):
        predict(PredictConfig(checkpoint=scenario["run"], data=[cms], out=str(tmp_path / "p"), executor="local",
                              progress=False))


@pytest.mark.slow
def test_a_scoring_actor_lost_mid_run_is_one_line_and_a_count(scenario, tmp_path, capfd):
    """A scoring actor's process SIGKILLed mid-run: Ray Data restarts it and sends its units again; the terminal
    gets one plain line (no raw Ray dump), the summary counts the restart, and every jet is scored once."""
    import os
    import signal
    import threading
    import time

    import psutil
    import ray

    raw = toy_file("energyflow", 20000, tmp_path / "many" / "many_qg.npz", seed=13)
    out = tmp_path / "scores"
    killed: list[int] = []
    finished = threading.Event()   # predict returned: stop looking

    def scorer_pids() -> list[int]:
        # Ray titles an actor's process after its class: Ray Data's scoring actors are "MapWorker(MapBatches(Scorer))"
        # (or "MapWorker(ReadUnits->MapBatches(Scorer))" with the read fused). Only this test's own processes (its
        # private Ray is started from here), and from the process table, which answers at once, where the State API
        # is an RPC that took seconds on a busy machine, long enough for the run to end first.
        pids = []
        for proc in psutil.Process().children(recursive=True):
            try:
                if "MapBatches(Scorer)" in " ".join(proc.cmdline()):
                    pids.append(proc.pid)
            except psutil.Error:   # gone meanwhile
                pass
        return pids

    def kill_one_scorer() -> None:
        deadline, pids = time.monotonic() + 300, []
        while time.monotonic() < deadline and len(pids) < 2 and not finished.is_set():   # both scoring actors up
            pids = scorer_pids()
            time.sleep(0.02)
        while time.monotonic() < deadline and not list(out.glob("part-*.parquet")) and not finished.is_set():
            time.sleep(0.01)   # the first unit scored: both actors hold units now, 79 of 80 units to go
        if pids and not finished.is_set():
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    killer = threading.Thread(target=kill_one_scorer, daemon=True)
    killer.start()
    try:
        summary = predict(PredictConfig(checkpoint=scenario["run"], data=[str(raw)], out=str(out), workers=2,
                                        num_cpus=2, rows_per_task=250, batch_size=64))
    finally:
        finished.set()
        ray.shutdown()
    killer.join(timeout=30)
    terminal = capfd.readouterr()
    assert killed, "the run ended before a scoring actor could be killed"
    assert summary["actors_restarted"] == 1 and summary["nodes_lost"] == [], summary
    lines = [line for line in terminal.err.splitlines() if "scoring actor" in line]
    assert lines[0].endswith("a scoring actor was lost and restarted by Ray; the units it held are scored again")
    assert len(lines) == 2 and "0 node(s) lost (none), 1 scoring actor(s) restarted" in lines[1], lines
    assert "(raylet)" not in terminal.out + terminal.err and "\x1b[" not in terminal.out + terminal.err
    scored = {}
    for part in out.glob("part-*.parquet"):
        scored |= _scores(part)
    assert summary["jets"] == 20000 and len(scored) == 20000 and len(summary["parts"]) == 80
