"""GPU runs are not starved by their defaults: training on GPU workers decodes in several DataLoader processes on
several CPUs per worker, and scoring in the GPU overlay asks for a GPU (issue 14's findings)."""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest

from qgdist.cli import build_parser
from qgdist.cluster import manifests as m
from qgdist.core.config import from_args

REPO = Path(__file__).resolve().parents[2]


def _train_config(argv: list[str]):
    from qgdist.train.config import TrainConfig, resolve

    args = build_parser().parse_args(argv)
    return resolve(from_args(TrainConfig, args))


def _assert_fed(cfg, where: str) -> None:
    assert cfg.launch.gpu, where
    assert cfg.data.loader_workers >= 2, f"{where}: GPU workers decode in the training process"
    assert cfg.launch.cpus_per_worker >= cfg.data.loader_workers + 1, f"{where}: too few CPUs for its loader"
    assert cfg.optim.precision == "bf16", where


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed: cannot render the overlays")
    return {name: m.render_kustomize(REPO / "k8s" / name) for name in ("base", "overlays/gpu")}


@pytest.mark.parametrize("name", ["base", "overlays/gpu"])
def test_gpu_training_jobs_feed_their_gpus(name, rendered):
    train = next(o for o in rendered[name] if o["kind"] == "RayJob" and o["metadata"]["name"] == "qgdist-train")
    argv = next(iter(m.qgdist_argv(train)))
    cfg = _train_config(argv)
    _assert_fed(cfg, name)
    worker = train["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert float(worker["resources"]["limits"]["cpu"]) >= cfg.launch.cpus_per_worker   # the pod has those CPUs


def test_gpu_overlay_scores_on_a_gpu(rendered):
    job = next(o for o in rendered["overlays/gpu"] if o["kind"] == "Job" and o["metadata"]["name"] == "qgdist-evaluate")
    spec = job["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert container["resources"]["limits"].get("nvidia.com/gpu") == "1"
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
    assert container["command"][container["command"].index("--device") + 1] == "cuda"


def test_the_train_job_example_and_config_file_feed_their_gpus():
    comment = (REPO / "jobs" / "train.yaml").read_text()
    example = re.search(r"qgdist submit train --runtime-env jobs/train.yaml -- (.*?)\n#\s*\(", comment, re.S)[1]
    argv = ["train"] + shlex.split(example.replace("\\\n#", " ").replace("\\", ""))
    _assert_fed(_train_config(argv), "jobs/train.yaml")
    _assert_fed(_train_config(["train", "--config", str(REPO / "jobs/configs/particlenet-lite-gpu.yaml"),
                               "--data", "x", "--run-name", "y"]), "jobs/configs/particlenet-lite-gpu.yaml")
