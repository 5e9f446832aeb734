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


def plot_roc(curves: Mapping[str, Curve], path: str | Path, title: str = "quark (signal) vs gluon") -> Path:
    """Left: tpr vs fpr with AUC in the legend. Right: gluon rejection 1/eps_B vs quark efficiency eps_S, log y.

    ``curves`` maps a label (model name, split) to (fpr, tpr) arrays, e.g. ``JetMetrics.roc_curve()``.
    """
    fig, axes = _figure(2)
    ax_roc, ax_rej = axes[0]
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr, dtype=float), np.asarray(tpr, dtype=float)
        auc = float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))
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
