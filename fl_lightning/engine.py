"""Client engines: run the local training of the clients sampled in a round.

The engine owns the local optimizer: SGD with momentum and weight decay in PyTorch's
convention (``d = g + wd * w``; ``b = d`` at the first step, then ``b = m * b + d``;
``w = w - lr * b``), created fresh for every client in every round as in the FedSoL paper.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext, Params
from fl_lightning.errors import ConfigError
from fl_lightning.protocol import BatchTransform, ClientPlan, RoundPlan

__all__ = [
    "ClientEngine",
    "ClientPlan",
    "RoundPlan",
    "SequentialEngine",
    "average_buffers",
    "batch_statistics_only",
    "running_stats_step",
    "sgd_step",
    "tracked_batchnorms",
]


@torch.no_grad()
def sgd_step(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor] | None,
    lr: float,
    momentum: float,
    weight_decay: float,
) -> list[Tensor] | None:
    """One in-place SGD step, bit-identical to ``torch.optim.SGD`` (foreach, no dampening).

    Returns the momentum buffers to pass to the next step (``None`` without momentum).
    """
    if weight_decay != 0.0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0.0:
        if bufs is None:
            bufs = [g.clone() for g in grads]
        else:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, grads)
        grads = bufs
    torch._foreach_add_(params, grads, alpha=-lr)
    return bufs


@runtime_checkable
class ClientEngine(Protocol):
    """What the round loop needs from a client engine (``--model.engine``).

    An engine trains the clients of a :class:`RoundPlan` from the global weights with the
    algorithm's local update direction and returns one
    :class:`~fl_lightning.algorithms.base.ClientResult` per client, in plan order. It may also
    define ``check(algorithm, net)``, called at setup, raising ``ConfigError`` for what it cannot
    run. The project's engines (:class:`SequentialEngine`,
    :class:`fl_lightning.engines.BatchedEngine`) subclass it so that ``--model.engine`` takes
    their short names; any class with this ``run_round`` works from Python.
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




def tracked_batchnorms(net: nn.Module) -> list[nn.Module]:
    """The BatchNorm modules of ``net`` that keep running statistics."""
    return [
        m for m in net.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]


@contextmanager
def batch_statistics_only(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Run ``modules`` (BatchNorms) without touching their running statistics.

    In training mode a BatchNorm normalizes with the statistics of the batch whether it tracks
    running statistics or not; tracking only adds an in-place update of its buffers, which a
    ``torch.func`` transform cannot do on a captured tensor. Inside this context the local
    step's forward passes give the same outputs and leave the buffers alone; the engine then
    updates each client's own statistics once per local step with :func:`running_stats_step`.
    """
    saved = [m.track_running_stats for m in modules]
    try:
        for m in modules:
            m.track_running_stats = False
        yield
    finally:
        for m, flag in zip(modules, saved, strict=True):
            m.track_running_stats = flag


@torch.no_grad()
def running_stats_step(net: nn.Module, params: Params, buffers: Params, x: Tensor) -> Params:
    """One client's buffers after a training-mode forward of ``net`` at ``params`` on ``x``.

    This is what ``net(x)`` does to the running statistics in a plain PyTorch loop
    (``r <- (1 - m) r + m * batch statistic``, ``num_batches_tracked += 1``), applied to copies,
    so it also runs under ``torch.vmap`` with one set of buffers per client.
    """
    fresh = {k: v.clone() for k, v in buffers.items()}
    functional_call(net, (dict(params), fresh), (x,))
    return fresh


@torch.no_grad()
def average_buffers(net: nn.Module, results: Sequence[ClientResult]) -> None:
    """Set ``net``'s buffers to the data-size weighted mean of the clients' (running
    statistics of BatchNorm), as averaging the clients' ``state_dict`` does; integer buffers
    (``num_batches_tracked``) get the rounded mean."""
    kept = [r for r in results if r.buffers]
    if not kept:
        return
    sizes = torch.tensor([float(r.num_samples) for r in kept], dtype=torch.float64)
    weights = (sizes / sizes.sum()).tolist()
    for name, buf in net.named_buffers():
        if name not in kept[0].buffers:
            continue
        acc = sum(w * r.buffers[name].to(torch.float64) for w, r in zip(weights, kept,
                                                                         strict=True))
        buf.copy_(acc.round() if not buf.is_floating_point() else acc)


class SequentialEngine(ClientEngine):
    """Trains the sampled clients one after another (the reference engine; any model).

    Example:
        >>> SequentialEngine().name
        'sequential'
    """

    name = "sequential"

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
        x_all, y_all = data
        results: list[ClientResult] = []
        for client in plan.clients:
            ctx = LocalContext(
                net=net,
                global_params=global_params,
                buffers=buffers,
                round=plan.round,
                client_id=client.client_id,
                lr=lr,
                momentum=momentum,
                num_clients=plan.num_clients,
                total_samples=plan.total_samples,
            )
            results.append(
                self._train_client(
                    algorithm, ctx, client, x_all, y_all, momentum, weight_decay, plan.transform
                )
            )
        return results

    @staticmethod
    def _train_client(
        algorithm: Algorithm,
        ctx: LocalContext,
        client: ClientPlan,
        x_all: Tensor,
        y_all: Tensor,
        momentum: float,
        weight_decay: float,
        transform: BatchTransform | None = None,
    ) -> ClientResult:
        if client.lrs is not None and len(client.lrs) != len(client.batches):
            raise ConfigError(
                f"client {client.client_id}: {len(client.lrs)} learning rates for "
                f"{len(client.batches)} local steps: give one per batch"
            )
        algorithm.client_begin(ctx)
        params = {k: v.detach().clone() for k, v in ctx.global_params.items()}
        frozen = algorithm.frozen(ctx)
        names = [k for k in params if k not in frozen]
        values = [params[k] for k in names]
        bufs: list[Tensor] | None = None
        losses: list[Tensor] = []
        norms = tracked_batchnorms(ctx.net)
        stats = {k: v.clone() for k, v in ctx.buffers.items()} if norms else {}
        for step, idx in enumerate(client.batches):
            ctx.step = step
            if client.lrs is not None:
                ctx.lr = float(client.lrs[step])
            idx = idx.to(x_all.device, non_blocking=True)
            x = x_all[idx]
            if transform is not None:
                x = transform(x, ctx.round, client.client_id, step)
            if norms:
                with batch_statistics_only(norms):
                    direction, loss = algorithm.direction(params, x, y_all[idx], ctx)
                stats = running_stats_step(ctx.net, params, stats, x)
            else:
                direction, loss = algorithm.direction(params, x, y_all[idx], ctx)
            bufs = sgd_step(
                values, [direction[k] for k in names], bufs, ctx.lr, momentum, weight_decay
            )
            losses.append(loss.detach())
        mean_loss = torch.stack(losses).mean() if losses else torch.full((), float("nan"))
        result = ClientResult(
            client_id=client.client_id,
            num_samples=client.num_samples,
            params=params,
            num_steps=len(client.batches),
            loss=mean_loss,
            buffers=stats,
        )
        algorithm.client_end(ctx, result)
        return result


def stack_losses(results: Sequence[ClientResult]) -> Tensor:
    """Mean training loss over clients (each client's loss is its mean over local steps)."""
    return torch.stack([r.loss.float() for r in results]).mean()
