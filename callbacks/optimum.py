"""Exact optimum of a (regularized) weighted loss in float64: L-BFGS, then Newton, then a check.

Used by the analysis callbacks that need a client's or the global minimizer to machine
precision (:class:`~fl_lightning.callbacks.floor.GlobalObjective`,
:class:`~fl_lightning.callbacks.optima.ClientOptimaProbe`); re-exported from
:mod:`fl_lightning.callbacks.functional`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl_lightning.callbacks.functional import (
    Batch,
    Criterion,
    Params,
    flatten,
    normalize_weights,
    unflatten,
    weighted_loss,
)

__all__ = ["exact_minimum"]


def exact_minimum(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    criterion: Criterion = F.cross_entropy,
    tol: float = 1e-8,
    max_iter: int = 100,
    newton_max_params: int = 2000,
    l2: float = 0.0,
    weights: Sequence[float] | None = None,
) -> tuple[Params, dict[str, float]]:
    """``argmin_w L(w) + l2/2 ||w||^2`` (``L`` of :func:`weighted_loss` over all ``batches``),
    in float64, to ``||grad|| < tol``.

    On separable (or nearly separable) data an unregularized softmax regression has no finite
    minimizer: the loss keeps decreasing along a direction while the gradient is already tiny,
    so a gradient tolerance certifies nothing. ``l2 > 0`` (SGD's ``weight_decay`` on the same
    weights) makes the objective strongly convex with one finite minimizer.

    L-BFGS with a strong-Wolfe line search (``torch.optim.LBFGS``) until ``||grad|| < 1e-5``,
    then, up to ``newton_max_params`` parameters, Newton's method on the dense Hessian
    (reverse-over-reverse, in chunks), the step taken in the Hessian's range (an
    eigendecomposition; softmax regression's Hessian is singular along the shifts that add the
    same vector to every class), with Armijo backtracking: it converges globally for a convex
    ``L`` and quadratically near the minimum. Larger models: L-BFGS to ``tol`` itself. On
    separable data with ``l2 = 0`` the loss runs towards 0 with growing weights, and the
    gradient test may pass at a point that is no minimum: use ``l2 > 0`` there.

    ``weights`` (one per batch) replaces the default ``|b| / sum |c|``, e.g. ``1 / K`` for the
    batches of ``K`` clients: the unweighted mean of the client losses.

    Returns:
        ``(w*, info)`` with ``info``: ``loss`` (``L(w*)``), ``grad_norm``, ``iterations``,
        ``converged`` (1.0 when ``grad_norm < tol``).
    """
    like = {k: v.detach().to(torch.float64) for k, v in params.items()}
    data = [(x.to(torch.float64) if x.is_floating_point() else x, y) for x, y in batches]
    buffers = {k: (b.to(torch.float64) if b.is_floating_point() else b)
               for k, b in buffers.items()}
    if weights is None:  # every sample counts once: the mean loss over all batches
        weights = normalize_weights([len(y) for _, y in data], len(data))

    def objective(flat: Tensor) -> Tensor:
        value = weighted_loss(net, unflatten(flat, like), buffers, data, criterion, weights)
        return value + 0.5 * l2 * (flat * flat).sum() if l2 else value

    w = flatten(like).clone()
    grad_fn = torch.func.grad_and_value(objective)
    newton = w.numel() <= newton_max_params
    # L-BFGS first (cheap iterations), to the tolerance itself for large models, else to 1e-5
    # where Newton takes over and converges in a few quadratic steps.
    w, iterations = _lbfgs(objective, grad_fn, w, tol if not newton else max(tol, 1e-5),
                           max_iter)
    if newton:
        w, steps = _newton(objective, grad_fn, w, tol, max_iter)
        iterations += steps
    return _check(grad_fn, w, like, tol, iterations)


def _newton(objective: Callable[[Tensor], Tensor], grad_fn, w: Tensor, tol: float,
            max_iter: int) -> tuple[Tensor, int]:
    """Newton's method on the dense Hessian from ``w`` until ``||grad|| < tol``, at most
    ``max_iter`` steps; the step in the Hessian's range, with Armijo backtracking.

    Returns:
        ``(w, steps taken)``.
    """
    hess_fn = torch.func.jacrev(torch.func.grad(objective), chunk_size=16)
    steps = 0
    for _ in range(max_iter):
        g, f0 = grad_fn(w)
        if float(torch.linalg.vector_norm(g)) < tol:
            break
        steps += 1
        evals, vecs = torch.linalg.eigh(hess_fn(w))
        keep = evals > evals.max().clamp_min(0) * 1e-12
        q = vecs[:, keep]
        step = q @ ((q.T @ g) / evals[keep])
        slope = float(g @ step)
        t = 1.0
        while t > 1e-12 and float(objective(w - t * step)) > float(f0) - 1e-4 * t * slope:
            t *= 0.5
        w = w - t * step
    return w, steps


def _check(grad_fn, w: Tensor, like: Mapping[str, Tensor], tol: float,
           iterations: int) -> tuple[Params, dict[str, float]]:
    """The final gradient test at ``w``: the parameters shaped as ``like`` and the ``info`` of
    :func:`exact_minimum`."""
    g, value = grad_fn(w)
    gnorm = float(torch.linalg.vector_norm(g))
    info = {"loss": float(value), "grad_norm": gnorm, "iterations": float(iterations),
            "converged": float(gnorm < tol)}
    return {k: v.clone() for k, v in unflatten(w, like).items()}, info

def _lbfgs(objective: Callable[[Tensor], Tensor], grad_fn, w: Tensor, tol: float,
           max_iter: int) -> tuple[Tensor, int]:
    """L-BFGS (strong Wolfe) on ``objective`` from ``w`` until ``||grad|| < tol``; at most
    ``max_iter`` outer calls of 20 iterations each. Returns ``(w, outer calls)``.

    Its line search needs a loss decrease that float64 can resolve, so it stalls at a gradient
    norm around ``sqrt(eps L f)`` (about 1e-8 to 1e-7 here); Newton's step does not need one.
    For an ``m``-strongly convex loss a gradient norm ``g`` bounds the loss error by
    ``g^2 / (2 m)``."""
    w = w.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=20, tolerance_grad=tol / math.sqrt(w.numel()),
                            tolerance_change=0.0, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        value = objective(w)
        value.backward()
        return value

    calls = 0
    for calls in range(1, max_iter + 1):  # noqa: B007 - read after the loop
        g, _ = grad_fn(w.detach())
        if float(torch.linalg.vector_norm(g)) < tol:
            calls -= 1
            break
        opt.step(closure)
    return w.detach(), calls
