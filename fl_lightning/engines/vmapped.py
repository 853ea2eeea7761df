"""The batched engine's local step: one builder for the vmapped directions, and the two ways a
round runs them (padded to static shapes, or grouped by batch size for BatchNorm models).

:func:`build_directions` is the one place where the algorithm's ``direction`` is vmapped over
the clients (with the task-gradient fast path); :func:`padded_round` wraps it in a whole local
step (gather, augment, directions, masked SGD) that ``torch.compile`` can trace without a graph
break, :func:`grouped_round` calls it per group of clients with the same batch size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fl_lightning.algorithms.base import Algorithm, LocalContext, Params
from fl_lightning.engines.base import compile_step, sgd_update
from fl_lightning.engines.sequential import batch_statistics_only, running_stats_step
from fl_lightning.engines.stacked import (
    PaddedRound,
    StackedState,
    groups_at,
    match_layout,
    stack_batches,
    to_channels_last,
)
from fl_lightning.engines.tails import finish_tails, tail_start

if TYPE_CHECKING:  # the plan types import the engines
    from fl_lightning.engine import RoundPlan
    from fl_lightning.engines.batched import BatchedEngine

__all__ = ["build_directions", "grouped_round", "padded_round", "task_gradient_only"]

#: ``directions(params, batched state, x, y, ctx, state) -> (directions, losses)``
Directions = Callable[..., tuple[Params, Tensor]]


def task_gradient_only(algorithm: Algorithm, compile_mode: str, state: StackedState) -> bool:
    """Whether the step may take the fast path: the direction is the plain task gradient (the
    algorithm declares :attr:`~fl_lightning.algorithms.base.Algorithm.plain_gradient`), nothing
    is compiled and no client state is vmapped."""
    return algorithm.plain_gradient and compile_mode == "none" and not state.batched


def build_directions(algorithm: Algorithm, randomness: str, fast: bool) -> Directions:
    """The vmapped local direction of every client: ``directions(params, batched, x, y, ctx,
    state) -> (directions, losses)`` with ``(K, ...)`` params, the batched state rows, ``(K,
    B, ...)`` inputs and ``(K, B)`` labels.

    With ``fast`` (:func:`task_gradient_only`) only the loss is vmapped and every client's
    gradient comes from one ordinary backward of the sum of the ``K`` losses (client ``k``'s
    weights reach only loss ``k``, so the gradient w.r.t. them is that of loss ``k``).
    Otherwise ``direction`` runs under ``torch.vmap`` with ``ctx.state`` set to the client's
    rows of the stacked state for the call (restored afterwards: nothing vmapped stays behind).
    """

    def one(params: Params, batched: tuple[Tensor, ...], x: Tensor, y: Tensor,
            ctx: LocalContext, state: StackedState):
        saved = ctx.state
        ctx.state = state.unpack(batched)
        try:
            return algorithm.direction(params, x, y, ctx)
        finally:
            ctx.state = saved

    def directions(params: Params, batched: tuple[Tensor, ...], x: Tensor, y: Tensor,
                   ctx: LocalContext, state: StackedState) -> tuple[Params, Tensor]:
        if fast:
            keys = list(params)
            leaves = [params[k].detach().requires_grad_(True) for k in keys]
            loss = torch.vmap(lambda p, xb, yb: algorithm.task_loss(ctx, p, xb, yb),
                              randomness=randomness)(dict(zip(keys, leaves, strict=True)), x, y)
            grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
            return {k: (g if g is not None else torch.zeros_like(v))
                    for k, g, v in zip(keys, grads, leaves, strict=True)}, loss.detach()
        fn = torch.vmap(lambda p, b, xb, yb: one(p, b, xb, yb, ctx, state),
                        in_dims=(0, 0, 0, 0), randomness=randomness)
        return fn(params, batched, x, y)

    return directions


def _padded_step(engine: BatchedEngine, directions: Directions, names: list[str],
                 momentum: float, weight_decay: float):
    """``step(stacked, values, bufs, batched state, ctx, state, x, idx, y, augment, draws,
    active, lr_t, lr_eager) -> (values, bufs, losses)``: gather the step's batches (rows
    ``idx`` of ``x``), augment them, take every client's direction and the SGD update, masked
    to the clients that have this step (``active``; ``None``: everyone; eager, with ``lr_eager``
    given, that update is in place)."""
    autocast = engine.autocast == "bf16"
    channels_last = engine.channels_last

    def step(stacked, values, bufs, batched, ctx, state, x, idx, y, augment, draws,
             active, lr_t, lr_eager=None):
        if idx is not None:  # one row gather (index_select: ~6x x[idx] on the CPU)
            x = x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])
        if augment is not None:
            x = augment(x.flatten(0, 1), draws.flatten(0, 1)).view(x.shape)
        if channels_last:
            x = to_channels_last(x)
        params = dict(stacked)
        params.update(zip(names, values, strict=True))
        with torch.enable_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16,
                                                 enabled=autocast):
            direction, loss = directions(params, batched, x, y, ctx, state)
        with torch.no_grad():
            # eager and every client steps: the sequential engine's in-place update on the
            # stacked rows (no new K x parameter tensors: ~2x less memory traffic on the CPU)
            lr = lr_eager if lr_eager is not None and active is None else lr_t
            new_values, new_bufs = sgd_update(values, [direction[k] for k in names], bufs, lr,
                                              momentum, weight_decay, active)
            loss = loss.detach().to(lr_t.dtype)
            if active is not None:
                loss = torch.where(active, loss, torch.zeros_like(loss))
        return new_values, new_bufs, loss

    return step


def local_step(engine: BatchedEngine, algorithm: Algorithm, net: nn.Module, names: list[str],
               momentum: float, weight_decay: float, fast: bool):
    """The padded round's whole local step (:func:`_padded_step`), compiled (``fullgraph``: no
    graph break) when the engine's ``compile`` is set, once per engine, algorithm, network and
    SGD configuration, and reused by every later round."""
    key = (id(algorithm), id(net), tuple(names), momentum, weight_decay, fast)
    if key in engine._compiled:  # the entry holds the algorithm and net: ids stay theirs
        return engine._compiled[key]
    engine._compiled.clear()
    directions = build_directions(algorithm, engine.randomness, fast)
    step = compile_step(_padded_step(engine, directions, names, momentum, weight_decay),
                        engine.compile, engine.compile_backend, fullgraph=True)
    engine._compiled[key] = step
    return step


def padded_round(
    engine: BatchedEngine, algorithm: Algorithm, net: nn.Module, ctx: LocalContext,
    state: StackedState, stacked: Params, names: list[str], plan: RoundPlan,
    data: tuple[Tensor, Tensor], lr: float, momentum: float, weight_decay: float,
) -> Tensor | None:
    """The round as one vmapped call per local step on padded, masked batches; updates
    ``stacked`` in place and returns every client's sum of step losses."""
    x_all, y_all = data
    device = next(iter(stacked.values())).device
    compiled = engine.compile != "none"
    # the lock-step stops where at most engine.tail_rows clients are left (eager only: a
    # compiled step is cheap per call); they finish as plain steps (engines/tails.py), so the
    # padded plan is built for the lock-step's steps only (the largest client of a round can
    # have 75,740 steps x 80 rows: most of the padded tensors would serve the tail)
    most = max(len(c.batches) for c in plan.clients)
    stop = most if compiled else min(most, tail_start(plan, engine.tail_rows_on(
        device, len(plan.clients))))
    padded = PaddedRound.build(plan, y_all, device, stop)
    if padded.steps == 0 and stop >= most:
        return None
    ctx.padded = True
    ctx.head_names()  # cached before any trace, so a compiled step never sees it change
    augment = padded.augment
    generic = plan.transform if augment is None else None  # any pure transform
    fast = task_gradient_only(algorithm, engine.compile, state)
    step = local_step(engine, algorithm, net, names, momentum, weight_decay, fast)
    if augment is not None and compiled:
        # one sample augmented eagerly fills the augmentation's per-shape caches, so the
        # compiled step never traces (and guards on) a cache miss
        augment(x_all[padded.index[0, 0, :1]], padded.draws[0, 0, :1])
    bufs = [torch.zeros_like(stacked[k]) for k in names] if momentum != 0.0 else None
    lr_eager = None if compiled else lr  # a Python float would specialize a compiled step
    sums = None
    values = [stacked[k] for k in names]
    for s in range(padded.steps):
        ctx.step = s
        masked = compiled or not padded.everyone[s]
        if generic is not None:  # gathered and augmented per client, outside the step
            x, idx = padded.transform_generic(generic, x_all, s), None
        else:
            x, idx = x_all, padded.index[s]
        values, bufs, loss = step(
            stacked, values, bufs, state.batched, ctx, state, x, idx, padded.labels[s],
            augment, None if padded.draws is None else padded.draws[s],
            padded.active[s] if masked else None, ctx.lr, lr_eager,
        )
        stacked.update(zip(names, values, strict=True))
        sums = loss if sums is None else sums + loss
    if stop < most:
        sums = finish_tails(algorithm, ctx, state, stacked, bufs, names, plan, data, stop, lr,
                            momentum, weight_decay, sums)
    return sums


def grouped_round(
    engine: BatchedEngine, algorithm: Algorithm, net: nn.Module, ctx: LocalContext,
    state: StackedState, stacked: Params, stats: Params, norms: list[nn.Module],
    names: list[str], plan: RoundPlan, data: tuple[Tensor, Tensor], lr: float,
    momentum: float, weight_decay: float,
) -> Tensor | None:
    """Models with BatchNorm: one vmapped call per local step and batch size (a padding
    sample would enter the batch statistics); the rows of the clients of each group are
    gathered, stepped and written back. Returns every client's sum of step losses."""
    clients = plan.clients
    x_all, y_all = data
    count = len(clients)
    bufs = [torch.zeros_like(stacked[k]) for k in names] if momentum != 0.0 else None
    directions = compile_step(
        build_directions(algorithm, engine.randomness,
                         task_gradient_only(algorithm, engine.compile, state)),
        engine.compile, engine.compile_backend,
    )
    stats_fn = torch.vmap(lambda p, b, x: running_stats_step(net, p, b, x), in_dims=(0, 0, 0),
                          randomness=engine.randomness)
    device = next(iter(stacked.values())).device
    rows: dict[tuple[int, ...], Tensor] = {}  # the index tensor of each set of rows, once
    group = _Group(directions, stats_fn, norms, stacked, bufs, stats, names, state, ctx, count)
    for step in range(max(len(c.batches) for c in clients)):
        ctx.step = step
        for members in groups_at(clients, step):
            sel = None
            if len(members) != count:
                key = tuple(members)
                if key not in rows:
                    rows[key] = torch.tensor(members, device=device)
                sel = rows[key]
            x, y = stack_batches(clients, members, step, x_all, y_all, plan)
            if engine.channels_last:
                x = to_channels_last(x)
            with torch.autocast(x.device.type, dtype=torch.bfloat16,
                                enabled=engine.autocast == "bf16"):
                group.update(sel, x, y, lr, momentum, weight_decay, step)
    return group.losses


class _Group:
    """The grouped round's stacked weights, momentum buffers, running statistics and loss sums,
    and the update of one group of clients at one step."""

    def __init__(self, directions: Directions, stats_fn: Callable[..., Params],
                 norms: list[nn.Module], stacked: Params, bufs: list[Tensor] | None,
                 stats: Params, names: list[str], state: StackedState, ctx: LocalContext,
                 count: int) -> None:
        self.directions, self.stats_fn, self.norms = directions, stats_fn, norms
        self.stacked, self.bufs, self.stats, self.names = stacked, bufs, stats, names
        self.state, self.ctx, self.count = state, ctx, count
        self.losses: Tensor | None = None

    @torch.no_grad()
    def update(self, sel: Tensor | None, x: Tensor, y: Tensor, lr: float, momentum: float,
               weight_decay: float, step: int) -> None:
        """One local step of the clients in rows ``sel`` (``None``: every client)."""
        everyone = sel is None
        stacked, bufs, stats, names = self.stacked, self.bufs, self.stats, self.names
        params = stacked if everyone else {k: v[sel] for k, v in stacked.items()}
        batched = self.state.batched if everyone else tuple(s[sel] for s in self.state.batched)
        with torch.enable_grad(), batch_statistics_only(self.norms):
            direction, loss = self.directions(params, batched, x, y, self.ctx, self.state)
        if stats:  # each client's running statistics, at the weights the step started from
            new = self.stats_fn(params, stats if everyone else
                                {k: v[sel] for k, v in stats.items()}, x)
            for k, v in new.items():
                if everyone:
                    stats[k].copy_(v)
                else:
                    stats[k][sel] = v
        if everyone:
            match_layout(stacked, bufs, names, direction)
            params = stacked
        values = [params[k] for k in names]
        active = None
        if bufs is not None and step > 0:  # every client takes its first step at step 0
            active = bufs if everyone else [b[sel] for b in bufs]
        _, new_bufs = sgd_update(values, [direction[k] for k in names], active, lr, momentum,
                                 weight_decay)
        if bufs is not None and (step == 0 or not everyone):
            for b, part in zip(bufs, new_bufs, strict=True):
                if everyone:
                    b.copy_(part)
                else:
                    b[sel] = part
        if not everyone:
            for k, part in zip(names, values, strict=True):
                stacked[k][sel] = part
        self._add_losses(loss.detach(), sel)

    def _add_losses(self, loss: Tensor, sel: Tensor | None) -> None:
        if self.losses is None:
            self.losses = loss.new_zeros(self.count)
        if sel is None:
            self.losses.add_(loss)
        else:
            self.losses.index_add_(0, sel, loss)
