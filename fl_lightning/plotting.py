"""One plotting style for every figure of the package and of the docs.

- rounds on the x axis are integers (``round``), quantities have a title and a y label
  (:data:`LABELS` maps the logged keys, e.g. ``hessian/ratio_1_5``, to words);
- a non-finite value (NaN, inf: a ratio whose denominator is about 0) is drawn as a gap, and
  :func:`plot_rounds` warns once per series that has such points;
- figures are drawn with the ``Agg`` backend (no display needed) and closed after saving.

Example:
    >>> import tempfile, os
    >>> fig, axes = subplots(1)
    >>> plot_rounds(axes[0], [1, 2, 3], [0.5, 0.7, 0.8], key="val_acc")
    >>> path = save(fig, os.path.join(tempfile.mkdtemp(), "acc.png"))
    >>> os.path.isfile(path)
    True
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

__all__ = ["LABELS", "curves", "label", "plot_rounds", "save", "subplots"]

#: logged key -> (title, y-axis label)
LABELS: dict[str, tuple[str, str]] = {
    "train_loss": ("train loss (mean over clients)", "loss"),
    "val_loss": ("test loss of the global model", "loss"),
    "val_acc": ("test accuracy of the global model", "accuracy"),
    "lambda_1": ("top Hessian eigenvalue", "lambda_1"),
    "ratio_1_5": ("Hessian condition: lambda_1 / lambda_5", "lambda_1 / lambda_5"),
    "trace_k": ("sum of the top-k eigenvalues", "sum lambda_i"),
    "div_mean": ("mean distance of the clients to the global model", "||w_k - w_g||"),
    "div_max": ("largest distance of a client to the global model", "max ||w_k - w_g||"),
    "pairwise_mean": ("mean distance between two clients", "||w_i - w_j||"),
    "step_norm": ("global step length", "||w_{t+1} - w_t||"),
    "radius": ("radius of the recent global trajectory", "radius"),
    "straightness": ("straightness of the trajectory", "displacement / path length"),
    "relative_dispersion": ("dispersion of the client updates", "relative dispersion"),
    "cos_pairwise_mean": ("mean cosine between client updates", "cosine"),
    "b_local": ("B-local dissimilarity", "B(w)"),
    "local_acc_mean": ("test accuracy of the local models", "accuracy"),
    "start_acc": ("test accuracy of the global model sent", "accuracy"),
    "forgetting": ("accuracy lost in local training", "accuracy drop"),
    "cos_update_prox": ("cos(update, proximal gradient)", "cosine"),
    "cos_ce_prox": ("cos(CE gradient, proximal gradient)", "cosine"),
    "prox_loss": ("proximal loss at the end of local training", "loss"),
    "gap": ("heterogeneity floor: global loss gap", "loss gap"),
    "spread_V": ("spread of the client optima", "V"),
    "bound_upper": ("upper bound of the floor", "loss"),
    "dist_mean": ("mean distance to the client optima", "distance"),
    "centroid_dist": ("distance to the centroid of the optima", "distance"),
}


def label(key: str) -> tuple[str, str]:
    """``(title, y label)`` of a logged key (``prefix/name`` or ``name``); the key itself as a
    fallback, with ``ratio_1_k`` spelled as ``lambda_1 / lambda_k``."""
    name = key.rsplit("/", 1)[-1]
    if name in LABELS:
        return LABELS[name]
    if name.startswith("ratio_1_"):
        k = name[len("ratio_1_"):]
        return f"Hessian condition: lambda_1 / lambda_{k}", f"lambda_1 / lambda_{k}"
    return name.replace("_", " "), name


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def subplots(ncols: int, width: float = 3.8, height: float = 3.1) -> tuple[Any, list[Any]]:
    """A figure with ``ncols`` axes side by side; returns ``(fig, axes)``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
    return fig, list(axes[0])


def plot_rounds(
    ax: Any,
    rounds: Sequence[float],
    values: Sequence[float],
    key: str | None = None,
    name: str | None = None,
    title: str | None = None,
    ylabel: str | None = None,
    logy: bool = False,
    **kwargs: Any,
) -> None:
    """Draw ``values`` against integer ``rounds`` on ``ax``; non-finite values are gaps.

    Args:
        key: the logged key, for the default title and y label (:func:`label`).
        name: legend entry of this series.
        title, ylabel: override the defaults from ``key``.
        logy: log-scale y (only if every finite value is > 0).
        kwargs: passed to ``ax.plot``.
    """
    from matplotlib.ticker import MaxNLocator

    ys = [float(v) if v is not None and math.isfinite(float(v)) else math.nan for v in values]
    bad = sum(1 for v in ys if math.isnan(v))
    if bad:
        warnings.warn(
            f"{key or title or 'series'}: {bad} of {len(ys)} values are not finite or not "
            "meaningful and are drawn as gaps", UserWarning, stacklevel=2,
        )
    kwargs.setdefault("marker", "o")
    kwargs.setdefault("ms", 3)
    ax.plot([int(r) for r in rounds], ys, label=name, **kwargs)
    default_title, default_ylabel = label(key) if key else ("", "")
    ax.set_title(title if title is not None else default_title, fontsize=10)
    ax.set_ylabel(ylabel if ylabel is not None else default_ylabel)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    finite = [v for v in ys if not math.isnan(v)]
    if logy and finite and all(v > 0 for v in finite):
        ax.set_yscale("log")
    ax.grid(alpha=0.3)


def save(fig: Any, path: str, dpi: int = 110) -> str:
    """Save ``fig`` at ``path`` (folders created) and close it; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def curves(history: dict[str, list[tuple[int, float]]], path: str, title: str = "") -> str | None:
    """``curves.png``: train loss and test loss (left) and test accuracy (right) per round.

    Args:
        history: ``{"train_loss": [(round, value), ...], "val_loss": ..., "val_acc": ...}``.
        path: the file to write.
        title: the figure's title.

    Returns:
        ``path``, or None when there is nothing to draw.
    """
    if not any(history.get(k) for k in ("train_loss", "val_loss", "val_acc")):
        return None
    fig, (left, right) = subplots(2, width=4.2)
    for key, name in (("train_loss", "train (clients)"), ("val_loss", "test (global model)")):
        points = history.get(key) or []
        if points:
            plot_rounds(left, [r for r, _ in points], [v for _, v in points], name=name,
                        title="loss", ylabel="cross-entropy")
    if any(history.get(k) for k in ("train_loss", "val_loss")):
        left.legend(fontsize=8)
    points = history.get("val_acc") or []
    if points:
        plot_rounds(right, [r for r, _ in points], [v for _, v in points], key="val_acc")
    else:
        right.set_axis_off()
    if title:
        fig.suptitle(title)
    return save(fig, path)
