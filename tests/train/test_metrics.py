"""Metrics against a brute-force reference written from the definitions, and DDP sync in a real gloo group."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qgdist.track.server import free_port
from qgdist.train.metrics import JetMetrics, compute_metrics


def brute_force(scores: list[float], labels: list[int]) -> dict[str, float]:
    """AUC by counting pairs (ties 1/2); eps_B(eps_S) by cutting at every distinct score, then interpolating."""
    sig = [s for s, y in zip(scores, labels) if y == 1]
    bkg = [s for s, y in zip(scores, labels) if y == 0]
    pairs = sum(1.0 if s > b else 0.5 if s == b else 0.0 for s in sig for b in bkg)
    points = [(0.0, 0.0)]   # (eps_S, eps_B) for cuts "score >= t", t descending
    for t in sorted(set(scores), reverse=True):
        points.append((sum(s >= t for s in sig) / len(sig), sum(b >= t for b in bkg) / len(bkg)))
    out = {"auc": pairs / (len(sig) * len(bkg)),
           "acc": sum((s > 0.5) == (y == 1) for s, y in zip(scores, labels)) / len(scores)}
    for wp in (0.3, 0.5):
        for (s0, b0), (s1, b1) in zip(points, points[1:]):
            if s0 < wp <= s1:
                eps_b = b0 + (wp - s0) / (s1 - s0) * (b1 - b0)
                out[f"rej{int(wp * 100)}"] = math.inf if eps_b == 0 else 1 / eps_b
                break
    return out


def toy(n: int, seed: int, ties: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=gen)
    logits = torch.randn(n, generator=gen) + 1.2 * labels
    if ties:   # coarse scores: many equal values across both classes
        logits = torch.round(logits * 2) / 2
    return logits, labels


@pytest.mark.parametrize("ties", [False, True])
def test_metrics_match_brute_force(ties: bool) -> None:
    logits, labels = toy(400, seed=1, ties=ties)
    probs = torch.sigmoid(logits.double())
    expected = brute_force(probs.tolist(), labels.tolist())
    metrics = JetMetrics()
    for start in range(0, 400, 64):   # uneven last batch
        sl = slice(start, start + 64)
        metrics.update(logits[sl], labels[sl], loss=torch.tensor(float(start)))
    got = metrics.compute()
    functional = compute_metrics(logits, labels, logits=True)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key
        assert functional[key] == pytest.approx(value, rel=1e-6), key
    # Loss is the per-jet mean: batch means weighted by batch sizes (6 batches of 64, one of 16).
    weighted = sum(s * min(64, 400 - s) for s in range(0, 400, 64)) / 400
    assert got["loss"] == pytest.approx(weighted)


def test_a_tie_at_the_top_score_is_interpolated_through() -> None:
    """All quarks share the top score with half the gluons: the ROC's first step goes from (0, 0) straight to
    eps_S = 1, eps_B = 0.5, and eps_B at eps_S = 0.3 lies on it (0.15), not at either end."""
    probs = torch.tensor([0.9] * 4 + [0.9, 0.9, 0.1, 0.1], dtype=torch.float64)
    labels = torch.tensor([1] * 4 + [0] * 4)
    got = compute_metrics(probs, labels, logits=False)
    assert got["rej30"] == pytest.approx(1 / 0.15) and got["rej50"] == pytest.approx(1 / 0.25)
    assert got["rej30"] == pytest.approx(brute_force(probs.tolist(), labels.tolist())["rej30"])
    assert got["auc"] == pytest.approx(0.75)   # the tied pairs count one half


def test_perfect_separation_and_rejection_grows_with_separation() -> None:
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    perfect = compute_metrics(torch.tensor([-3.0, -2, -1, 1, 2, 3]), labels, logits=True)
    assert perfect["auc"] == 1.0 and perfect["acc"] == 1.0 and math.isinf(perfect["rej50"])
    logits, labels = toy(2000, seed=2)
    weak = compute_metrics(logits, labels, logits=True)
    scaled = compute_metrics(logits * 3, labels, logits=True)   # a monotone transform changes no ROC metric
    assert scaled["auc"] == pytest.approx(weak["auc"]) and scaled["rej50"] == pytest.approx(weak["rej50"])
    strong = compute_metrics(logits + 2 * labels, labels, logits=True)
    assert strong["auc"] > weak["auc"] and strong["rej30"] > strong["rej50"] > weak["rej50"]


SCENARIOS = (None, 1)   # unequal jet counts per rank; rank 1 without a jet (a small validation split)


def _ddp_worker(rank: int, world: int, port: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        logits, labels = toy(301, seed=3)
        for empty_rank in SCENARIOS:   # both in one process group: two spawned ranks cost ~5 CPU-s each to start
            metrics = JetMetrics()
            if empty_rank is None:
                # Rank r sees every world-th jet: unequal counts per rank (151 and 150) on purpose.
                for start in range(rank, 301, 40 * world):
                    idx = torch.arange(start, min(start + 40 * world, 301), world)
                    metrics.update(logits[idx], labels[idx], loss=torch.tensor(float(rank)))
            elif rank != empty_rank:
                metrics.update(logits, labels, loss=torch.tensor(float(rank)))
            queue.put((empty_rank, rank, metrics.compute()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow   # two spawned gloo ranks, 6-7 s
def test_ddp_sync_two_gloo_ranks_equals_whole_dataset() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = {(empty, rank): m for empty, rank, m in (queue.get(timeout=120) for _ in range(2 * len(SCENARIOS)))}
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    logits, labels = toy(301, seed=3)
    whole = compute_metrics(logits, labels, logits=True)
    for empty_rank in SCENARIOS:
        for rank in (0, 1):
            got = results[empty_rank, rank]
            for key in ("auc", "acc", "rej30", "rej50"):
                assert got[key] == pytest.approx(whole[key], rel=1e-5), (empty_rank, rank, key)
            # Per-jet mean over both ranks: 151 jets with loss 0, 150 with loss 1 (or all 301 on rank 0).
            assert got["loss"] == pytest.approx(150 / 301 if empty_rank is None else 0.0), (empty_rank, rank)


def test_a_million_point_roc_is_thinned_for_plotting_without_changing_its_shape(tmp_path) -> None:
    import numpy as np

    from qgdist.train.plots import PLOT_POINTS, plot_roc, thin_roc

    rng = np.random.default_rng(0)
    label = rng.integers(2, size=1_000_000)
    score = rng.normal(label * 1.5, 1.0)
    order = np.argsort(-score)
    tpr = np.concatenate([[0.0], np.cumsum(label[order]) / label.sum()])
    fpr = np.concatenate([[0.0], np.cumsum(1 - label[order]) / (1 - label).sum()])
    f, t = thin_roc(fpr, tpr)
    assert len(f) <= 2 * PLOT_POINTS + 2 and (f[0], t[0], f[-1], t[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(f) >= 0) and np.all(np.diff(t) >= 0)
    assert abs(np.trapezoid(t, f) - np.trapezoid(tpr, fpr)) < 1e-3       # the same curve, drawn with fewer points
    for eff in (0.3, 0.5):                                                 # and the same rejection at working points
        assert abs(np.interp(eff, t, f) - np.interp(eff, tpr, fpr)) < 2e-3 * np.interp(eff, tpr, fpr) + 1e-6
    assert plot_roc({"big": (fpr, tpr)}, tmp_path / "roc.png").stat().st_size > 0


def test_logits_that_look_like_probabilities_are_read_as_logits() -> None:
    """A barely trained model's logits can all lie in [0, 1] (bench physics' 2-step smoke run did): they are still
    logits, all above 0 -- every jet is called a quark. Read as probabilities they gave the opposite accuracy."""
    scores, labels = torch.tensor([0.1, 0.3, 0.6, 0.9]), torch.tensor([1, 1, 1, 0])
    assert compute_metrics(scores, labels, logits=True)["acc"] == 0.75
    assert compute_metrics(scores, labels, logits=False)["acc"] == 0.25
