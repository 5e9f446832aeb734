"""``qgdist quickstart`` end to end at toy size: toy data in both formats -> Ray conversion -> 2-worker Ray Train DDP
of both model families (resnet15 on images, particlenet-lite on clouds) -> test evaluation -> report + PNGs."""

from __future__ import annotations

import pytest

from qgdist.train.quickstart import QuickstartConfig, quickstart

pytestmark = pytest.mark.slow


def test_quickstart_leaves_its_report(tmp_path):
    tiny = {"particlenet-lite": {"conv_params": [[4, [8, 8]]], "fc_params": [[16, 0.1]]},
            "resnet15": {"fmaps": [4, 8], "nblocks": 1}}
    report = quickstart(QuickstartConfig(out=str(tmp_path / "qs"), jets=300, epochs=1, model_kwargs=tiny,
                                         cloud_batch=32, image_batch=8))
    text = report.read_text()
    assert "| particlenet-lite | toy clouds |" in text and "| resnet15 | toy images |" in text
    assert "0.742" in text and "0.513" in text  # next to the seed baselines
    for name in ("particlenet-lite-test-roc.png", "resnet15-curves.png"):
        assert (report.parent / "figures" / name).stat().st_size > 1000
    # Both runs were DDP runs over 2 ranks, tracked to their local MLflow store, and finished.
    from mlflow.tracking import MlflowClient

    from qgdist.track.tracker import local_store_uri
    from qgdist.train.checkpoint import Checkpointer, load_checkpoint

    for model in ("particlenet-lite", "resnet15"):
        run_dir = tmp_path / "qs" / "runs" / model
        assert load_checkpoint(Checkpointer(run_dir).latest())["fingerprint"]["world_size"] == 2
        client = MlflowClient(local_store_uri(run_dir))
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].data.params["model"] == model
        assert (tmp_path / "qs" / "runs" / model / "eval" / "test" / "scores.parquet").exists()
