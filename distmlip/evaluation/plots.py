"""Parity plots (matplotlib, Agg backend: no display needed), written atomically as PNG."""
from __future__ import annotations

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def parity_plot(x_ref, y_pred, path, xlabel: str, ylabel: str, title: str = "", text: str = "",
                groups=None, group_names=None) -> None:
    """Scatter of predicted vs reference values with the y = x line; ``groups`` colours points."""
    from ..utils.io import atomic_path

    plt = _plt()
    x_ref, y_pred = np.asarray(x_ref, float).ravel(), np.asarray(y_pred, float).ravel()
    fig, ax = plt.subplots(figsize=(4.8, 4.6), dpi=120)
    if groups is None:
        ax.scatter(x_ref, y_pred, s=6, alpha=0.6, lw=0)
    else:
        groups = np.asarray(groups).ravel()
        for g in np.unique(groups):
            m = groups == g
            label = group_names[g] if group_names is not None and 0 <= g < len(group_names) else str(g)
            ax.scatter(x_ref[m], y_pred[m], s=6, alpha=0.6, lw=0, label=label)
        if len(np.unique(groups)) <= 12:
            ax.legend(fontsize=7, markerscale=2, loc="upper left")
    if len(x_ref):
        lo = float(min(x_ref.min(), y_pred.min()))
        hi = float(max(x_ref.max(), y_pred.max()))
        pad = 0.03 * (hi - lo if hi > lo else 1.0)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k-", lw=0.8)
        ax.set_xlim(lo - pad, hi + pad)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    if text:
        ax.text(0.97, 0.03, text, transform=ax.transAxes, ha="right", va="bottom", fontsize=8,
                bbox=dict(boxstyle="round", fc="white", alpha=0.8))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
