"""``BatchedEngine``: all sampled clients of a round trained at once with ``torch.vmap``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext, Params
from fl_lightning.engine import (
    BatchTransform,
    ClientEngine,
    ClientPlan,
    RoundPlan,
    sgd_step,
)
from fl_lightning.errors import ConfigError

__all__ = ["BatchedEngine", "unbatchable_reason"]


def unbatchable_reason(algorithm: Algorithm, net: nn.Module) -> str | None:
    """Why ``algorithm`` on ``net`` cannot train its clients in one ``vmap`` (``None``: it can).

    - algorithms that declare ``batchable = False`` (today those with per-client state or
      per-client server-bound extras: SCAFFOLD, FedDyn, MOON, FedNova, FedSoL with one of them
      as proximal term);
    - BatchNorm with running statistics updates a buffer in place inside the step, and dropout
      draws random numbers whose per-client streams could not match the sequential engine's
      (DESIGN.md §6.6); BatchNorm without running statistics (the paper's ResNets) is fine.
    """
    if not algorithm.batchable:
        why = ("keeps per-client state between rounds" if algorithm.client_state
               else "sends per-client extras to its server rule")
        return f"{type(algorithm).__name__} {why}"
    for name, module in net.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            return f"the model's BatchNorm {name!r} tracks running statistics"
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"the model's dropout {name!r} draws random numbers"
    return None


class BatchedEngine(ClientEngine):
    """Trains all sampled clients of a round at once: ``torch.vmap`` over stacked weights.

    The clients' weights and SGD momentum buffers are stacked into tensors of shape
    ``(K, ...)``; at local step ``s`` the algorithm's ``direction(w_k, x_k, y_k, ctx)`` runs for
    every client ``k`` that still has a step ``s`` in one vmapped call, followed by
    :func:`fl_lightning.engine.sgd_step` on the stacked rows (the one SGD update of both engines):

    ``d_k = g_k + wd * w_k``,  ``b_k = d_k`` at step 0, then ``b_k = m * b_k + d_k``,
    ``w_k = w_k - lr * b_k``.

    Clients with fewer steps are masked: at steps they do not have, their weights and buffers
    are not touched (only the active rows are gathered, updated and written back). Clients whose
    batch at step ``s`` has another size (the last batch of an epoch may be smaller) are run as
    a separate vmapped group, so every client computes exactly the mean loss over its own batch,
    as in the sequential engine. Augmentation stays per client (seeded by ``(seed, round,
    client, step)``), so both engines see the same data; they agree up to floating-point
    rounding (vmapped convolutions are grouped convolutions).

    The context passed to ``direction`` is shared by the group: ``ctx.step`` is the step, and
    ``ctx.client_id`` is ``-1`` (algorithms that need a client's identity keep client state and
    are rejected, see :func:`unbatchable_reason`).

    Args:
        compile: wrap the vmapped step in ``torch.compile`` (useful on a GPU; the first rounds
            pay the compilation).

    Raises:
        ConfigError: (from :meth:`check`) for algorithms with per-client state and models with
            BatchNorm running statistics or dropout: use the sequential engine for them.

    Example:
        >>> BatchedEngine().name
        'batched'
    """

    name = "batched"

    def __init__(self, compile: bool = False) -> None:  # noqa: A002 - the option's name
        if not isinstance(compile, bool):
            raise ConfigError(
                f"--model.engine.compile={compile!r} is invalid: use true or false"
            )
        self.compile = compile

    def check(self, algorithm: Algorithm, net: nn.Module) -> None:
        """Raise a one-line ``ConfigError`` if this engine cannot run ``algorithm`` on ``net``."""
        reason = unbatchable_reason(algorithm, net)
        if reason is not None:
            raise ConfigError(
                f"--model.engine=BatchedEngine cannot run --model.algorithm="
                f"{type(algorithm).__name__} here: {reason}; use --model.engine "
                "fl_lightning.engine.SequentialEngine"
            )

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
        """Run local training for every client of ``plan`` at once; one result per client."""
        self.check(algorithm, net)
        clients = plan.clients
        if not clients:
            return []
        x_all, y_all = data
        ctx = LocalContext(
            net=net, global_params=global_params, buffers=buffers, round=plan.round,
            client_id=-1, lr=lr, momentum=momentum, num_clients=plan.num_clients,
            total_samples=plan.total_samples,
        )
        frozen = algorithm.frozen(ctx)
        names = [k for k in global_params if k not in frozen]
        count = len(clients)
        stacked = {
            k: v.detach().unsqueeze(0).expand(count, *v.shape).clone()
            for k, v in global_params.items()
        }
        bufs = [torch.zeros_like(stacked[k]) for k in names] if momentum != 0.0 else None
        step_fn = self._step_fn(algorithm, ctx)
        losses: list[Tensor | None] = [None]  # the running sum of every client's batch losses
        for step in range(max(len(c.batches) for c in clients)):
            ctx.step = step
            for members in _groups(clients, step):
                x, y = _stack_batches(clients, members, step, x_all, y_all, plan)
                self._update(
                    step_fn, stacked, bufs, names, members, count, x, y, lr, momentum,
                    weight_decay, losses, step,
                )
        steps = [len(c.batches) for c in clients]
        if losses[0] is None:
            mean_losses = [torch.full((), float("nan"))] * count
        else:
            mean_losses = list((losses[0] / losses[0].new_tensor(steps)).unbind())
        results = []
        for i, client in enumerate(clients):
            mean_loss = mean_losses[i] if steps[i] else torch.full((), float("nan"))
            results.append(
                ClientResult(
                    client_id=client.client_id,
                    num_samples=client.num_samples,
                    params={k: v[i].contiguous() for k, v in stacked.items()},
                    num_steps=len(client.batches),
                    loss=mean_loss,
                )
            )
        return results

    def _step_fn(self, algorithm: Algorithm, ctx: LocalContext):
        cls = type(algorithm)
        if (cls.direction is Algorithm.direction and cls.task_grad is Algorithm.task_grad
                and not self.compile):
            # The direction is the task gradient: vmap only the loss and take every client's
            # gradient with one ordinary backward of the sum of the K losses (client k's
            # weights reach only loss k, so the gradient w.r.t. them is that of loss k).
            losses = torch.vmap(lambda p, x, y: algorithm.task_loss(ctx, p, x, y))

            def task_gradients(params: Params, x: Tensor, y: Tensor) -> tuple[Params, Tensor]:
                names = list(params)
                leaves = [params[k].detach().requires_grad_(True) for k in names]
                loss = losses(dict(zip(names, leaves, strict=True)), x, y)
                grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
                return {
                    k: (g if g is not None else torch.zeros_like(v))
                    for k, g, v in zip(names, grads, leaves, strict=True)
                }, loss.detach()

            return task_gradients

        def one(params: Params, x: Tensor, y: Tensor) -> tuple[Params, Tensor]:
            return algorithm.direction(params, x, y, ctx)

        fn = torch.vmap(one, in_dims=(0, 0, 0))
        if self.compile:
            fn = torch.compile(fn, dynamic=False)
        return fn

    @staticmethod
    @torch.no_grad()
    def _update(
        step_fn, stacked: Params, bufs: list[Tensor] | None, names: list[str],
        members: list[int], count: int, x: Tensor, y: Tensor, lr: float, momentum: float,
        weight_decay: float, losses: list[Tensor | None], step: int = 0,
    ) -> None:
        everyone = len(members) == count
        sel = None if everyone else torch.tensor(members, device=x.device)
        params = stacked if everyone else {k: v[sel] for k, v in stacked.items()}
        with torch.enable_grad():
            direction, loss = step_fn(params, x, y)
        if everyone:
            _match_layout(stacked, bufs, names, direction)
            params = stacked
        values = [params[k] for k in names]
        active = None
        if bufs is not None and step > 0:  # every client takes its first step at step 0
            active = bufs if everyone else [b[sel] for b in bufs]
        new = sgd_step(values, [direction[k] for k in names], active, lr, momentum,
                       weight_decay)
        if bufs is not None and (step == 0 or not everyone):
            for b, rows in zip(bufs, new, strict=True):
                if everyone:
                    b.copy_(rows)
                else:
                    b[sel] = rows
        if not everyone:
            for k, rows in zip(names, values, strict=True):
                stacked[k][sel] = rows
        loss = loss.detach()
        if losses[0] is None:
            losses[0] = loss.new_zeros(count)
        if everyone:
            losses[0].add_(loss)
        else:
            losses[0].index_add_(0, sel, loss)


def _match_layout(
    stacked: Params, bufs: list[Tensor] | None, names: list[str], direction: Params
) -> None:
    """Store each stacked weight (and its momentum buffer) in the memory layout of its
    direction, once per round: a gradient taken through a vmapped ``linear`` comes out
    transposed, and an update of a contiguous tensor by a transposed one is a slow strided
    pass (about 10x the contiguous one for MLP2NN on a CPU). The values do not change."""
    for j, k in enumerate(names):
        d, w = direction[k], stacked[k]
        if d.shape != w.shape or d.stride() == w.stride():
            continue
        stacked[k] = torch.empty_strided(d.shape, d.stride(), dtype=w.dtype,
                                         device=w.device).copy_(w)
        if bufs is not None:
            b = bufs[j]
            bufs[j] = torch.empty_strided(d.shape, d.stride(), dtype=b.dtype,
                                          device=b.device).copy_(b)


def _groups(clients: list[ClientPlan], step: int) -> list[list[int]]:
    """Indices of the clients that have a local step ``step``, grouped by its batch size."""
    groups: dict[int, list[int]] = {}
    for i, client in enumerate(clients):
        if step < len(client.batches):
            groups.setdefault(len(client.batches[step]), []).append(i)
    return list(groups.values())


def _stack_batches(
    clients: list[ClientPlan], members: list[int], step: int, x_all: Tensor, y_all: Tensor,
    plan: RoundPlan,
) -> tuple[Tensor, Tensor]:
    """The group's batches at ``step`` as ``(K, B, ...)`` inputs and ``(K, B)`` labels."""
    transform: BatchTransform | None = plan.transform
    idx = torch.stack([clients[i].batches[step] for i in members]).to(x_all.device)
    x, y = x_all[idx], y_all[idx]
    if transform is not None:
        ids = [clients[i].client_id for i in members]
        many = getattr(transform, "many", None)
        if callable(many):  # the data module's: one call for the whole group
            x = many(x, plan.round, ids, step)
        else:
            x = torch.stack([transform(x[j], plan.round, c, step) for j, c in enumerate(ids)])
    return x, y
