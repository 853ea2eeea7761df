"""What an algorithm is: a local update direction, optional client state, a server rule.

An algorithm never touches an optimizer, a data loader or a device. The client engine owns the
local optimizer (SGD with momentum and weight decay, fresh per client per round) and calls
:meth:`Algorithm.direction` once per local step with the client's current weights as a dict of
plain tensors; the direction it returns is what the optimizer applies. Writing the step as a
function of tensors lets the same code run one client at a time or many at once.

Differentiation and the network call go through :func:`grad_of` and
:meth:`LocalContext.forward`, which pick the cheapest way that is correct where they run:
outside any ``torch.func`` transform (the sequential engine) ``torch.autograd.grad`` on leaf
copies of the weights and a direct swap of the module's parameters (the cost of a plain module's
forward and backward); inside one (``vmap`` in the batched engine, or an outer ``grad`` / ``jvp``
of a callback) ``torch.func.grad_and_value`` and ``functional_call``. The two give the same
values; an algorithm is written once. The same holds for the list helpers (:func:`foreach_mul`,
...): ``torch._foreach_*`` kernels outside a transform, a plain loop inside one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad_and_value

from fl_lightning.errors import ConfigError
from fl_lightning.protocol import ClientResult, LocalContext, Params

__all__ = [
    "IGNORE_INDEX",
    "Algorithm",
    "ClientResult",
    "LocalContext",
    "Params",
    "batch_mean",
    "check_nonnegative",
    "check_positive",
    "finish_round",
    "head_parameter_names",
    "kl_batchmean",
    "real_samples",
    "weighted_mean",
]

#: The label of a padding sample (``F.cross_entropy``'s default ``ignore_index``). The batched
#: engine pads every client's batch to one static shape; its padding samples carry this label,
#: and every batch mean of the project's losses (:func:`batch_mean`, :func:`cross_entropy`,
#: :func:`kl_batchmean`) is taken over the other samples only.
IGNORE_INDEX = -100


def head_parameter_names(net: nn.Module) -> list[str]:
    """Names of the parameters of ``net``'s last child module (its classifier head).

    The official FedSoL code uses the same convention ("the last entry of named_children").
    """
    children = list(net.named_children())
    if not children:
        return []
    head = children[-1][0]
    return [name for name, _ in net.named_parameters() if name.split(".", 1)[0] == head]


def check_nonnegative(name: str, value: float, option: str) -> float:
    """``value`` as a float if it is finite and >= 0, else a one-line ``ConfigError``."""
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(
            f"{option}={value!r} is invalid: {name} must be a finite number >= 0 "
            f"(e.g. {option}=0.1)"
        )
    return value


def check_positive(name: str, value: float, option: str, hint: str) -> float:
    """``value`` as a float if it is finite and > 0, else a one-line ``ConfigError``
    ending in ``hint`` (e.g. the paper's value)."""
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{option}={value!r} is invalid: {name} must be > 0 ({hint})")
    return value


def real_samples(y: Tensor) -> Tensor:
    """Mask ``(B,)`` of the samples that are not padding (label != :data:`IGNORE_INDEX`)."""
    return y != IGNORE_INDEX


def batch_mean(values: Tensor, y: Tensor | None = None) -> Tensor:
    """Mean of the per-sample ``values`` ``(B,)`` over the batch's real samples.

    Outside a ``torch.func`` transform (the sequential engine, which never pads) or without
    labels it is ``values.mean()``; inside one (the batched engine) the samples labelled
    :data:`IGNORE_INDEX` are left out: ``sum_b m_b v_b / max(sum_b m_b, 1)``, so a client's
    loss is exactly its own mean over its real samples and a fully padded batch (a client
    that has finished its steps) gives 0, not NaN.
    """
    if y is None or not in_transform():
        return values.mean()
    mask = real_samples(y).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` ``(B, C)`` against class indices ``y``, over the
    samples whose label is not :data:`IGNORE_INDEX` (padding).

    ``F.cross_entropy`` outside a transform (its ``ignore_index`` is the same); inside one
    (``vmap``), the same quantity as ``-mean_b log_softmax(logits)[b, y_b]`` over the real
    samples, whose operations have native batching rules (``F.cross_entropy`` falls back to
    a decomposition written in Python there).
    """
    if in_transform():
        picked = torch.log_softmax(logits, dim=-1).gather(-1, y.clamp_min(0).unsqueeze(-1))
        return batch_mean(-picked.squeeze(-1), y)
    return F.cross_entropy(logits, y)


def kl_batchmean(log_q: Tensor, p: Tensor, y: Tensor | None = None) -> Tensor:
    """``F.kl_div(log_q, p, reduction="batchmean")`` (``KL(p || q)`` per sample, summed over
    classes, averaged over the batch), over the real samples when ``y`` is given inside a
    transform (see :func:`batch_mean`)."""
    if y is None or not in_transform():
        return F.kl_div(log_q, p, reduction="batchmean")
    return batch_mean(F.kl_div(log_q, p, reduction="none").sum(-1), y)


def cross_entropy_loss(ctx: LocalContext, params: Params, x: Tensor, y: Tensor) -> Tensor:
    return cross_entropy(ctx.forward(params, x), y)


class Algorithm:
    """Federated averaging; the base class of every algorithm.

    The local step minimizes the cross-entropy ``CE(f(w; x), y)`` of the mini-batch; the
    direction handed to the local optimizer is its gradient. The server averages the client
    weights in proportion to their training-set sizes ``n_k``:
    ``w_avg = sum_k n_k w_k / sum_k n_k`` over the clients sampled this round.

    Subclasses override :meth:`direction` (the local update direction), optionally
    :meth:`client_begin` / :meth:`client_end` (client state) and :meth:`aggregate` (server rule),
    and declare what they need in three class attributes (an instance may override them in
    ``__init__``, as FedSoL does with its proximal source's):

    Attributes:
        client_state: names of the per-client state entries kept between rounds (SCAFFOLD:
            ``("c_i",)``); empty when clients are stateless.
        server_rule: ``"mean"`` when :meth:`aggregate` is the data-size weighted mean of the
            client weights (DDP computes it as one flat all-reduce; robust aggregators, DP and
            secure aggregation may replace it); ``"custom"`` when it needs more (the extras).
        batchable: whether the batched engine (``torch.vmap`` over clients) can run it.

    The life of a client in a round: :meth:`client_begin` reads its stored state into
    ``ctx.state``; the engine calls :meth:`direction` at every local step;
    :meth:`client_end` writes the new state and the server-bound extras into the
    :class:`ClientResult`; the round loop drops diverged clients, calls
    :meth:`commit_client` for the others, then :meth:`aggregate`. ``client_begin`` and
    ``client_end`` never change the algorithm, so a skipped client leaves no trace.

    Example:
        >>> algo = Algorithm()
        >>> algo.name, algo.client_state, algo.server_rule, algo.batchable
        ('fedavg', (), 'mean', True)
    """

    name = "fedavg"
    client_state: tuple[str, ...] = ()
    server_rule: str = "mean"
    batchable: bool = True

    def task_loss(self, ctx: LocalContext, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """The client's own objective on a batch: the cross-entropy ``CE(f(w; x), y)``.

        Every algorithm builds its direction from this loss, so a subclass that overrides it
        (e.g. a least-squares loss in tests) changes the task and nothing else.
        """
        return cross_entropy_loss(ctx, params, x, y)

    def task_grad(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Gradient of :meth:`task_loss` w.r.t. every parameter, and the loss."""
        return grad_of(lambda p: self.task_loss(ctx, p, x, y), params)

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Return the local update direction at ``params`` for the batch, and the batch loss."""
        return self.task_grad(params, x, y, ctx)

    def frozen(self, ctx: LocalContext) -> set[str]:
        """Names of parameters the local optimizer must not touch this round (default none)."""
        del ctx
        return set()

    def client_begin(self, ctx: LocalContext) -> None:
        """Called before a client's first local step: read its stored state into ``ctx.state``
        (never change the algorithm here)."""

    def client_end(self, ctx: LocalContext, result: ClientResult) -> None:
        """Called after a client's last local step: fill ``result.state`` (the client's new
        state) and ``result.extras`` (what the server rule needs); never change the
        algorithm here."""

    def commit_client(self, result: ClientResult) -> None:
        """Store ``result.state`` as the client's state; called by the round loop only for
        clients whose update is kept (finite). Stateful algorithms keep a
        :class:`~fl_lightning.algorithms.state.ClientStateStore` in ``self.clients``."""
        if result.state:
            self.clients.put(result.client_id, result.state)

    def aggregate(
        self,
        global_params: Params,
        results: Sequence[ClientResult],
        *,
        num_clients: int | None = None,
        total_samples: int | None = None,
    ) -> Params:
        """New global weights from the clients' results: the data-size weighted average.

        ``num_clients`` and ``total_samples`` describe the whole population (sampled or not);
        server rules such as SCAFFOLD's and FedDyn's need them.
        """
        del num_clients, total_samples
        return weighted_mean(global_params, results)

    # Client state lives in checkpoints: algorithms with state override these two.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def finish_round(
    algorithm: Algorithm,
    global_params: Params,
    results: Sequence[ClientResult],
    *,
    num_clients: int | None = None,
    total_samples: int | None = None,
) -> Params:
    """The server side of a round without systems mechanisms: commit every client's new state
    (:meth:`Algorithm.commit_client`), then return the server rule's aggregate."""
    for r in results:
        algorithm.commit_client(r)
    return algorithm.aggregate(
        global_params, results, num_clients=num_clients, total_samples=total_samples
    )


def weighted_mean(global_params: Params, results: Sequence[ClientResult]) -> Params:
    """``sum_k n_k w_k / sum_k n_k`` over the results, for every entry of ``global_params``."""
    sizes = torch.tensor([float(r.num_samples) for r in results])
    weights = (sizes / sizes.sum()).tolist()
    out: Params = {}
    for name in global_params:
        acc = results[0].params[name] * weights[0]
        for w, r in zip(weights[1:], results[1:], strict=True):
            acc = acc + r.params[name] * w
        out[name] = acc
    return out


def in_transform() -> bool:
    """Whether a ``torch.func`` transform (``vmap``, ``grad``, ``jvp``, ...) is active here."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def _slot(net: nn.Module, name: str) -> tuple[dict, str]:
    """The dict (``_parameters`` or ``_buffers`` of the owning submodule) and key of ``name``.

    Resolved on every call (a few attribute lookups), so a module whose submodules were
    replaced since the last call is never written through a stale table."""
    owner, _, leaf = name.rpartition(".")
    module = net.get_submodule(owner) if owner else net
    if leaf in module._parameters:
        return module._parameters, leaf
    if leaf in module._buffers:
        return module._buffers, leaf
    raise KeyError(f"{type(net).__name__} has no parameter or buffer {name!r}")


def swapped_call(
    net: nn.Module, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor
) -> Tensor:
    """``net(x)`` with its parameters and buffers replaced by the given tensors for the call.

    The same as ``torch.func.functional_call(net, (params, buffers), (x,))`` for a module
    without tied weights, at the cost of one dict write per tensor (no transform may be active:
    see :func:`in_transform`). The module's own tensors are put back afterwards.
    """
    saved = []
    try:
        for group in (params, buffers):
            for name, value in group.items():
                table, leaf = _slot(net, name)
                saved.append((table, leaf, table[leaf]))
                table[leaf] = value
        return net(x)
    finally:
        for table, leaf, old in reversed(saved):
            table[leaf] = old


def grad_of(
    loss_fn, params: Params, names: Sequence[str] | None = None, has_aux: bool = False
) -> tuple[Params, Tensor]:
    """Gradient of ``loss_fn(params)`` w.r.t. the parameters in ``names`` (default all), and
    the loss (``has_aux``: ``loss_fn`` returns ``(loss, aux)`` and ``aux`` is returned instead).

    Outside a ``torch.func`` transform: ``torch.autograd.grad`` on detached leaf copies of the
    differentiated tensors; inside one: ``torch.func.grad_and_value``. Same values either way.
    """
    names = list(params) if names is None else list(names)
    if in_transform():
        if len(names) == len(params):
            fn = loss_fn
            start = params
        else:
            def fn(sub: Params):
                return loss_fn({**params, **sub})

            start = {k: params[k] for k in names}
        if has_aux:
            grads, aux = torch.func.grad(fn, has_aux=True)(start)
            return grads, aux.detach()
        return grad_and_value(fn)(start)
    leaves = [params[k].detach().requires_grad_(True) for k in names]
    full = dict(params)
    full.update(zip(names, leaves, strict=True))
    with torch.enable_grad():
        out = loss_fn(full)
        loss, aux = out if has_aux else (out, None)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    result = {
        k: (g if g is not None else torch.zeros_like(v))
        for k, g, v in zip(names, grads, leaves, strict=True)
    }
    return result, (aux.detach() if has_aux else loss.detach())


def foreach_mul(a: Sequence[Tensor], b: Sequence[Tensor] | Tensor | float) -> list[Tensor]:
    """``[a_i * b_i]`` (or ``[a_i * b]`` for one tensor or number ``b``)."""
    if in_transform():
        if isinstance(b, (Tensor, float, int)):
            return [t * b for t in a]
        return [t * u for t, u in zip(a, b, strict=True)]
    return list(torch._foreach_mul(list(a), b if isinstance(b, (Tensor, float, int)) else list(b)))


def foreach_add(a: Sequence[Tensor], b: Sequence[Tensor], alpha: float = 1.0) -> list[Tensor]:
    """``[a_i + alpha * b_i]``."""
    if in_transform():
        if alpha == 1.0:
            return [t + u for t, u in zip(a, b, strict=True)]
        return [t + alpha * u for t, u in zip(a, b, strict=True)]
    return list(torch._foreach_add(list(a), list(b), alpha=alpha))


def foreach_mul_(a: list[Tensor], b: Sequence[Tensor] | Tensor | float) -> list[Tensor]:
    """:func:`foreach_mul` that may write into ``a`` (outside a transform it does, so ``a``
    must be the caller's own scratch tensors); returns the products. Same values."""
    if in_transform():
        return foreach_mul(a, b)
    torch._foreach_mul_(a, b if isinstance(b, (Tensor, float, int)) else list(b))
    return a


def foreach_add_(a: list[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
    """``[a_i + b_i]``, written into ``a`` outside a transform (``a`` must be the caller's own
    scratch tensors). ``b_i + a_i`` rounds to the same value, so it also serves for
    ``b + a``."""
    if in_transform():
        return foreach_add(a, b)
    torch._foreach_add_(a, list(b))
    return a


def adaptive_radius(params: Sequence[Tensor], anchors: Sequence[Tensor]) -> list[Tensor]:
    """``|w - w_g|`` L2-normalized along dimension 0 of each tensor, as
    ``F.normalize(|w - w_g|, p=2, dim=0)`` (``x / max(||x||_dim0, 1e-12)``)."""
    if in_transform():
        return [F.normalize((w - g).abs(), p=2.0, dim=0) for w, g in zip(params, anchors,
                                                                         strict=True)]
    diff = torch._foreach_sub(list(params), list(anchors))
    torch._foreach_abs_(diff)
    norms = [torch.linalg.vector_norm(d, 2.0, dim=0, keepdim=True) for d in diff]
    torch._foreach_clamp_min_(norms, 1e-12)
    torch._foreach_div_(diff, [n.expand_as(d) for n, d in zip(norms, diff, strict=True)])
    return diff


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm over all entries of all tensors (computed as the norm of per-tensor norms)."""
    if in_transform():
        norms = [torch.linalg.vector_norm(t) for t in tensors]
    else:
        norms = torch._foreach_norm(list(tensors))
    return torch.linalg.vector_norm(torch.stack(norms))
