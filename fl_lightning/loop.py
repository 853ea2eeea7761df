"""``RoundLoop``: one communication round, as plain Python driven by ``training_step``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fl_lightning.algorithms.base import ClientResult, finish_round
from fl_lightning.distributed import (
    GatherCost,
    allgather_results,
    allreduce_average,
    local_plan,
    rank_shares,
)
from fl_lightning.engine import average_buffers, stack_losses
from fl_lightning.hooks import RoundResult

if TYPE_CHECKING:
    from fl_lightning.module import FederatedModule

__all__ = ["DivergenceError", "RoundLoop"]


class DivergenceError(RuntimeError):
    """A client's local training produced NaN or infinite weights."""


def _finite_flags(results: list[ClientResult]) -> list[bool]:
    """Whether each client's weights and loss are all finite, with one host sync per round
    (one ``foreach`` norm over every client's tensors; a NaN or inf entry makes a norm
    non-finite)."""
    if not results:
        return []
    tensors = [t for r in results for t in r.params.values()]
    per = len(results[0].params)
    norms = torch.stack(torch._foreach_norm(tensors)).view(len(results), per)
    losses = torch.stack([r.loss.detach().to(norms.device, norms.dtype) for r in results])
    ok = torch.isfinite(norms).all(dim=1) & torch.isfinite(losses)
    return ok.tolist()


class RoundLoop:
    """Runs a round: sample clients, plan their batches, train them, aggregate, update.

    1. the data module samples ``clients_per_round`` clients and the batches each one trains
       on at each local step (pure functions of the seed, the round and the client);
    2. the client engine trains them from the current global weights with the algorithm's
       local update direction and a fresh local SGD optimizer;
    3. clients whose update is not finite are handled by ``on_nonfinite``; the others' new
       state is committed (:meth:`Algorithm.commit_client`) and the algorithm's server rule
       aggregates their results (weights and extras);
    4. the server optimizer steps on the pseudo-gradient ``w_global - aggregate`` (plain SGD
       with learning rate 1 is FedAvg's averaging; momentum gives FedAvgM, Adam FedAdam);
    5. ``on_round_end`` hooks receive a :class:`~fl_lightning.hooks.RoundResult`.
    """

    def __init__(self, module: FederatedModule) -> None:
        self.module = module
        #: what the last round's all-gather of client results moved (``None``: no gather)
        self.gather_cost: GatherCost | None = None

    def needs_all_results(self) -> bool:
        """Whether, under DDP, every rank needs every client's result (not just the weighted
        mean of the weights): the algorithm keeps client state (every rank then commits every
        kept client's state, so each rank's store is the full one and any rank can train any
        client) or has its own server rule, or a systems mechanism acts on each update, or a
        callback reads every client's result (``needs_client_results``: its measurement on
        one rank's clients alone would be wrong)."""
        module = self.module
        algorithm = module.algorithm
        callbacks = module.trainer.callbacks if module._trainer is not None else []
        return (
            module.systems.active or bool(algorithm.client_state)
            or algorithm.server_rule != "mean"
            or any(getattr(cb, "needs_client_results", False) for cb in callbacks)
        )

    def run_round(self, round_idx: int) -> RoundResult:
        module = self.module
        dm = module.datamodule
        net = module.net
        per_round = module.clients_per_round(dm.num_clients)
        plan = dm.round_plan(
            round_idx, per_round, module.local_epochs, module.batch_size, module.device
        )
        sampled = [(c.client_id, c.num_samples) for c in plan.clients]
        systems, info = module.systems, None
        if systems.active:
            plan, info = systems.begin_round(plan, dm.seed, per_round)
        world = module.trainer.world_size if module._trainer is not None else 1
        shares = rank_shares(plan, world) if world > 1 else None
        if shares is not None:  # DDP: this rank trains its balanced share of the clients
            plan = local_plan(plan, module.trainer.global_rank, world)
        lr = module.local_lr_at(round_idx)
        global_before = {k: p.detach().clone() for k, p in net.named_parameters()}
        buffers = {k: b.detach() for k, b in net.named_buffers()}
        data = dm.train_tensors(module.device, module.dtype)
        if info is not None:
            data = systems.training_data(data, dm.client_indices, dm.seed, module.num_classes)
        results = module.engine.run_round(
            module.algorithm, net, global_before, buffers, plan, data, lr,
            module.momentum, module.weight_decay,
        )
        train_loss = None
        self.gather_cost = None
        allreduce = shares is not None and not self.needs_all_results()
        if shares is not None and not allreduce:
            # every rank gets every client's result, in plan order: the rest of the round is
            # then exactly the one-process round, computed identically on every rank (each
            # commits every kept client's state, so every rank holds the full state store)
            results, self.gather_cost = allgather_results(results, shares, module.device)
        finite = _finite_flags(results)
        if allreduce:  # one flat all-reduce gives every rank the same average and counts
            kept = [r for r, ok in zip(results, finite, strict=True) if ok]
            aggregate, train_loss, num_bad, num_all = allreduce_average(
                global_before, kept, len(results) - len(kept)
            )
            results, skipped = self._drop_diverged(results, round_idx, num_bad, num_all, finite)
        else:
            results, skipped = self._drop_diverged(results, round_idx, finite=finite)
            # only the kept clients' new state is committed: a skipped client leaves no trace
            if info is not None:
                for r in results:
                    module.algorithm.commit_client(r)
                aggregate = systems.aggregate(
                    module.algorithm, global_before, results, info, dm.num_clients,
                    plan.total_samples,
                )
            else:
                aggregate = finish_round(
                    module.algorithm, global_before, results, num_clients=plan.num_clients,
                    total_samples=plan.total_samples,
                )
        module.server_update(aggregate)
        average_buffers(net, results)  # BatchNorm running statistics, kept per client
        global_after = {k: p.detach().clone() for k, p in net.named_parameters()}
        result = RoundResult(
            round=round_idx,
            lr=lr,
            client_ids=[r.client_id for r in results],
            client_sizes=[r.num_samples for r in results],
            clients=results,
            global_before=global_before,
            aggregate=aggregate,
            global_after=global_after,
            train_loss=stack_losses(results) if train_loss is None else train_loss,
            skipped_clients=skipped,
            systems=info.metrics if info is not None else {},
            sampled=sampled,
            stragglers=list(info.stragglers) if info is not None else [],
            dropped=list(info.dropped) if info is not None else [],
        )
        trainer = module.trainer
        for callback in trainer.callbacks:
            hook = getattr(callback, "on_round_end", None)
            if callable(hook):
                hook(trainer, module, result)
        return result

    def _drop_diverged(
        self, results: list[ClientResult], round_idx: int, num_bad: int | None = None,
        num_all: int | None = None, finite: list[bool] | None = None,
    ) -> tuple[list[ClientResult], list[int]]:
        """Apply the module's ``on_nonfinite`` policy to clients with NaN/inf weights or loss
        (``finite``: :func:`_finite_flags` of ``results``, computed here if not given).

        Under DDP ``num_bad`` and ``num_all`` count the clients of every rank, so that every
        rank takes the same decision.
        """
        finite = _finite_flags(results) if finite is None else finite
        bad = [r for r, ok in zip(results, finite, strict=True) if not ok]
        num_bad = len(bad) if num_bad is None else num_bad
        num_all = len(results) if num_all is None else num_all
        if not num_bad:
            return results, []
        module = self.module
        shown = round_idx + 1  # rounds are counted from 1 in messages, metrics and checkpoints
        where = (
            f"client {bad[0].client_id} produced non-finite weights in round {shown} "
            f"(mean local loss {float(bad[0].loss):.4g})" if bad
            else f"{num_bad} client(s) of another rank produced non-finite weights in round "
            f"{shown}"
        )
        if module.on_nonfinite == "skip_client" and num_bad < num_all:
            kept = [r for r, ok in zip(results, finite, strict=True) if ok]
            return kept, [r.client_id for r in bad]
        if module.on_nonfinite == "skip_client":
            where = f"every client diverged in round {shown} (first: {where})"
        raise DivergenceError(
            f"{where}: lower --model.local_lr (now {module.local_lr}) or the algorithm's "
            "strength, or set --model.on_nonfinite skip_client to leave such clients out; "
            "the checkpoints written so far are kept"
        )
