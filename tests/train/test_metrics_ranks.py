"""Validation metrics over two ranks holding different numbers of jets (or none) equal those of the whole dataset.

Rank 0 runs in the test's own process and rank 1 in a spawned one, in a real gloo group on 127.0.0.1: one process
start instead of two, and what rank 0 computes is checked where it runs.
"""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qgdist.track.server import free_port
from qgdist.train.metrics import JetMetrics, _gather_cat, compute_metrics

JETS, RANK0_JETS = 301, 200
TIMEOUT = datetime.timedelta(seconds=120)


def _toy() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 2, (JETS,), generator=gen)
    return torch.randn(JETS, generator=gen) + 1.2 * labels, labels


def _rounds(rank: int) -> list[dict]:
    """What each rank computes, in the same order on both (every call is a collective); plain data only (a tensor
    sent through the queue would need the sending process alive)."""
    logits, labels = _toy()
    mine = slice(0, RANK0_JETS) if rank == 0 else slice(RANK0_JETS, JETS)
    out = {"gathered": _gather_cat(torch.arange(3.0) if rank == 0 else torch.tensor([10.0])).tolist()}
    metrics = JetMetrics()
    for start in range(mine.start, mine.stop, 64):   # batches of unequal sizes, loss = the rank's number
        stop = min(start + 64, mine.stop)
        metrics.update(logits[start:stop], labels[start:stop], loss=torch.tensor(float(rank)))
    out["split"] = metrics.compute()
    fpr, tpr = metrics.roc_curve()
    out["roc_points"] = len(fpr)
    metrics.reset()
    if rank == 0:   # a small validation split: rank 1 gets no jet at all
        metrics.update(logits, labels, loss=2.0)
    out["one_rank_empty"] = metrics.compute()
    return [out]


def _rank_1(port: int, queue) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2, timeout=TIMEOUT)
    try:
        queue.put(_rounds(1))
    finally:
        dist.destroy_process_group()


# Not slow (7 s, one spawned process, no Ray or server): the quick loop and the mutation run keep it, and it is
# the one test of metrics.py's gathers that mutmut can see (rank 0 runs here).
def test_two_ranks_with_unequal_or_no_jets_get_the_whole_datasets_metrics() -> None:
    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    other = ctx.Process(target=_rank_1, args=(port, queue))
    other.start()
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2,
                                timeout=TIMEOUT)
        try:
            mine = _rounds(0)
        finally:
            dist.destroy_process_group()
        theirs = queue.get(timeout=TIMEOUT.total_seconds())
    finally:
        other.join(60)
    assert other.exitcode == 0
    logits, labels = _toy()
    whole = compute_metrics(logits, labels, logits=True)
    for result in (mine[0], theirs[0]):
        assert result["gathered"] == [0.0, 1.0, 2.0, 10.0]   # every rank's values once, in rank order
        for round_ in ("split", "one_rank_empty"):
            for key in ("auc", "acc", "rej30", "rej50"):
                assert result[round_][key] == pytest.approx(whole[key], rel=1e-6), (round_, key)
        # the per-jet mean: 200 jets with loss 0 and 101 with loss 1; then all 301 with loss 2 on rank 0
        assert result["split"]["loss"] == pytest.approx(101 / JETS)
        assert result["one_rank_empty"]["loss"] == pytest.approx(2.0)
        assert result["roc_points"] == JETS + 1   # distinct scores: one ROC point per jet, plus (0, 0)


def test_metrics_follow_the_device_they_are_moved_to() -> None:
    """States live where the training runs (nccl gathers device tensors only); ``meta`` stands in for a GPU."""
    metrics = JetMetrics()
    metrics.update(torch.zeros(2), torch.ones(2), loss=1.0)
    metrics.to("meta")
    assert metrics.device == torch.device("meta")
    assert {t.device.type for t in metrics.probs + metrics.labels + [metrics.loss_sum]} == {"meta"}
    metrics.update(torch.zeros(3), torch.ones(3), loss=1.0)
    assert metrics.probs[-1].device.type == "meta" and metrics.loss_jets == 5
    assert JetMetrics("meta").loss_sum.device.type == "meta"


def test_a_batch_without_a_loss_counts_for_the_scores_only() -> None:
    metrics = JetMetrics()
    metrics.update(torch.tensor([2.0, -2.0]), torch.tensor([1, 0]))
    metrics.update(torch.tensor([1.0, -1.0, 0.5]), torch.tensor([1, 0, 0]), loss=torch.tensor(0.25))
    got = metrics.compute()
    assert got["loss"] == pytest.approx(0.25) and got["acc"] == pytest.approx(4 / 5)
    only_scores = JetMetrics()
    only_scores.update(torch.tensor([2.0, -2.0]), torch.tensor([1, 0]))
    assert math.isnan(only_scores.compute()["loss"])


def test_an_empty_validation_split_is_an_error_not_a_metric() -> None:
    with pytest.raises(ValueError, match=r"^no jets to compute metrics on \(empty validation split\?\)$"):
        JetMetrics().compute()
