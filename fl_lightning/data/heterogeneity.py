"""Heterogeneity report of a partition: per-client class counts, sizes and summary numbers.

:func:`heterogeneity_report` is the functional kernel (a JSON-ready dict);
:func:`save_heatmap` draws the client x class matrix as a PNG (with Pillow, which torchvision
already requires); :func:`write_report` writes both. The Lightning callback
``callbacks.HeterogeneityReport`` writes them at the start of a fit, and the command

.. code-block:: bash

    python -m fl_lightning.data.heterogeneity --data.dataset mnist --data.data_dir DIR \\
        --data.partition shard --data.reference_partition true --data.seed 19940817 \\
        --out reports/mnist_shard2

accepts every ``--data.*`` option of ``fl-lightning fit``.

For client ``k`` with class counts ``n_kc`` and size ``n_k = sum_c n_kc``, its label
distribution is ``p_k = n_k. / n_k`` and the global one is ``q = sum_k n_k. / sum_k n_k``.
Reported per client: size, number of classes present (``n_kc > 0``), total variation distance
``TV(p_k, q) = 1/2 sum_c |p_kc - q_c|`` (0: same label mix as the whole; 1: disjoint) and
Jensen-Shannon divergence in bits ``JS(p_k, q)`` (in [0, 1]). The summary gives min / mean /
max of each, the size standard deviation and coefficient of variation (std / mean).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np

__all__ = [
    "datamodule_report", "describe", "heterogeneity_report", "main", "save_heatmap", "write_report",
]


def _stats(values: np.ndarray) -> dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    return {
        "min": float(values.min()),
        "mean": float(values.mean()),
        "max": float(values.max()),
        "std": float(values.std()),
    }


def _js_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Row-wise Jensen-Shannon divergence (base 2) between the rows of ``p`` and ``q``."""
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, a * np.log2(np.where(a > 0, a, 1) / np.where(b > 0, b, 1)), 0)
        return terms.sum(axis=-1)

    return np.clip(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0, 1.0)


def _class_counts(labels, client_indices: Sequence, num_classes: int | None):
    """``(counts, k)``: the clients x classes count matrix and the number of classes ``k``
    (``num_classes``, else ``max(label) + 1``)."""
    y = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).astype(np.int64).ravel()
    k = int(num_classes) if num_classes is not None else int(y.max()) + 1 if len(y) else 0
    counts = np.stack(
        [np.bincount(y[np.asarray(idx, dtype=np.int64)], minlength=k) for idx in client_indices]
    ) if len(client_indices) else np.zeros((0, k), dtype=np.int64)
    return counts, k


def heterogeneity_report(
    labels,
    client_indices: Sequence,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict:
    """Per-client class counts, sizes and distances to the global label distribution.

    Args:
        labels: the training labels (numpy array or tensor), one per sample.
        client_indices: one index array per client (indices into ``labels``).
        num_classes: number of classes (default ``max(label) + 1``).
        class_names: optional names of the classes, stored in the report.

    Returns:
        A JSON-serializable dict: ``num_clients``, ``num_classes``, ``num_samples`` (sum of the
        client sizes), ``class_counts`` (clients x classes), ``client_sizes``,
        ``global_distribution``, ``per_client`` (``classes``, ``tv_distance``,
        ``js_divergence``) and ``summary`` (``size`` with ``cv``, ``classes_per_client``,
        ``tv_distance``, ``js_divergence``: min / mean / max / std each).

    Example:
        >>> import numpy as np
        >>> r = heterogeneity_report(np.array([0, 0, 1, 1]), [np.array([0, 1]), np.array([2, 3])])
        >>> r["per_client"]["tv_distance"], r["summary"]["classes_per_client"]["mean"]
        ([0.5, 0.5], 1.0)
    """
    counts, k = _class_counts(labels, client_indices, num_classes)
    sizes = counts.sum(axis=1)
    total = counts.sum(axis=0)
    q = total / max(total.sum(), 1)
    p = counts / np.maximum(sizes, 1)[:, None]
    tv = 0.5 * np.abs(p - q[None, :]).sum(axis=1)
    js = _js_bits(p, np.broadcast_to(q, p.shape))
    present = (counts > 0).sum(axis=1)
    size_stats = _stats(sizes)
    size_stats["cv"] = size_stats["std"] / size_stats["mean"] if size_stats["mean"] else 0.0
    report = {
        "num_clients": int(len(counts)),
        "num_classes": k,
        "num_samples": int(sizes.sum()),
        "client_sizes": sizes.astype(int).tolist(),
        "class_counts": counts.astype(int).tolist(),
        "global_distribution": [float(v) for v in q],
        "per_client": {
            "classes": present.astype(int).tolist(),
            "tv_distance": [round(float(v), 6) for v in tv],
            "js_divergence": [round(float(v), 6) for v in js],
        },
        "summary": {
            "size": size_stats,
            "classes_per_client": _stats(present),
            "tv_distance": _stats(tv),
            "js_divergence": _stats(js),
        },
    }
    if class_names is not None:
        report["class_names"] = [str(c) for c in class_names]
    return report


# ------------------------------------------------------------------------------ PNG heatmap

#: Anchor colours of the viridis colour map (0, 0.25, 0.5, 0.75, 1).
_VIRIDIS = np.array(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float64
)


def _colormap(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to uint8 RGB by linear interpolation between viridis anchors."""
    t = np.clip(values, 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_VIRIDIS) - 2)
    frac = (t - lo)[..., None]
    return (_VIRIDIS[lo] * (1 - frac) + _VIRIDIS[lo + 1] * frac).round().astype(np.uint8)


def save_heatmap(report: dict, path: str | os.PathLike, title: str | None = None) -> str:
    """Draw the report as a PNG: one column per client, one row per class.

    A cell's colour is the share of the client's samples in that class (viridis, 0 to 1); a bar
    chart of the client sizes runs along the top and a colour bar on the right.

    Returns:
        The path written.
    """
    from PIL import Image, ImageDraw, ImageFont

    counts = np.asarray(report["class_counts"], dtype=np.float64)
    n_clients, n_classes = counts.shape if counts.size else (0, report["num_classes"])
    sizes = counts.sum(axis=1) if n_clients else np.zeros(0)
    share = counts / np.maximum(sizes, 1)[:, None] if n_clients else counts
    cw = int(np.clip(1000 // max(n_clients, 1), 2, 24))
    ch = int(np.clip(400 // max(n_classes, 1), 6, 24))
    left, top, bar_h, right, bottom = 64, 34, 50, 90, 34
    width = left + cw * max(n_clients, 1) + right
    height = top + bar_h + 6 + ch * max(n_classes, 1) + bottom
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    summary = report["summary"]
    heading = title or "label distribution per client"
    draw.text((left, 4), heading, fill="black", font=font)
    draw.text(
        (left, 18),
        f"{n_clients} clients, sizes {summary['size']['min']:.0f}-{summary['size']['max']:.0f}, "
        f"classes/client {summary['classes_per_client']['mean']:.2f}, "
        f"mean TV {summary['tv_distance']['mean']:.3f}",
        fill="black",
        font=font,
    )
    y0 = top + bar_h
    _draw_sizes(draw, font, sizes, (left, top, y0), cw, bar_h, n_clients)
    y1 = y0 + 6
    _draw_cells(img, draw, font, report, share, (left, y1), (cw, ch), (n_clients, n_classes))
    _draw_colour_bar(img, draw, font, left + cw * max(n_clients, 1) + 14, y1,
                     ch * max(n_classes, 1))
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path, format="PNG")
    return path


def _draw_sizes(draw, font, sizes: np.ndarray, origin: tuple[int, int, int], cw: int,
                bar_h: int, n_clients: int) -> None:
    """The bar chart of the client sizes above the heatmap; ``origin`` is ``(left, top, y0)``,
    ``y0`` the bars' base line."""
    left, top, y0 = origin
    peak = max(float(sizes.max()) if n_clients else 1.0, 1.0)
    for i, s in enumerate(sizes):
        h = int(round(bar_h * s / peak))
        if h < 1:
            continue
        draw.rectangle([left + i * cw, y0 - h, left + (i + 1) * cw - 1, y0 - 1], fill=(120,) * 3)
    draw.text((4, top + bar_h // 2 - 6), "size", fill="black", font=font)
    draw.text((left + cw * max(n_clients, 1) + 4, top), f"{peak:.0f}", fill="black", font=font)


def _draw_cells(img, draw, font, report: dict, share: np.ndarray, origin: tuple[int, int],
                cell: tuple[int, int], shape: tuple[int, int]) -> None:
    """The heatmap at ``origin`` (``cell`` = width, height of a cell; ``shape`` = clients,
    classes), with the class names on the left and the client labels below."""
    from PIL import Image

    (left, y1), (cw, ch), (n_clients, n_classes) = origin, cell, shape
    if n_clients:
        rgb = _colormap(share.T)  # classes x clients x 3
        cells = np.repeat(np.repeat(rgb, ch, axis=0), cw, axis=1)
        img.paste(Image.fromarray(cells, "RGB"), (left, y1))
    names = report.get("class_names") or [str(c) for c in range(n_classes)]
    for c in range(n_classes):
        if ch >= 10 or c % max(1, 10 // ch) == 0:
            draw.text((4, y1 + c * ch + max(ch // 2 - 6, 0)), str(names[c])[:9], fill="black",
                      font=font)
    draw.text((left, y1 + ch * n_classes + 4), "client 0", fill="black", font=font)
    last = f"client {n_clients - 1}"
    draw.text((left + cw * n_clients - 6 * len(last), y1 + ch * n_classes + 4), last,
              fill="black", font=font)
    draw.text((left, y1 + ch * n_classes + 18), "colour: share of the client's samples in "
              "the class", fill="black", font=font)


def _draw_colour_bar(img, draw, font, bx: int, y1: int, span: int) -> None:
    """The colour bar (1.0 at the top, 0.0 at the bottom), ``span`` pixels high at ``(bx, y1)``."""
    from PIL import Image

    ramp = _colormap(np.linspace(1.0, 0.0, span))[:, None, :].repeat(14, axis=1)
    img.paste(Image.fromarray(np.ascontiguousarray(ramp), "RGB"), (bx, y1))
    draw.text((bx + 18, y1 - 2), "1.0", fill="black", font=font)
    draw.text((bx + 18, y1 + span - 10), "0.0", fill="black", font=font)


def write_report(report: dict, prefix: str | os.PathLike, title: str | None = None):
    """Write ``<prefix>.json`` and ``<prefix>.png``; returns both paths."""
    prefix = os.fspath(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    json_path = prefix + ".json"
    with open(json_path, "w") as fh:
        json.dump(report, fh, indent=1)
    return json_path, save_heatmap(report, prefix + ".png", title)


def datamodule_report(dm) -> dict:
    """The report of a set-up :class:`~fl_lightning.data.module.FederatedDataModule`."""
    if not dm.client_indices:
        dm.setup("fit")
    if getattr(dm, "population", None) is not None:
        from fl_lightning.data.lazy import no_whole_set

        raise no_whole_set(dm, "whole training set to report on (HeterogeneityReport)")
    return heterogeneity_report(dm.train_y, dm.client_indices, dm.num_classes)


def describe(dm) -> str:
    """A short title naming the dataset and partition of a data module."""
    part = dm.partition
    if part == "shard":
        part += f" s={dm.shards_per_client}"
    elif part in ("lda", "dirichlet"):
        part += f" alpha={dm.alpha:g}"
    ref = ", reference" if dm.reference_partition else ""
    return f"{dm.dataset}, {dm.num_clients} clients, {part}{ref}, seed {dm.seed}"


def main(args: list[str] | None = None) -> None:
    """``python -m fl_lightning.data.heterogeneity --data.* ... --out PREFIX``."""
    import sys

    from jsonargparse import ArgumentParser

    from fl_lightning.data.module import FederatedDataModule
    from fl_lightning.errors import ConfigError

    parser = ArgumentParser(
        prog="python -m fl_lightning.data.heterogeneity",
        description="Write the heterogeneity report (JSON + PNG heatmap) of a partition.",
    )
    parser.add_class_arguments(FederatedDataModule, "data")
    parser.add_argument("--out", type=str, default="heterogeneity", help="output path prefix")
    parser.add_argument("--config", action="config")
    cfg = parser.parse_args(args)
    try:
        init = getattr(parser, "instantiate", None) or parser.instantiate_classes
        dm = init(cfg).data
        report = datamodule_report(dm)
        paths = write_report(report, cfg.out, describe(dm))
    except ConfigError as err:
        print(f"fl-lightning: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    s = report["summary"]
    print(
        f"{describe(dm)}: sizes min {s['size']['min']:.0f} / mean {s['size']['mean']:.1f} / max "
        f"{s['size']['max']:.0f}, classes per client {s['classes_per_client']['mean']:.2f}, "
        f"mean TV {s['tv_distance']['mean']:.3f}; wrote {paths[0]} and {paths[1]}"
    )


if __name__ == "__main__":  # pragma: no cover
    main()
