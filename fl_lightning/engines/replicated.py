"""Training the planned clients of several replicas (runs trained together in one process) in
one call: the train phase of R :class:`~fl_lightning.round.FederatedRound` s in lock-step.

With the :class:`~fl_lightning.engines.BatchedEngine`, the replicas whose local step is the
same computation (same algorithm settings, same local optimizer this round) are trained in one
vmapped call over ``replicas x clients``: every client's row starts from its own replica's
global weights, reads its own replica's training data (the distinct training sets are
concatenated once and each replica's batch indices shifted), and sees its own replica's
global weights as ``ctx.global_params`` inside the step (they travel as a per-row entry of the
stacked client state). Each replica's algorithm runs ``client_begin`` / ``client_end`` on its
own clients, so client state stays per replica. Any other engine (the sequential one, Flower)
and any replica that is alone in its group trains with the round's own ``train`` phase.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext, Params
from fl_lightning.engines.batched import BatchedEngine, _stack
from fl_lightning.engines.sequential import tracked_batchnorms
from fl_lightning.engines.stacked import StackedState, device_of, float_dtype, mixes_samples
from fl_lightning.engines.vmapped import grouped_round, padded_round
from fl_lightning.protocol import RoundPlan

if TYPE_CHECKING:
    from fl_lightning.round import FederatedRound, RoundState

__all__ = ["GLOBAL_KEY", "train_replicas"]

#: the per-row entry of the stacked client state that carries the replica's global weights
GLOBAL_KEY = "__replica_global__"

Item = tuple["FederatedRound", "RoundState"]


def train_replicas(items: Sequence[Item], key: Callable[[int], Hashable]) -> None:
    """The train phase of every ``(round, state)`` in ``items`` (one per live replica).

    ``key(i)`` names what makes item ``i``'s local step a different computation from another's
    (the replica's algorithm settings); items with equal keys and the same local optimizer
    are trained in one vmapped call when their engine is a ``BatchedEngine``; the others run
    their round's own ``train``.
    """
    groups: dict[Hashable, list[Item]] = {}
    for i, (rnd, state) in enumerate(items):
        if not _joinable(rnd, state):
            rnd.train(state)
            continue
        groups.setdefault((key(i), state.optim, state.plan.round), []).append((rnd, state))
    for group in groups.values():
        if len(group) == 1:
            group[0][0].train(group[0][1])
        else:
            _train_together(group)


def _joinable(rnd: FederatedRound, state: RoundState) -> bool:
    ctx = rnd.context
    return (
        isinstance(ctx.engine, BatchedEngine) and state.shares is None
        and state.plan.transform is None and bool(state.plan.clients)
        and all(c.lrs is None for c in state.plan.clients)
    )


class _RowGlobals:
    """The group's algorithm with ``ctx.global_params`` read from the client's row of the
    stacked state (its replica's global weights) for the duration of ``direction``."""

    def __init__(self, algorithm: Algorithm) -> None:
        self.inner = algorithm

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def direction(self, params: Params, x: Tensor, y: Tensor,
                  ctx: LocalContext) -> tuple[Params, Tensor]:
        state, saved = ctx.state, ctx.global_params
        ctx.global_params = state[GLOBAL_KEY]
        ctx.state = {k: v for k, v in state.items() if k != GLOBAL_KEY}
        try:
            return self.inner.direction(params, x, y, ctx)
        finally:
            ctx.state, ctx.global_params = state, saved


#: one proxy per algorithm object, so the batched engine's compiled-step cache (keyed on the
#: algorithm's id) is hit in every round
_PROXIES: dict[int, _RowGlobals] = {}


def _proxy(algorithm: Algorithm) -> _RowGlobals:
    proxy = _PROXIES.get(id(algorithm))
    if proxy is None or proxy.inner is not algorithm:
        _PROXIES.clear()
        proxy = _PROXIES[id(algorithm)] = _RowGlobals(algorithm)
    return proxy


#: the concatenated training sets of the last group (keyed on the tensors' identities)
_DATA: dict[tuple, tuple[Tensor, Tensor, list[int]]] = {}


def _joint_data(datas: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, list[int]]:
    """One training set holding every distinct one of ``datas`` and each item's row offset."""
    distinct: list[tuple[Tensor, Tensor]] = []
    where: list[int] = []
    for x, y in datas:
        for j, (dx, dy) in enumerate(distinct):
            if dx is x and dy is y:
                where.append(j)
                break
        else:
            where.append(len(distinct))
            distinct.append((x, y))
    if len(distinct) == 1:
        x, y = distinct[0]
        return x, y, [0] * len(datas)
    key = tuple((id(x), id(y)) for x, y in distinct)
    if key not in _DATA:
        _DATA.clear()
        starts = [0]
        for x, _ in distinct[:-1]:
            starts.append(starts[-1] + len(x))
        _DATA[key] = (torch.cat([x for x, _ in distinct]), torch.cat([y for _, y in distinct]),
                      starts)
    x, y, starts = _DATA[key]
    return x, y, [starts[j] for j in where]


def _train_together(group: list[Item]) -> None:
    """One vmapped local training of the planned clients of every replica in ``group``."""
    rounds = [rnd for rnd, _ in group]
    states = [state for _, state in group]
    first = rounds[0].context
    opt = states[0].optim
    datas = []
    for rnd, state in group:
        ctx = rnd.context
        data = ctx.source.train_tensors(ctx.device, ctx.dtype)
        if state.systems is not None:
            data = ctx.systems.training_data(data, ctx.source.client_indices, ctx.source.seed,
                                             ctx.num_classes)
        datas.append(data)
    x_all, y_all, offsets = _joint_data(datas)
    contexts, clients, owners = [], [], []
    for j, (rnd, state) in enumerate(group):
        algorithm = rnd.context.algorithm
        for c in state.plan.clients:
            ctx = LocalContext(
                net=rnd.context.net, global_params=state.global_before, buffers=state.buffers,
                round=state.plan.round, client_id=c.client_id, lr=opt.lr,
                momentum=opt.momentum, num_clients=state.plan.num_clients,
                total_samples=state.plan.total_samples,
            )
            algorithm.client_begin(ctx)
            contexts.append(ctx)
            owners.append(j)
            shift = offsets[j]
            clients.append(c if not shift else dataclasses.replace(
                c, batches=[b + shift for b in c.batches]))
    algorithm = first.algorithm
    needs_global = not algorithm.plain_gradient
    rows = [dict(c.state, **{GLOBAL_KEY: states[j].global_before}) if needs_global
            else c.state for c, j in zip(contexts, owners, strict=True)]
    per_client = (*algorithm.client_state, GLOBAL_KEY) if needs_global \
        else tuple(algorithm.client_state)
    stacked_state = StackedState(rows, per_client)
    shared = LocalContext(
        net=first.net, global_params=states[0].global_before, buffers=states[0].buffers,
        round=states[0].plan.round, client_id=-1, lr=opt.lr, momentum=opt.momentum,
    )
    frozen = algorithm.frozen(shared)
    names = [k for k in states[0].global_before if k not in frozen]
    stacked = _cat([_stack(s.global_before, len(s.plan.clients)) for s in states])
    shared.lr = torch.tensor(opt.lr, dtype=float_dtype(stacked), device=device_of(stacked))
    plan = RoundPlan(round=states[0].plan.round, clients=clients)
    engine: BatchedEngine = first.engine
    runner = _proxy(algorithm) if needs_global else algorithm
    norms = tracked_batchnorms(first.net)
    stats = _cat([_stack(s.buffers, len(s.plan.clients)) for s in states]) if norms else {}
    with engine.device_options():
        if mixes_samples(first.net):
            sums = grouped_round(engine, runner, first.net, shared, stacked_state, stacked, stats,
                                 norms, names, plan, (x_all, y_all), opt.lr, opt.momentum,
                                 opt.weight_decay)
        else:
            sums = padded_round(engine, runner, first.net, shared, stacked_state, stacked, names,
                                plan, (x_all, y_all), opt.lr, opt.momentum, opt.weight_decay)
    _hand_back(group, contexts, owners, stacked, stats, sums)


def _cat(parts: list[Params]) -> Params:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _hand_back(group: list[Item], contexts: list[LocalContext], owners: list[int],
               stacked: Params, stats: Params, sums: Tensor | None) -> None:
    """Each replica's :class:`ClientResult` s (its rows, after its algorithm's
    ``client_end``), set as its state's results."""
    results: list[list[ClientResult]] = [[] for _ in group]
    row = 0
    for j, (rnd, state) in enumerate(group):
        for client in state.plan.clients:
            steps = len(client.batches)
            loss = (sums[row] / max(steps, 1) if sums is not None and steps
                    else torch.full((), float("nan")))
            result = ClientResult(
                client_id=client.client_id, num_samples=client.num_samples,
                params={k: v[row].contiguous() for k, v in stacked.items()},
                num_steps=steps, loss=loss, buffers={k: v[row] for k, v in stats.items()},
            )
            assert owners[row] == j
            rnd.context.algorithm.client_end(contexts[row], result)
            results[j].append(result)
            row += 1
        state.results, state.lost = results[j], []
