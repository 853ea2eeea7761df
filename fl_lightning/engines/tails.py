"""The padded round's tails: once at most a few clients still have local steps, they finish as
plain (unbatched) steps, one client after another.

Client sizes are heavy-tailed (the FedProx paper's power-law devices; any natural partition),
so a padded round's lock-step is as long as its largest client, and most of its steps run
with one or two live rows. A vmapped step costs several plain steps on the CPU (its
``torch.func`` machinery is a fixed cost per call: ~1.3 ms for one row of the logistic
regression against ~0.3 ms for a plain step), so those steps are cheaper unbatched. A tail
step is the sequential engine's step (the algorithm's ``direction`` outside any transform, the
in-place SGD update, the transform of the plan applied to the client's own batch), on the
client's row of the stacked weights, momentum buffers and client state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fl_lightning.algorithms.base import Algorithm, LocalContext, Params
from fl_lightning.engines.base import sgd_step
from fl_lightning.engines.stacked import StackedState

if TYPE_CHECKING:  # the plan types import the engines
    from fl_lightning.engine import RoundPlan

__all__ = ["finish_tails", "tail_start"]


def tail_start(plan: RoundPlan, rows: int) -> int:
    """The first local step at which at most ``rows`` clients of ``plan`` still have a step
    (the lock-step runs the steps before it; ``rows = 0``: no tail, the most steps)."""
    steps = sorted((len(c.batches) for c in plan.clients), reverse=True)
    if rows <= 0 or not steps:
        return steps[0] if steps else 0
    return steps[rows] if rows < len(steps) else 0


def finish_tails(
    algorithm: Algorithm, ctx: LocalContext, state: StackedState, stacked: Params,
    bufs: list[Tensor] | None, names: list[str], plan: RoundPlan, data: tuple[Tensor, Tensor],
    start: int, lr: float, momentum: float, weight_decay: float, sums: Tensor | None,
) -> Tensor:
    """Steps ``start..`` of every client that has them, as plain steps on its rows of
    ``stacked`` (and ``bufs``), written back in place; returns every client's sum of step
    losses (``sums`` of the lock-step plus its tail's, in step order)."""
    x_all, y_all = data
    if sums is None:
        sums = torch.zeros(len(plan.clients), dtype=ctx.lr.dtype if isinstance(
            ctx.lr, Tensor) else torch.get_default_dtype(), device=x_all.device)
    saved = ctx.state, ctx.padded, ctx.step
    ctx.padded = False  # a tail step sees the client's own batch, no padding
    try:
        for k, client in enumerate(plan.clients):
            if len(client.batches) > start:
                sums[k] = _tail(algorithm, ctx, state, stacked, bufs, names, plan, k,
                                (x_all, y_all), start, lr, momentum, weight_decay, sums[k])
    finally:
        ctx.state, ctx.padded, ctx.step = saved
    return sums


def _tail(algorithm: Algorithm, ctx: LocalContext, state: StackedState, stacked: Params,
          bufs: list[Tensor] | None, names: list[str], plan: RoundPlan, k: int,
          data: tuple[Tensor, Tensor], start: int, lr: float, momentum: float,
          weight_decay: float, total: Tensor) -> Tensor:
    """Client ``k``'s steps ``start..`` (its row ``k``); returns its loss sum."""
    x_all, y_all = data
    client = plan.clients[k]
    params = {key: v[k].clone() for key, v in stacked.items()}
    values = [params[key] for key in names]
    row_bufs = None if bufs is None else [b[k].clone() for b in bufs]
    ctx.state = state.unpack(tuple(b[k] for b in state.batched))
    for step in range(start, len(client.batches)):
        ctx.step = step
        idx = client.batches[step].to(x_all.device, non_blocking=True)
        x = x_all[idx]
        if plan.transform is not None:
            x = plan.transform(x, plan.round, client.client_id, step)
        direction, loss = algorithm.direction(params, x, y_all[idx], ctx)
        row_bufs = sgd_step(values, [direction[n] for n in names], row_bufs, lr, momentum,
                            weight_decay)
        total = total + loss.detach().to(total.dtype)
    for key, value in zip(names, values, strict=True):
        stacked[key][k] = value
    if bufs is not None and row_bufs is not None:
        for b, row in zip(bufs, row_bufs, strict=True):
            b[k] = row
    return total
