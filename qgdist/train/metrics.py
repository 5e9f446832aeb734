"""Quark/gluon metrics, synced across DDP ranks by torchmetrics: loss, accuracy, ROC AUC, background rejection.

Quark jets are the signal (positive label 1). Background rejection at signal efficiency eps_S is 1/eps_B, where
eps_B (gluon mistag rate) is read off the ROC curve by linear interpolation at tpr = eps_S; it is ``inf`` when no
gluon passes the cut (MLflow stores inf as the largest float).

Two forms:

* ``JetMetrics`` accumulates batches (``update(logits, labels, loss)``), and ``compute()`` gathers every rank's
  scores when a ``torch.distributed`` group is initialised, so each rank gets the metrics of the whole dataset.
* ``compute_metrics(scores, labels, loss=None)`` is the same on tensors already in hand (evaluate, tests).
"""

from __future__ import annotations

import torch
from torchmetrics.aggregation import MeanMetric
from torchmetrics.classification import BinaryAccuracy, BinaryROC

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
    ``compute()`` (it is a collective when ``torch.distributed`` is initialised).
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.loss = MeanMetric()
        self.acc = BinaryAccuracy()
        # thresholds=None keeps every score: exact AUC and rejection; memory is 8 bytes per validation jet.
        self.roc = BinaryROC(thresholds=None)
        self.to(device)

    def to(self, device: str | torch.device) -> "JetMetrics":
        """Keep the states on the training device (nccl gathers CUDA tensors only)."""
        for metric in (self.loss, self.acc, self.roc):
            metric.to(device)
        return self

    def update(self, logits: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor | float | None = None) -> None:
        """Add one batch. ``loss`` is the batch's mean loss; it is weighted by the batch size."""
        logits = logits.detach().float().reshape(-1)
        labels = labels.detach().reshape(-1).long()
        # Probabilities, not logits: torchmetrics would sigmoid a batch only if some logit is outside [0, 1],
        # which would rank batches inconsistently.
        probs = torch.sigmoid(logits)
        self.acc.update(probs, labels)
        self.roc.update(probs, labels)
        if loss is not None:
            loss = torch.as_tensor(loss, dtype=torch.float32, device=logits.device).detach()
            self.loss.update(loss.expand(logits.numel()))

    def compute(self) -> dict[str, float]:
        fpr, tpr, _ = self.roc.compute()
        out = {"loss": float(self.loss.compute()) if self.loss.update_called else float("nan"),
               "acc": float(self.acc.compute())}
        out.update(summarise_roc(fpr, tpr))
        return out

    def roc_curve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(fpr, tpr) over all ranks, for plots."""
        fpr, tpr, _ = self.roc.compute()
        return fpr, tpr

    def reset(self) -> None:
        self.loss.reset()
        self.acc.reset()
        self.roc.reset()


def compute_metrics(scores: torch.Tensor, labels: torch.Tensor, loss: float | None = None) -> dict[str, float]:
    """The metrics of ``JetMetrics`` for scores (logits or any monotone score; probabilities) already in hand.

    ``scores`` are taken as logits when any lies outside [0, 1]; accuracy cuts at 0.5 probability either way.
    """
    from torchmetrics.functional.classification import binary_accuracy, binary_roc

    scores = scores.detach().double().reshape(-1).cpu()
    labels = labels.detach().reshape(-1).long().cpu()
    probs = torch.sigmoid(scores) if bool(((scores < 0) | (scores > 1)).any()) else scores
    fpr, tpr, _ = binary_roc(probs, labels, thresholds=None)
    out = {"loss": float("nan") if loss is None else float(loss), "acc": float(binary_accuracy(probs, labels))}
    out.update(summarise_roc(fpr, tpr))
    return out
