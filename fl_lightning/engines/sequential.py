"""``SequentialEngine``: the sampled clients trained one after another (the reference engine),
and the BatchNorm helpers both engines use."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext, Params
from fl_lightning.algorithms.sums import accumulate
from fl_lightning.engines.base import ClientEngine, sgd_step
from fl_lightning.errors import ConfigError

if TYPE_CHECKING:  # the plan types import the engines
    from fl_lightning.engine import BatchTransform, ClientPlan, RoundPlan

__all__ = [
    "SequentialEngine",
    "average_buffers",
    "batch_statistics_only",
    "running_stats_step",
    "stack_losses",
    "tracked_batchnorms",
]


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
    total = float(sum(r.num_samples for r in kept))
    for name, buf in net.named_buffers():
        if name not in kept[0].buffers:
            continue
        acc: dict[str, Tensor] = {}
        for r in kept:  # sum_k n_k b_k / sum_k n_k: the arithmetic of the streamed round
            accumulate(acc, {name: r.buffers[name].to(torch.float64)}, float(r.num_samples),
                       (name,))
        mean = acc[name] / total
        buf.copy_(mean.round() if not buf.is_floating_point() else mean)


def stack_losses(results: Sequence[ClientResult]) -> Tensor:
    """Mean training loss over clients (each client's loss is its mean over local steps)."""
    return torch.stack([r.loss.float() for r in results]).mean()


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
        sink: Callable[[list[ClientResult]], None] | None = None,
    ) -> list[ClientResult]:
        """Run local training for every client of ``plan``; returns one result per client,
        or, with a ``sink``, gives each result to it as soon as the client is trained (and
        keeps none: returns ``[]``)."""
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
            result = self._train_client(
                algorithm, ctx, client, x_all, y_all, momentum, weight_decay, plan.transform
            )
            if sink is None:
                results.append(result)
            else:
                sink([result])
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
