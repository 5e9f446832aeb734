"""PNG plots of a run: ROC curves (the usual one and the HEP rejection view) and loss / metric curves.

matplotlib runs with the Agg backend (no display on cluster workers). Files are written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from qgdist.core.atomic import atomic_path

Curve = tuple[Sequence[float], Sequence[float]]   # (fpr, tpr) or (steps, values)


def _figure(ncols: int, width: float = 5.0):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width * ncols, 4.2), squeeze=False)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return Path(path)


#: A ROC curve is drawn with at most about this many points: an exact curve has one per distinct score (a million
#: for a million jets), which costs matplotlib hundreds of MB and looks the same.
PLOT_POINTS = 2000


def thin_roc(fpr: np.ndarray, tpr: np.ndarray, points: int = PLOT_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """At most ~``2 * points`` points of a ROC curve: evenly spaced in signal efficiency and in log background
    efficiency (the rejection view), the end points kept. The AUC is computed before thinning."""
    if len(fpr) <= 2 * points:
        return fpr, tpr
    at_tpr = np.searchsorted(tpr, np.linspace(0.0, 1.0, points))
    at_fpr = np.searchsorted(fpr, np.geomspace(max(float(fpr[fpr > 0].min()), 1e-9), 1.0, points))
    keep = np.unique(np.concatenate([[0, len(fpr) - 1], np.clip(at_tpr, 0, len(fpr) - 1),
                                     np.clip(at_fpr, 0, len(fpr) - 1)]))
    return fpr[keep], tpr[keep]


def plot_roc(curves: Mapping[str, Curve], path: str | Path, title: str = "quark (signal) vs gluon") -> Path:
    """Left: tpr vs fpr with AUC in the legend. Right: gluon rejection 1/eps_B vs quark efficiency eps_S, log y.

    ``curves`` maps a label (model name, split) to (fpr, tpr) arrays, e.g. ``JetMetrics.roc_curve()``.
    """
    fig, axes = _figure(2)
    ax_roc, ax_rej = axes[0]
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
        fpr, tpr = thin_roc(fpr, tpr)
        ax_roc.plot(fpr, tpr, label=f"{label} (AUC {auc:.3f})")
        keep = fpr > 0   # rejection is unbounded where no gluon passes
        ax_rej.plot(tpr[keep], 1.0 / fpr[keep], label=label)
    ax_roc.plot([0, 1], [0, 1], ls=":", color="grey", label="random")
    ax_roc.set(xlabel="gluon efficiency (false positive rate)", ylabel="quark efficiency (true positive rate)",
               title=f"ROC: {title}", xlim=(0, 1), ylim=(0, 1))
    eps = np.linspace(0.01, 1, 100)
    ax_rej.plot(eps, 1 / eps, ls=":", color="grey", label="random")
    for wp in (0.3, 0.5):
        ax_rej.axvline(wp, ls="--", lw=0.8, color="grey")
    ax_rej.set(yscale="log", xlabel=r"quark efficiency $\epsilon_S$", ylabel=r"gluon rejection $1/\epsilon_B$",
               title="background rejection", xlim=(0, 1))
    for ax in (ax_roc, ax_rej):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_panels(panels: Mapping[str, Mapping[str, Curve]], path: str | Path, xlabel: str, ylabel: str,
                limits: Mapping[str, float] | None = None) -> Path:
    """One panel per key of ``panels``, each a mapping of line label -> (x, y); ``limits`` draws a dashed
    horizontal line in the panels it names (a memory cap, a target)."""
    fig, axes = _figure(max(len(panels), 1), width=4.5)
    for ax, (title, lines) in zip(axes[0], panels.items()):
        for label, (x, y) in lines.items():
            ax.plot(x, y, label=label)
        if limits and title in limits:
            ax.axhline(limits[title], ls="--", lw=0.8, color="grey", label="limit")
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_curves(history: Mapping[str, Curve], path: str | Path, xlabel: str = "step") -> Path:
    """One panel per metric family: keys ``"train/loss"`` and ``"val/loss"`` share the ``loss`` panel.

    ``history`` maps a metric name to (steps, values), e.g. the tracker's or the loop's history.
    """
    panels: dict[str, list[str]] = {}
    for name in history:
        panels.setdefault(name.rsplit("/", 1)[-1], []).append(name)
    fig, axes = _figure(max(len(panels), 1), width=4.5)
    for ax, (panel, names) in zip(axes[0], panels.items()):
        for name in names:
            steps, values = history[name]
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=name)
        ax.set(xlabel=xlabel, title=panel)
        if panel.startswith("rej"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)
