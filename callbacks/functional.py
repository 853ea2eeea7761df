"""Functional kernels of the analysis callbacks: pure functions of tensors, no Lightning.

Each callback in :mod:`callbacks` is a thin class around one or more of these kernels, the way a
torchmetrics class wraps its ``torchmetrics.functional`` kernel. They take parameters as
``dict[str, Tensor]`` (``Params``) and a model as a stateless function through
``torch.func.functional_call``, so they run on whatever device the tensors are on.

Notation: ``w_g`` global weights, ``w_k`` client ``k``'s weights after local training,
``p_k = n_k / sum_j n_j`` aggregation weights over the clients considered, ``f_k`` client
``k``'s loss, ``F = sum_k p_k f_k``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp
from torchmetrics.functional.classification import multiclass_stat_scores

from fl_lightning import tensors

__all__ = [
    "Batch",
    "Criterion",
    "b_local_dissimilarity",
    "class_accuracy",
    "exact_minimum",
    "filter_normalized_direction",
    "flatten",
    "hessian_eigenvalues",
    "hvp_operator",
    "lanczos",
    "loss_and_grad",
    "normalize_weights",
    "oscillation_stats",
    "train_to_optimum",
    "unflatten",
    "update_dispersion",
    "weight_divergence",
    "weighted_loss",
]

Params = dict[str, Tensor]
Batch = tuple[Tensor, Tensor]
Criterion = Callable[[Tensor, Tensor], Tensor]


# ---------------------------------------------------------------------- parameter vectors
def flatten(params: Mapping[str, Tensor]) -> Tensor:
    """All entries of ``params`` as one vector, in the dict's order
    (:func:`fl_lightning.tensors.flatten_dict`)."""
    return tensors.flatten_dict(params)


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split a vector made by :func:`flatten` back into tensors shaped as ``like``
    (:func:`fl_lightning.tensors.unflatten_dict`, views of ``vec``).

    Raises:
        ValueError: if ``vec`` does not have exactly as many entries as ``like``.
    """
    numel = sum(p.numel() for p in like.values())
    if numel != vec.numel():
        raise ValueError(f"vector has {vec.numel()} entries, the parameters {numel}")
    return tensors.unflatten_dict(vec, like)


def normalize_weights(sizes: Sequence[float] | None, n: int) -> list[float]:
    """``p_k = n_k / sum_j n_j`` (uniform when ``sizes`` is None)."""
    if sizes is None:
        return [1.0 / n] * n
    total = float(sum(float(s) for s in sizes))
    return [float(s) / total for s in sizes]


# ---------------------------------------------------------------------- losses and curvature
def weighted_loss(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    criterion: Criterion = F.cross_entropy,
    weights: Sequence[float] | None = None,
) -> Tensor:
    """``L(w) = sum_b omega_b criterion(net(w; x_b), y_b)``.

    ``omega_b`` defaults to ``|b| / sum_c |c|``: with a mean-reducing criterion this is the mean
    loss over all samples of the batches.
    """
    if weights is None:
        weights = normalize_weights([len(y) for _, y in batches], len(batches))
    total = None
    for (x, y), w in zip(batches, weights, strict=True):
        term = criterion(functional_call(net, (dict(params), dict(buffers)), (x,)), y) * w
        total = term if total is None else total + term
    return total


def loss_and_grad(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    criterion: Criterion = F.cross_entropy,
    weights: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(L(w), grad L(w))`` of :func:`weighted_loss`, the gradient as a flat vector."""
    if weights is None:
        weights = normalize_weights([len(y) for _, y in batches], len(batches))
    params = {k: v.detach() for k, v in params.items()}
    loss_total = torch.zeros((), dtype=next(iter(params.values())).dtype)
    grad_total = None
    for batch, w in zip(batches, weights, strict=True):
        def one(p: Params, batch: Batch = batch) -> Tensor:
            return weighted_loss(net, p, buffers, [batch], criterion, [1.0])

        g, value = torch.func.grad_and_value(one)(params)
        g_flat = flatten(g) * w
        grad_total = g_flat if grad_total is None else grad_total + g_flat
        loss_total = loss_total.to(value.device) + value.detach() * w
    return loss_total, grad_total


def hvp_operator(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    criterion: Criterion = F.cross_entropy,
    weights: Sequence[float] | None = None,
) -> Callable[[Tensor], Tensor]:
    """The Hessian-vector product ``v -> H v`` of :func:`weighted_loss` at ``params``.

    Forward-over-reverse: ``H v = d/dt grad L(w + t v)`` at ``t = 0``, via
    ``torch.func.jvp(torch.func.grad(L))``, one batch at a time (memory of one batch).
    """
    if weights is None:
        weights = normalize_weights([len(y) for _, y in batches], len(batches))
    params = {k: v.detach() for k, v in params.items()}
    fns = []
    for batch in batches:
        def one(p: Params, batch: Batch = batch) -> Tensor:
            return weighted_loss(net, p, buffers, [batch], criterion, [1.0])

        fns.append(grad(one))

    def matvec(vec: Tensor) -> Tensor:
        tangent = unflatten(vec.to(next(iter(params.values())).dtype), params)
        out = None
        for g_fn, w in zip(fns, weights, strict=True):
            _, hv = jvp(g_fn, (params,), (tangent,))
            hv_flat = flatten(hv) * w
            out = hv_flat if out is None else out + hv_flat
        return out

    return matvec


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    num_iter: int = 30,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    which: str = "largest",
) -> tuple[Tensor, Tensor]:
    """Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    Builds an orthonormal Krylov basis ``V = [v_1..v_m]`` (``m = min(num_iter, dim)``) from a
    seeded random start, with ``T = V^T A V`` tridiagonal (``alpha_j`` on the diagonal,
    ``beta_j`` off it); every new vector is orthogonalized twice against all previous ones. The
    Ritz values of ``T`` approximate the extreme eigenvalues of ``A``; with ``m = dim`` they are
    exact up to rounding. The iteration stops early when ``beta_j`` vanishes (an invariant
    subspace was found: its Ritz values are exact).

    Args:
        matvec: ``v -> A v`` on vectors of length ``dim``.
        dim: size of the operator.
        k: number of eigenpairs returned.
        num_iter: Lanczos steps ``m`` (memory: ``m`` vectors of length ``dim``).
        seed: seed of the random start vector.
        dtype, device: of the basis vectors.
        which: ``largest`` (algebraic, descending) or ``smallest`` (algebraic, ascending).

    Returns:
        ``(eigenvalues[k], eigenvectors[dim, k])``; fewer than ``k`` if the Krylov space is
        smaller.
    """
    if which not in ("largest", "smallest"):
        raise ValueError(f"which={which!r}: use 'largest' or 'smallest'")
    m = max(1, min(int(num_iter), dim))
    basis, alphas, betas = _lanczos_basis(matvec, dim, m, seed, dtype, device)
    size = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if size > 1:
        off = torch.tensor(betas[: size - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    evals, evecs = torch.linalg.eigh(t)
    order = torch.argsort(evals, descending=(which == "largest"))[: min(k, size)]
    ritz_vectors = basis[:size].T @ evecs[:, order].to(device=device, dtype=dtype)
    return evals[order].to(dtype), ritz_vectors


def _lanczos_basis(
    matvec: Callable[[Tensor], Tensor], dim: int, m: int, seed: int, dtype: torch.dtype,
    device: torch.device | str,
) -> tuple[Tensor, list[float], list[float]]:
    """:func:`lanczos`'s Krylov basis (``m`` rows, the first ``len(alphas)`` of them filled),
    the diagonal ``alphas`` and the off-diagonal ``betas`` of ``T``."""
    gen = torch.Generator().manual_seed(int(seed))
    v = torch.randn(dim, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    basis = torch.empty(m, dim, dtype=dtype, device=device)  # one Lanczos vector per row
    basis[0] = v / torch.linalg.vector_norm(v)
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(m):
        w = matvec(basis[j]).to(dtype)
        alpha = float(torch.dot(w, basis[j]))
        alphas.append(alpha)
        if j + 1 == m:
            break
        w = w - alpha * basis[j]
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        done = basis[: j + 1]
        for _ in range(2):  # full reorthogonalization, twice is enough
            w = w - done.T @ (done @ w)
        beta = float(torch.linalg.vector_norm(w))
        scale = max(abs(a) for a in alphas) or 1.0
        if beta <= 1e-10 * scale:
            break
        betas.append(beta)
        basis[j + 1] = w / beta
    return basis, alphas, betas


def hessian_eigenvalues(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    k: int = 5,
    num_iter: int = 30,
    criterion: Criterion = F.cross_entropy,
    weights: Sequence[float] | None = None,
    seed: int = 0,
    which: str = "largest",
) -> tuple[Tensor, Tensor]:
    """Top-``k`` eigenpairs of the Hessian of :func:`weighted_loss` at ``params``.

    Lanczos (:func:`lanczos`) on torch.func Hessian-vector products (:func:`hvp_operator`).
    Cost: ``num_iter`` Hessian-vector products over all ``batches`` (each about 2-3x a
    forward+backward pass) and ``num_iter`` vectors of the model's size in memory.

    Returns:
        ``(eigenvalues[k], eigenvectors[num_params, k])`` in the order of ``flatten(params)``.
    """
    first = next(iter(params.values()))
    dim = sum(p.numel() for p in params.values())
    op = hvp_operator(net, params, buffers, batches, criterion, weights)
    return lanczos(op, dim, k, num_iter, seed, first.dtype, first.device, which)


# ---------------------------------------------------------------------- client statistics
def weight_divergence(
    global_params: Mapping[str, Tensor],
    client_params: Sequence[Mapping[str, Tensor]],
    per_layer: bool = False,
) -> dict[str, float]:
    """Distances ``d_k = ||w_g - w_k||_2`` and the mean pairwise ``||w_i - w_j||_2``.

    Returns ``div_mean``, ``div_std`` (population std), ``div_max`` over clients,
    ``pairwise_mean`` over pairs ``i < j`` (0 for one client), and with ``per_layer`` the mean
    over clients of ``||w_g[l] - w_k[l]||`` for each parameter tensor ``l`` (``div/<name>``).
    """
    g = flatten(global_params).double()
    locs = torch.stack([flatten(c).double() for c in client_params])
    d = torch.linalg.vector_norm(locs - g, dim=1)
    out = {
        "div_mean": float(d.mean()),
        "div_std": float(d.std(unbiased=False)),
        "div_max": float(d.max()),
        "pairwise_mean": float(torch.pdist(locs).mean()) if len(locs) > 1 else 0.0,
    }
    if per_layer:
        for name, gp in global_params.items():
            dl = [float(torch.linalg.vector_norm(c[name].double() - gp.double()))
                  for c in client_params]
            out[f"div/{name}"] = sum(dl) / len(dl)
    return out


def update_dispersion(updates: Tensor, weights: Sequence[float]) -> dict[str, float]:
    """Spread of client updates ``u_k`` (rows of ``updates``) around ``u_bar = sum_k p_k u_k``.

    ``dispersion = sqrt(sum_k p_k ||u_k - u_bar||^2)``, ``relative_dispersion = dispersion /
    ||u_bar||``, ``cos_pairwise_mean`` / ``cos_pairwise_min`` over pairs ``i < j`` of
    ``cos(u_i, u_j)``, ``cos_to_mean`` the ``p``-weighted mean of ``cos(u_k, u_bar)``,
    ``update_norm_mean`` the ``p``-weighted mean of ``||u_k||``.
    """
    u = updates.double()
    p = torch.tensor(weights, dtype=torch.float64, device=u.device)
    mean = (p[:, None] * u).sum(0)
    sq = ((u - mean) ** 2).sum(1)
    disp = float(torch.sqrt((p * sq).sum()))
    mean_norm = float(torch.linalg.vector_norm(mean))
    unit = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min(1e-300)
    out = {
        "dispersion": disp,
        "relative_dispersion": disp / mean_norm if mean_norm > 0 else math.inf,
        "update_norm_mean": float((p * torch.linalg.vector_norm(u, dim=1)).sum()),
        "cos_to_mean": float((p * (unit @ mean) / max(mean_norm, 1e-300)).sum()),
    }
    if len(u) > 1:
        cos = unit @ unit.T
        iu = torch.triu_indices(len(u), len(u), 1)
        pair = cos[iu[0], iu[1]]
        out["cos_pairwise_mean"] = float(pair.mean())
        out["cos_pairwise_min"] = float(pair.min())
    return out


def b_local_dissimilarity(grads: Tensor, weights: Sequence[float]) -> float:
    """FedProx's ``B(w) = sqrt(sum_k p_k ||grad f_k(w)||^2) / ||sum_k p_k grad f_k(w)||``.

    ``grads`` holds one flat client gradient per row. ``B >= 1``, with equality iff all
    client gradients are equal.
    """
    g = grads.double()
    p = torch.tensor(weights, dtype=torch.float64, device=g.device)
    num = torch.sqrt((p * (g ** 2).sum(1)).sum())
    den = torch.linalg.vector_norm((p[:, None] * g).sum(0))
    return float(num / den) if float(den) > 0 else math.inf


def oscillation_stats(window: Tensor) -> dict[str, float]:
    """Geometry of a trajectory of global weights ``w_{t0}..w_T`` (rows of ``window``).

    ``radius = sqrt(mean_t ||w_t - w_bar||^2)`` with ``w_bar`` the window mean (root mean
    square distance to the centre); ``path_length = sum_t ||w_{t+1} - w_t||``;
    ``displacement = ||w_T - w_{t0}||``; ``straightness = displacement / path_length``
    (1 for a straight path, near 0 for a walk that circles in a region).
    """
    w = window.double()
    centre = w.mean(0)
    radius = float(torch.sqrt(((w - centre) ** 2).sum(1).mean()))
    steps = torch.linalg.vector_norm(w[1:] - w[:-1], dim=1)
    path = float(steps.sum())
    disp = float(torch.linalg.vector_norm(w[-1] - w[0]))
    return {
        "radius": radius,
        "path_length": path,
        "displacement": disp,
        "straightness": disp / path if path > 0 else 1.0,
    }


# ---------------------------------------------------------------------- directions, optima
def filter_normalized_direction(
    params: Mapping[str, Tensor], generator: torch.Generator
) -> Params:
    """A random direction normalized filter by filter (Li et al., 2018).

    For each parameter tensor with 2 or more dimensions, every slice ``d[i]`` along dimension
    0 (a filter or an output neuron) of a Gaussian direction is rescaled to the norm of the
    matching slice of the weights, ``d[i] <- d[i] / ||d[i]|| * ||w[i]||``; 1-D tensors (biases,
    normalization) get a zero direction, as in the paper's "ignore biasbn" setting.
    """
    out: Params = {}
    for name, p in params.items():
        if p.dim() <= 1:
            out[name] = torch.zeros_like(p)
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
        dn = d.flatten(1).norm(dim=1).clamp_min(1e-12)
        wn = p.flatten(1).norm(dim=1)
        out[name] = d * (wn / dn).view(-1, *([1] * (p.dim() - 1)))
    return out


def train_to_optimum(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    criterion: Criterion = F.cross_entropy,
    lr: float = 0.05,
    momentum: float = 0.9,
    max_steps: int = 500,
    grad_tol: float = 1e-3,
    loss_tol: float = 0.0,
) -> tuple[Params, dict[str, float]]:
    """Minimize one client's loss alone from ``params`` by full-batch gradient descent.

    ``f(w) = weighted_loss(batches)`` (all the client's data), heavy-ball momentum
    ``b = m b + grad f(w); w = w - lr b``. Stopping rule, checked before every step: stop when
    ``||grad f(w)|| <= grad_tol`` (``reason=1``), or when ``f(w) <= loss_tol`` (``reason=2``),
    or after ``max_steps`` steps (``reason=0``).

    Returns:
        ``(w_k*, info)`` with ``info`` = ``steps``, ``loss``, ``grad_norm``, ``reason``.
    """
    w = {k: v.detach().clone() for k, v in params.items()}
    buf: Tensor | None = None
    steps, reason = 0, 0
    while True:
        loss, g = loss_and_grad(net, w, buffers, batches, criterion)
        gnorm = float(torch.linalg.vector_norm(g))
        if gnorm <= grad_tol:
            reason = 1
            break
        if float(loss) <= loss_tol:
            reason = 2
            break
        if steps >= max_steps:
            break
        buf = g if buf is None else momentum * buf + g
        vec = flatten(w) - lr * buf
        w = {k: v.clone() for k, v in unflatten(vec, w).items()}
        steps += 1
    return w, {"steps": float(steps), "loss": float(loss), "grad_norm": gnorm,
               "reason": float(reason)}


@torch.no_grad()
def class_accuracy(
    net: nn.Module,
    params: Mapping[str, Tensor],
    buffers: Mapping[str, Tensor],
    batches: Sequence[Batch],
    num_classes: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class correct counts and sample counts, and the mean loss, of ``net`` at ``params``.

    Returns ``(correct[num_classes], count[num_classes], loss)`` (float64 tensors); the
    accuracy of class ``c`` is ``correct[c] / count[c]``, the overall accuracy
    ``correct.sum() / count.sum()``.
    """
    correct = torch.zeros(num_classes, dtype=torch.float64)
    count = torch.zeros(num_classes, dtype=torch.float64)
    loss_sum = 0.0
    for x, y in batches:
        logits = functional_call(net, (dict(params), dict(buffers)), (x,))
        # torchmetrics' per-class [tp, fp, tn, fn, support]: correct = tp, count = support
        stats = multiclass_stat_scores(logits.argmax(1), y, num_classes, average=None)
        correct += stats[:, 0].double().cpu()
        count += stats[:, 4].double().cpu()
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
    return correct, count, torch.tensor(loss_sum / max(float(count.sum()), 1.0))


# the exact-optimum solver lives in callbacks/optimum.py; re-exported here (its old home)
from fl_lightning.callbacks.optimum import exact_minimum  # noqa: E402
