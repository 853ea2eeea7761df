"""Pieces the benchmark scripts share: the bare PyTorch FedSoL perturbation, the interleaved
timing loop and the JSON report.

Imported by the scripts in this folder (``python benchmarks/<script>.py`` puts the folder on
``sys.path``); not part of the package.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def perturb_(params: list[Tensor], anchors: list[Tensor], grads: list[Tensor],
             rho: float) -> list[Tensor]:
    """Add FedSoL's adaptive perturbation to ``params`` in place, written as plain PyTorch:
    ``eps = normalize(|w - w_g|, dim=0) * g * rho / ||g||``; returns the ``eps`` to undo."""
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = rho / (norm + 1e-12)
    eps = []
    for p, a, g in zip(params, anchors, grads, strict=True):
        e = F.normalize((p - a).abs(), p=2.0, dim=0) * g * scale
        p.add_(e)
        eps.append(e)
    return eps


@torch.no_grad()
def restore_(params: list[Tensor], eps: list[Tensor]) -> None:
    """Undo :func:`perturb_`."""
    for p, e in zip(params, eps, strict=True):
        p.sub_(e)


def write_json(path: str | None, out: dict) -> None:
    """Write the benchmark's result ``out`` to ``path`` (its folder made), if a path is given."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as fh:
            json.dump(out, fh, indent=2)


def interleaved(runs: dict[str, Callable[[], object]], repeats: int,
                report: bool = False) -> dict[str, list[float]]:
    """CPU seconds (``time.process_time``) of every call in ``runs``, ``repeats`` times each
    after one warm-up call each; repeat ``r`` starts at the ``r``-th entry, so no entry is
    always first or last under a machine's changing load. ``report`` prints every repeat."""
    for fn in runs.values():  # warm-up
        fn()
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.process_time()
            runs[name]()
            times[name].append(time.process_time() - start)
        if report:
            print(f"repeat {r}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names),
                  flush=True)
    return times
