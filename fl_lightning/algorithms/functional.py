"""Functional helpers of the local step: differentiation, the network call, list kernels.

Each picks the cheapest correct way where it runs: outside any ``torch.func`` transform (the
sequential engine) ``torch.autograd.grad`` on leaf copies, a direct swap of the module's
tensors and ``torch._foreach_*`` kernels; inside one (``vmap`` in the batched engine, or an
outer ``grad`` / ``jvp`` of a callback) ``torch.func`` and plain loops. The values are the same
either way, so an algorithm is written once. Re-exported by :mod:`fl_lightning.algorithms.base`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad_and_value

__all__ = [
    "adaptive_radius",
    "foreach_add",
    "foreach_add_",
    "foreach_mul",
    "foreach_mul_",
    "global_norm",
    "grad_of",
    "in_transform",
    "swapped_call",
]

Params = dict[str, Tensor]


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
