"""What both client engines share: the engine protocol, the SGD update, the compile helper and
the batch-transform protocols.

The local optimizer is SGD with momentum and weight decay in PyTorch's convention
(``d = g + wd * w``; ``b = d`` at the first step, then ``b = m * b + d``; ``w = w - lr * b``),
created fresh for every client in every round as in the FedSoL paper. :func:`sgd_update` is the
one implementation of it; the sequential engine applies it to one client's weights, the batched
engine to the stacked ``(K, ...)`` weights of all clients, masked to the clients that have the
step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from fl_lightning.algorithms.base import Algorithm, ClientResult, Params
from fl_lightning.validate import choice

if TYPE_CHECKING:
    from fl_lightning.protocol import RoundPlan

__all__ = [
    "COMPILE_MODES",
    "ClientEngine",
    "GroupedTransform",
    "PlannedAugmentation",
    "compile_mode",
    "compile_step",
    "sgd_step",
    "sgd_update",
]

#: ``--model.engine.compile`` values (``true`` is ``default``, ``false`` ``none``).
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")


@runtime_checkable
class ClientEngine(Protocol):
    """What the round loop needs from a client engine (``--model.engine``).

    An engine trains the clients of a :class:`~fl_lightning.engine.RoundPlan` from the global
    weights with the algorithm's local update direction and returns one
    :class:`~fl_lightning.algorithms.base.ClientResult` per client, in plan order.
    :meth:`check` is called at setup and raises ``ConfigError`` for what the engine cannot run
    (a no-op here). The project's engines (:class:`~fl_lightning.engines.SequentialEngine`,
    :class:`~fl_lightning.engines.BatchedEngine`) declare it as their base so that
    ``--model.engine`` takes their short names and inherit the no-op ``check``; any class with
    this ``run_round`` and ``check`` works from Python. Optional: a ``sink=None`` keyword of
    ``run_round``; an engine that has it gives each result (or chunk of results) to the sink as
    it finishes and returns ``[]``, so a streamed round holds O(1) clients
    (:func:`fl_lightning.stream.accepts_sink`); an engine without it returns its list and the
    round folds that.
    """

    name: str

    def run_round(
        self,
        algorithm: Algorithm,
        net: nn.Module,
        global_params: Params,
        buffers: Params,
        plan: RoundPlan,
        data: tuple[Tensor, Tensor],
        lr: float,
        momentum: float,
        weight_decay: float,
    ) -> list[ClientResult]:
        """Run local training for every client of ``plan``; returns one result per client."""
        ...

    def check(self, algorithm: Algorithm, net: nn.Module) -> None:
        """Raise a one-line ``ConfigError`` if this engine cannot run ``algorithm`` on ``net``
        (called once at setup). Default: every combination runs."""
        del algorithm, net


@runtime_checkable
class GroupedTransform(Protocol):
    """A batch transform (``transform(x, round, client_id, step) -> x``, the
    :data:`~fl_lightning.engine.BatchTransform` signature) that also augments the stacked
    batches ``(K, B, ...)`` of several clients at one step in a single call. The data module's
    :class:`~fl_lightning.data.module.RoundAugmentation` implements it; the batched engine calls
    :meth:`many` for a group of clients instead of the transform once per client."""

    def __call__(self, x: Tensor, round_idx: int, client_id: int, step: int) -> Tensor: ...

    def many(self, x: Tensor, round_idx: int, client_ids: list[int], step: int) -> Tensor:
        """Augment ``x`` ``(K, B, ...)``, row ``k`` being client ``client_ids[k]``'s batch."""
        ...


@runtime_checkable
class PlannedAugmentation(GroupedTransform, Protocol):
    """A grouped transform whose random draws for the round are made in advance, on the device
    (the data module's :class:`~fl_lightning.data.module.RoundAugmentation`): the batched
    engine's padded round gathers the draws of every ``(step, client)`` once and augments inside
    the (compiled) step with ``augmentation(x, draws)``.

    Attributes:
        round: the round the draws were made for.
        augmentation: ``(x, draws) -> x``, the pure function that applies draws to a batch.
    """

    round: int
    augmentation: Callable[[Tensor, Tensor], Tensor] | None

    def step_draws(self, client_id: int, step: int, size: int) -> Tensor | None:
        """The ``(size, 5)`` draws of the client's batch at ``step`` (``None``: not planned)."""
        ...


@torch.no_grad()
def sgd_update(
    values: Sequence[Tensor],
    grads: Sequence[Tensor],
    bufs: list[Tensor] | None,
    lr: float | Tensor,
    momentum: float,
    weight_decay: float,
    active: Tensor | None = None,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """One SGD step on a list of tensors (one client's weights, or stacked ``(K, ...)`` rows).

    Two forms of the same arithmetic (``d = g + wd * w``, ``b = m * b + d``, ``w = w - lr * b``):

    - ``lr`` a float and ``active`` ``None``: in place, bit-identical to ``torch.optim.SGD``
      (foreach, no dampening); with momentum, ``bufs=None`` at the first step makes ``b = d``.
    - ``lr`` a 0-d tensor (an input of a compiled step) or ``active`` given: out of place (the
      inputs are not modified, so it can be traced); ``bufs`` are zeros before the first step
      (``b = 0 * m + d = d`` exactly) or ``None`` without momentum. Rows ``k`` where the ``(K,)``
      mask ``active`` is false keep their weights and buffers bit for bit.

    Args:
        values: the weights.
        grads: their update directions, in the same order.
        bufs: the momentum buffers (see above).
        lr: the learning rate.
        momentum: the momentum factor.
        weight_decay: the L2 penalty added to the direction.
        active: ``(K,)`` boolean mask of the rows that take the step (stacked weights only).

    Returns:
        The new weights (``values`` itself in the in-place form) and momentum buffers.
    """
    values = list(values)
    if weight_decay != 0.0:
        grads = torch._foreach_add(grads, values, alpha=weight_decay)
    if not isinstance(lr, Tensor) and active is None:
        if momentum != 0.0:
            if bufs is None:
                bufs = [g.clone() for g in grads]
            else:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, grads)
            grads = bufs
        torch._foreach_add_(values, grads, alpha=-lr)
        return values, bufs
    new_bufs = None
    if bufs is not None:
        new_bufs = torch._foreach_add(torch._foreach_mul(bufs, momentum), grads)
        grads = new_bufs
    new = torch._foreach_sub(values, torch._foreach_mul(grads, lr))
    if active is not None:
        def keep(a: list[Tensor], b: Sequence[Tensor]) -> list[Tensor]:
            return [torch.where(active.view(-1, *([1] * (n.ndim - 1))), n, o)
                    for n, o in zip(a, b, strict=True)]

        new = keep(new, values)
        if new_bufs is not None:
            new_bufs = keep(new_bufs, bufs)
    return new, new_bufs


def sgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor] | None,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> list[Tensor] | None:
    """One in-place SGD step, bit-identical to ``torch.optim.SGD`` (foreach, no dampening):
    the in-place form of :func:`sgd_update`.

    Returns the momentum buffers to pass to the next step (``None`` without momentum).
    """
    return sgd_update(params, grads, bufs, lr, momentum, weight_decay)[1]


def compile_mode(value: bool | str) -> str:
    """``--model.engine.compile`` as one of :data:`COMPILE_MODES` (``true`` is ``default``,
    ``false`` ``none``).

    Raises:
        ConfigError: for any other value.
    """
    if isinstance(value, bool):
        return "default" if value else "none"
    return choice(value, "--model.engine.compile", COMPILE_MODES,
                  "or true (default) / false (none)")


def compile_step(fn: Callable[..., Any], mode: str, backend: Any, fullgraph: bool = False):
    """``fn`` wrapped in ``torch.compile`` for ``mode`` (one of :data:`COMPILE_MODES`; ``none``
    returns ``fn`` itself), with static shapes (``dynamic=False``) and ``backend``."""
    if mode == "none":
        return fn
    options: dict[str, Any] = {"backend": backend, "dynamic": False}
    if fullgraph:
        options["fullgraph"] = True
    if mode != "default":
        options["mode"] = mode
    return torch.compile(fn, **options)
