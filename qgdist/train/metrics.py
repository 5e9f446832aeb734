"""Quark/gluon metrics, synced across DDP ranks: loss, accuracy, ROC AUC, background rejection.

Quark jets are the signal (positive label 1). Background rejection at signal efficiency eps_S is 1/eps_B, where
eps_B (gluon mistag rate) is read off the ROC curve by linear interpolation at tpr = eps_S; it is ``inf`` when no
gluon passes the cut (MLflow stores inf as the largest float).

Two forms:

* ``JetMetrics`` accumulates batches (``update(logits, labels, loss)``), and ``compute()`` gathers every rank's
  scores when a ``torch.distributed`` group is initialised, so each rank gets the metrics of the whole dataset
  (ranks with unequal numbers of jets, or none, included).
* ``compute_metrics(scores, labels, loss=None, logits=True)`` is the same on tensors already in hand (evaluate,
  predict, tests).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

#: Signal efficiencies at which background rejection is reported (the quark/gluon literature's working points).
WORKING_POINTS = (0.3, 0.5)


def rejection_at(fpr: torch.Tensor, tpr: torch.Tensor, eps_s: float) -> float:
    """1/eps_B at signal efficiency ``eps_s`` from a ROC curve (tpr ascending), linearly interpolated."""
    tpr64, fpr64 = tpr.double().cpu(), fpr.double().cpu()
    # The first point with tpr >= eps_s and the one before it bracket eps_s; tpr is non-decreasing.
    hi = int(torch.searchsorted(tpr64, torch.tensor([eps_s], dtype=torch.float64)).item())
    hi = min(max(hi, 1), len(tpr64) - 1)
    lo = hi - 1
    span = (tpr64[hi] - tpr64[lo]).item()
    frac = 0.0 if span == 0 else (eps_s - tpr64[lo].item()) / span
    eps_b = fpr64[lo].item() + frac * (fpr64[hi] - fpr64[lo]).item()
    return float("inf") if eps_b <= 0 else 1.0 / eps_b


def summarise_roc(fpr: torch.Tensor, tpr: torch.Tensor) -> dict[str, float]:
    """AUC (trapezoid over the exact ROC curve: ties count one half) and rejections at ``WORKING_POINTS``."""
    out = {"auc": float(torch.trapezoid(tpr.double(), fpr.double()))}
    for eps_s in WORKING_POINTS:
        out[f"rej{int(eps_s * 100)}"] = rejection_at(fpr, tpr, eps_s)
    return out


class JetMetrics:
    """Accumulates per-batch logits, labels and losses; ``compute()`` returns floats for the whole dataset.

    Keys: ``loss`` (mean per jet), ``acc`` (cut at logit 0), ``auc``, ``rej30``, ``rej50``. Every rank must call
    ``compute()`` (it is a collective when ``torch.distributed`` is initialised). The gathers are our own, with
    sizes exchanged first: a rank with fewer jets, or none (a small validation split over many ranks), takes part
    in exactly the same collectives as the others. Scores stay on the device until ``compute()``.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.reset()

    def to(self, device: str | torch.device) -> JetMetrics:
        """Keep the states on the training device (nccl gathers CUDA tensors only)."""
        self.device = torch.device(device)
        self.probs = [p.to(self.device) for p in self.probs]
        self.labels = [y.to(self.device) for y in self.labels]
        self.loss_sum = self.loss_sum.to(self.device)
        return self

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | float | None = None) -> None:
        """Add one batch. ``loss`` is the batch's mean loss; it is weighted by the batch size."""
        logits = logits.detach().float().reshape(-1)
        self.probs.append(torch.sigmoid(logits).to(self.device))
        self.labels.append(labels.detach().reshape(-1).float().to(self.device))
        if loss is not None:
            loss = torch.as_tensor(loss, dtype=torch.float64, device=self.device).detach()
            self.loss_sum += loss * logits.numel()
            self.loss_jets += logits.numel()

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        empty = torch.zeros(0, device=self.device)
        probs = _gather_cat(torch.cat(self.probs) if self.probs else empty)
        labels = _gather_cat(torch.cat(self.labels) if self.labels else empty)
        loss = torch.stack([self.loss_sum, torch.tensor(float(self.loss_jets), dtype=torch.float64,
                                                        device=self.device)])
        if _distributed():
            dist.all_reduce(loss)
        total, jets = loss.tolist()
        return probs, labels, (total / jets if jets else float("nan"))

    def compute(self) -> dict[str, float]:
        probs, labels, loss = self._gathered()
        if probs.numel() == 0:
            raise ValueError("no jets to compute metrics on (empty validation split?)")
        return compute_metrics(probs, labels, loss=loss, logits=False)

    def roc_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fpr, tpr) over all ranks, for plots."""
        from torchmetrics.functional.classification import binary_roc

        probs, labels, _ = self._gathered()
        fpr, tpr, _ = binary_roc(probs.double().cpu(), labels.long().cpu(), thresholds=None)
        return fpr, tpr

    def reset(self) -> None:
        self.probs: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.loss_jets = 0


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D ``t`` concatenated in rank order (sizes may differ, and be zero); ``t`` without a group."""
    if not _distributed():
        return t
    world = dist.get_world_size()
    size = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(n) for n in torch.cat(sizes).tolist()]
    longest = max(max(counts), 1)   # never a zero-length collective
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)])


def compute_metrics(scores: torch.Tensor, labels: torch.Tensor, loss: float | None = None, *,
                    logits: bool) -> dict[str, float]:
    """The metrics of ``JetMetrics`` for scores already in hand: ``logits`` (True) or quark probabilities (False).

    Accuracy cuts at 0.5 probability. Which of the two the scores are is said, never guessed from their range: a
    barely trained model's logits all lie in [0, 1], and read as probabilities they would flip its accuracy.
    """
    from torchmetrics.functional.classification import binary_accuracy, binary_roc

    scores = scores.detach().double().reshape(-1).cpu()
    labels = labels.detach().reshape(-1).long().cpu()
    probs = torch.sigmoid(scores) if logits else scores
    fpr, tpr, _ = binary_roc(probs, labels, thresholds=None)
    out = {"loss": float("nan") if loss is None else float(loss), "acc": float(binary_accuracy(probs, labels))}
    out.update(summarise_roc(fpr, tpr))
    return out
