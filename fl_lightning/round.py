"""``FederatedRound``: one communication round, written once for ``fit``, DDP and Flower.

A round has five named phases, each a method that reads and writes one :class:`RoundState`:

1. :meth:`FederatedRound.plan`: the source (the data module) samples the round's clients and
   the batches each one trains on (pure functions of the seed, the round and the client); the
   systems mechanisms drop and slow clients; under DDP this rank keeps its share;
2. :meth:`FederatedRound.train`: the client engine trains the planned clients from the global
   weights and returns one :class:`~fl_lightning.protocol.ClientResult` per client (a client
   it got no result from, e.g. a lost Flower node, is a participation dropout); under DDP an
   all-gather gives every rank every client's result when the round needs them all;
3. :meth:`FederatedRound.screen`: clients whose weights or loss are not finite are handled by
   the ``on_nonfinite`` policy (:func:`screen_nonfinite`);
4. :meth:`FederatedRound.combine`: the one entry point that turns the kept results into the
   aggregate: DDP's one all-reduce of every rank's sums, the systems pipeline, or the
   algorithm's own server rule (after committing each kept client's new state);
5. :meth:`FederatedRound.publish`: the server update on ``w_global - aggregate``, the BatchNorm
   statistics, the :class:`~fl_lightning.protocol.RoundResult` and the ``on_round_end`` hooks.

The round reads nothing of Lightning: what it needs is handed over once as a
:class:`RoundContext` (``FederatedModule`` builds it; the Flower ServerApp builds the same one
with :class:`~fl_lightning.flower.FlowerEngine` as the engine).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from fl_lightning.algorithms.base import Algorithm, finish_round
from fl_lightning.distributed import (
    allgather_results,
    local_plan,
    owner_shares,
    rank_shares,
    reduce_round,
)
from fl_lightning.engine import ClientEngine, average_buffers, stack_losses
from fl_lightning.nonfinite import DivergenceError, finite_flags, screen_nonfinite
from fl_lightning.protocol import (
    ClientResult,
    GatherCost,
    LocalOptim,
    Params,
    RoundPlan,
    RoundResult,
    RoundSystems,
)
from fl_lightning.sharding import shard_stores
from fl_lightning.stream import ResultSink, accepts_sink
from fl_lightning.systems import Systems

__all__ = [
    "DivergenceError",
    "FederatedRound",
    "RoundContext",
    "RoundSource",
    "RoundState",
    "finite_flags",
    "screen_nonfinite",
]


class RoundSource(Protocol):
    """What the plan and train phases read of the population and its data.

    :class:`~fl_lightning.data.module.FederatedDataModule` is one; on a Flower server, where no
    training data exists, :class:`~fl_lightning.flower.NodePopulation` is another.

    Optional (looked up with ``getattr``; a source without them is read eagerly):
    ``round_tensors(plan, device, dtype) -> (x, y) | None``, the training data of ``plan``'s
    round only (its sampled clients; the plan's batch indices point into it; ``None``: use
    :meth:`train_tensors`), with ``round_client_indices()``, the ``client_indices`` of that
    data (one entry per client of the population, empty for the clients not in the round).
    The data module's lazy path (LEAF files, the synthetic population) has them.
    """

    num_clients: int
    seed: int

    def round_plan(
        self, round_idx: int, clients_per_round: int, local_epochs: int, batch_size: int,
        device: torch.device | str | None = None,
    ) -> RoundPlan:
        """The sampled clients of round ``round_idx`` and their per-step batches."""
        ...

    def train_tensors(
        self, device: torch.device | str, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor] | None:
        """The training set ``(x, y)`` on ``device`` (``None``: not on this process).

        A source that returns tensors also has ``client_indices`` (one index tensor per
        client), which data-level attacks read."""
        ...


@dataclass
class RoundContext:
    """Everything a round needs, handed over once.

    Attributes:
        source: the population and its data (:class:`RoundSource`).
        algorithm: the federated algorithm (local direction, client state, server rule).
        engine: the client engine that trains the planned clients.
        net: the global model (its parameters are the global weights).
        server_update: steps the server optimizer on ``w - aggregate`` for an aggregate.
        local_optim: the local optimizer of a round, from the round's index.
        clients_per_round: clients sampled per round.
        local_epochs: passes over its data each client makes.
        batch_size: the local mini-batch size.
        num_classes: classes of the task (label-flipping attacks).
        device: where the round plan, the training data and gathered results live.
        dtype: the training data's floating dtype.
        systems: the systems mechanisms (inactive by default).
        on_nonfinite: ``raise`` or ``skip_client`` (:func:`screen_nonfinite`).
        world_size: DDP processes (1: one process).
        rank: this process's DDP rank.
        needs_client_results: a callback reads every client's result (under DDP every rank
            then receives all of them).
        on_round_end: called with the round's result after the server update (the callbacks'
            ``on_round_end`` hooks).
    """

    source: RoundSource
    algorithm: Algorithm
    engine: ClientEngine
    net: nn.Module
    server_update: Callable[[Params], None]
    local_optim: Callable[[int], LocalOptim]
    clients_per_round: int
    local_epochs: int
    batch_size: int
    num_classes: int
    device: torch.device
    dtype: torch.dtype
    systems: Systems = field(default_factory=Systems)
    on_nonfinite: Literal["raise", "skip_client"] = "raise"
    world_size: int = 1
    rank: int = 0
    needs_client_results: bool = False
    on_round_end: Callable[[RoundResult], None] | None = None


@dataclass
class RoundState:
    """One round as it goes through the phases (each phase fills its part).

    Attributes:
        round: index of the round, from 0.
        optim: the round's local optimizer.
        plan: the clients this process trains (after dropouts; under DDP this rank's share).
        sampled: ``(client_id, num_samples)`` of every sampled client, before dropouts.
        systems: the systems record of the round (``None`` without systems mechanisms).
        shares: under DDP, the plan positions each rank trains (``None``: one process).
        reduce: the round combines by one DDP all-reduce of every rank's sums.
        global_before: the global weights sent to the clients.
        buffers: the global model's buffers.
        results: the clients' results (after screen: the kept ones).
        lost: planned clients the engine got no result from (dropouts).
        finite: whether each result's weights and loss are finite.
        skipped: ids of clients left out by the ``on_nonfinite`` policy.
        aggregate: the combined weights (``None``: no client reported, no server step).
        train_loss: mean training loss of the kept clients (``None``: not known yet).
        gather_cost: what DDP moved (all-gather or all-reduce; ``None``: one process).
        stream: the results are folded as they finish (:meth:`FederatedRound.streams`).
        sink: the streamed round's :class:`~fl_lightning.stream.ResultSink` (``None``: the
            round holds every result).
    """

    round: int
    optim: LocalOptim
    plan: RoundPlan
    sampled: list[tuple[int, int]]
    systems: RoundSystems | None
    shares: list[list[int]] | None
    reduce: bool
    global_before: Params
    buffers: Params
    results: list[ClientResult] = field(default_factory=list)
    lost: list[int] = field(default_factory=list)
    finite: list[bool] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    aggregate: Params | None = None
    train_loss: Tensor | None = None
    gather_cost: GatherCost | None = None
    stream: bool = False
    sink: ResultSink | None = None


class FederatedRound:
    """Runs communication rounds: ``plan -> train -> screen -> combine -> publish``.

    Args:
        context: what every round needs (:class:`RoundContext`).

    Example:
        >>> from fl_lightning.module import FederatedModule
        >>> from fl_lightning.data.module import FederatedDataModule
        >>> dm = FederatedDataModule(dataset="digits", num_clients=4)
        >>> module = FederatedModule(num_classes=10, input_shape=(1, 8, 8)).attach(dm)
        >>> module.round.needs_all_results()
        False
    """

    def __init__(self, context: RoundContext) -> None:
        self.context = context
        #: DDP, reduced, with client state: each client's is held (and trained) by one rank
        self.owns_state = (context.world_size > 1 and bool(context.algorithm.client_state)
                           and not self.needs_all_results())
        if self.owns_state:  # its owner (distributed.owner); checkpoints merge every rank's
            shard_stores(context.algorithm, context.rank, context.world_size)

    def needs_all_results(self) -> bool:
        """Whether, under DDP, every rank needs every client's result (all-gather; every rank
        commits every client's state): a systems mechanism, a callback with
        ``needs_client_results``, or a server rule not written as sums. Otherwise each rank
        folds its clients and one all-reduce adds the sums (``docs/scale.md``)."""
        ctx = self.context
        return (ctx.systems.active or ctx.needs_client_results
                or not getattr(ctx.algorithm, "streamed", False))

    def streams(self) -> bool:
        """Whether the round folds each client's result as it finishes (``O(model)`` memory,
        :mod:`fl_lightning.stream`): a server rule written as sums, no systems mechanism that
        acts on each update (participation alone streams; under DDP none), no callback with
        ``needs_client_results``."""
        ctx = self.context
        if ctx.world_size > 1:  # DDP: this rank's clients stream into the sums it reduces
            return not self.needs_all_results()
        return (
            not ctx.needs_client_results and getattr(ctx.algorithm, "streamed", False)
            and not ctx.systems.needs_all_updates
        )

    def run(self, round_idx: int) -> RoundResult:
        """One communication round; returns what it produced (also given to the hooks)."""
        state = self.plan(round_idx)
        self.train(state)
        self.screen(state)
        self.combine(state)
        return self.publish(state)

    # ------------------------------------------------------------------ phases
    def plan(self, round_idx: int) -> RoundState:
        """Sample and plan the round; apply dropouts and stragglers; keep this rank's share.

        Reads the source, the systems mechanisms, the world size and rank, the global model;
        writes ``optim``, ``plan``, ``sampled``, ``systems``, ``shares``, ``reduce``,
        ``global_before`` and ``buffers``.
        """
        ctx = self.context
        plan = ctx.source.round_plan(
            round_idx, ctx.clients_per_round, ctx.local_epochs, ctx.batch_size, ctx.device
        )
        sampled = [(c.client_id, c.num_samples) for c in plan.clients]
        info = None
        if ctx.systems.active:
            plan, info = ctx.systems.begin_round(plan, ctx.source.seed, ctx.clients_per_round)
            plan = _mark_stragglers(plan, info, ctx.systems)
        split = owner_shares if self.owns_state else rank_shares  # held state, or balanced
        shares = split(plan, ctx.world_size) if ctx.world_size > 1 else None
        if shares is not None:  # DDP: this rank trains its share of the clients
            plan = local_plan(plan, ctx.rank, ctx.world_size, shares)
        return RoundState(
            round=round_idx, optim=ctx.local_optim(round_idx), plan=plan, sampled=sampled,
            systems=info, shares=shares,
            reduce=shares is not None and not self.needs_all_results(),
            stream=self.streams(),
            global_before={k: p.detach().clone() for k, p in ctx.net.named_parameters()},
            buffers={k: b.detach() for k, b in ctx.net.named_buffers()},
        )

    def train(self, state: RoundState) -> None:
        """Train the planned clients with the engine; collect every rank's results if needed.

        Reads ``plan``, ``optim``, ``global_before``, ``buffers``, the training data; writes
        ``results``, ``lost`` (recorded as dropouts) and ``gather_cost``. A streamed round
        (``stream``) gives the engine a :class:`~fl_lightning.stream.ResultSink` (or folds the
        list of an engine without one): each result is screened, committed and folded as it
        finishes, and ``results`` holds only their light part (id, size, steps, loss).
        """
        ctx = self.context
        lazy = getattr(ctx.source, "round_tensors", None)
        data = lazy(state.plan, ctx.device, ctx.dtype) if lazy is not None else None
        if data is not None:  # the round's clients only: their indices into this data
            indices = ctx.source.round_client_indices()
        else:
            data = ctx.source.train_tensors(ctx.device, ctx.dtype)
            indices = getattr(ctx.source, "client_indices", ())
        if data is not None and state.systems is not None:
            data = ctx.systems.training_data(data, indices, ctx.source.seed, ctx.num_classes)
        opt = state.optim
        args = (ctx.algorithm, ctx.net, state.global_before, state.buffers, state.plan, data,
                opt.lr, opt.momentum, opt.weight_decay)
        if state.stream and accepts_sink(ctx.engine):
            state.sink = self._sink(state)
            ctx.engine.run_round(*args, sink=state.sink)
            results = []
        else:
            results = ctx.engine.run_round(*args)
        if state.stream and state.sink is None:  # an engine that returns a list: fold it now
            state.sink = self._sink(state)
            state.sink(results)
        self._lost(state, state.sink.seen if state.sink is not None
                   else [r.client_id for r in results])
        if state.lost and state.shares is not None:
            raise RuntimeError(
                f"the engine returned no result for clients {state.lost} under DDP: every rank "
                "must report every client of its share"
            )
        if state.sink is not None:
            state.results = state.sink.kept
            return
        if state.shares is not None:  # every rank gets every result, in plan order: the rest
            # is the one-process round on every rank (each then holds the full state store)
            results, state.gather_cost = allgather_results(results, state.shares, ctx.device)
        state.results = results

    def screen(self, state: RoundState) -> None:
        """Apply the ``on_nonfinite`` policy (:func:`screen_nonfinite`) to the results.

        Reads ``results``; writes ``finite``, and ``results`` (the kept ones) and ``skipped``.
        Under a DDP all-reduce the decision needs every rank's counts, which come with the
        combine's one all-reduce: it is taken there, with the same policy.
        """
        if state.sink is not None:  # non-finite clients were left out as they came
            sink = state.sink
            state.finite, state.results, state.skipped = sink.finite, sink.kept, sink.skipped
            if state.reduce:  # the policy needs every rank's counts: taken in combine
                return
            skip = self.context.on_nonfinite == "skip_client"
            if sink.first_bad is not None and not (skip and sink.kept):
                # raise: the first non-finite client; skip_client: every one diverged
                self._screen_batch([sink.first_bad], [False], state.round,
                                   len(sink.finite) if skip else None)
            return
        state.finite = finite_flags(state.results)
        state.results, state.skipped = self._screen(state)

    def combine(self, state: RoundState) -> None:
        """The one entry point from the kept results to the aggregate.

        DDP reduce: one all-reduce gives every rank the same sums, loss and counts (then the
        screen's decision and ``finish``). Systems mechanisms: the kept clients' state is
        committed and the pipeline combines their (attacked, compressed, clipped, masked)
        updates. Otherwise the algorithm's server rule (streamed: ``finish``). Reads
        ``results``, ``systems``, ``plan``; writes ``aggregate`` (``None`` when no client
        reported) and, under DDP, ``train_loss``.
        """
        ctx = self.context
        if state.reduce:  # every rank's sums and counts, the same policy decision, finish
            state.aggregate, state.train_loss, state.gather_cost = reduce_round(
                ctx.algorithm, state.sink, state.global_before, ctx.device, partial(
                    screen_nonfinite, round_idx=state.round, on_nonfinite=ctx.on_nonfinite,
                    local_lr=ctx.local_optim(0).lr))
            return
        if not state.results:  # every planned client was lost: no server step this round
            return
        if state.sink is not None:  # folded as they finished: only the sums remain
            state.aggregate = ctx.algorithm.finish(state.sink.sums, state.global_before)
            if state.systems is not None:  # participation only: log what a list round logs
                ctx.systems.log_streamed(state.systems, state.results, state.global_before)
            return
        if state.systems is not None:
            # only the kept clients' new state is committed: a skipped client leaves no trace
            for r in state.results:
                ctx.algorithm.commit_client(r)
            state.aggregate = ctx.systems.aggregate(
                ctx.algorithm, state.global_before, state.results, state.systems,
                ctx.source.num_clients, state.plan.total_samples,
            )
        else:
            state.aggregate = finish_round(
                ctx.algorithm, state.global_before, state.results,
                num_clients=state.plan.num_clients, total_samples=state.plan.total_samples,
            )

    def publish(self, state: RoundState) -> RoundResult:
        """Step the server, set the BatchNorm statistics, build and announce the result.

        Reads ``aggregate`` and ``results``; calls the context's ``server_update`` and
        ``on_round_end``.
        """
        ctx = self.context
        if state.aggregate is not None:
            ctx.server_update(state.aggregate)
        if state.sink is not None:  # BatchNorm running statistics, per client
            state.sink.set_buffers(ctx.net)
        else:
            average_buffers(ctx.net, state.results)
        global_after = {k: p.detach().clone() for k, p in ctx.net.named_parameters()}
        if state.train_loss is not None:
            loss = state.train_loss
        elif state.results:
            loss = stack_losses(state.results)
        else:
            loss = torch.full((), float("nan"))
        info = state.systems
        result = RoundResult(
            round=state.round,
            lr=state.optim.lr,
            client_ids=[r.client_id for r in state.results],
            client_sizes=[r.num_samples for r in state.results],
            clients=state.results,
            global_before=state.global_before,
            aggregate=state.global_before if state.aggregate is None else state.aggregate,
            global_after=global_after,
            train_loss=loss,
            skipped_clients=state.skipped,
            systems=info.metrics if info is not None else {},
            sampled=state.sampled,
            stragglers=list(info.stragglers) if info is not None else [],
            dropped=list(info.dropped) if info is not None else list(state.lost),
            gather_cost=state.gather_cost,
        )
        if ctx.on_round_end is not None:
            ctx.on_round_end(result)
        return result

    def _lost(self, state: RoundState, reported: Sequence[int]) -> None:
        """Record the planned clients the engine gave no result for as dropouts."""
        seen = set(reported)
        state.lost = [c.client_id for c in state.plan.clients if c.client_id not in seen]
        if state.systems is not None:
            state.systems.dropped.extend(state.lost)

    def _sink(self, state: RoundState) -> ResultSink:
        """The streamed round's sink: the algorithm's sums; non-finite clients are left out as
        they come, and :meth:`screen` applies the ``on_nonfinite`` policy at the end (``raise``
        names the first one, ``skip_client`` stops if every client diverged)."""
        ctx, plan = self.context, state.plan
        sums = ctx.algorithm.begin_sums(state.global_before, num_clients=plan.num_clients,
                                        total_samples=plan.total_samples)

        def screen(results: Sequence[ClientResult], finite: Sequence[bool]):
            # a non-finite client is never folded; the policy's stop comes in the screen phase
            # (after the whole round trained, as for a round that holds every result)
            return ([r for r, ok in zip(results, finite, strict=True) if ok],
                    [r.client_id for r, ok in zip(results, finite, strict=True) if not ok])

        return ResultSink(ctx.algorithm, sums, screen)

    def _screen_batch(
        self, results: Sequence[ClientResult], finite: Sequence[bool], round_idx: int,
        num_all: int | None = None,
    ) -> tuple[list[ClientResult], list[int]]:
        """:func:`screen_nonfinite` with the round's policy and learning rate; ``num_all``
        (every client of the round) when ``results`` are the non-finite ones only."""
        ctx = self.context
        return screen_nonfinite(results, round_idx, ctx.on_nonfinite, ctx.local_optim(0).lr,
                                finite=finite, num_bad=num_all, num_all=num_all)

    def _screen(
        self, state: RoundState, num_bad: int | None = None, num_all: int | None = None
    ) -> tuple[list[ClientResult], list[int]]:
        ctx = self.context
        return screen_nonfinite(
            state.results, state.round, ctx.on_nonfinite, ctx.local_optim(0).lr,
            finite=state.finite, num_bad=num_bad, num_all=num_all,
        )


def _mark_stragglers(plan: RoundPlan, info: RoundSystems, systems: Systems) -> RoundPlan:
    """``plan`` with each straggler's :attr:`ClientPlan.work` set to the participation's
    ``straggler_work`` (its batches are already cut; an engine whose clients plan their own
    batches sends the share)."""
    if systems.participation is None or not info.stragglers:
        return plan
    slow, work = set(info.stragglers), systems.participation.straggler_work
    clients = [dataclasses.replace(c, work=work) if c.client_id in slow else c
               for c in plan.clients]
    return dataclasses.replace(plan, clients=clients)
