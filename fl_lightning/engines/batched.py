"""``BatchedEngine``: all sampled clients of a round trained at once with ``torch.vmap``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext, Params
from fl_lightning.engine import BatchTransform, ClientPlan, RoundPlan, SequentialEngine
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


class BatchedEngine(SequentialEngine):
    """Trains all sampled clients of a round at once: ``torch.vmap`` over stacked weights.

    The clients' weights and SGD momentum buffers are stacked into tensors of shape
    ``(K, ...)``; at local step ``s`` the algorithm's ``direction(w_k, x_k, y_k, ctx)`` runs for
    every client ``k`` that still has a step ``s`` in one vmapped call, followed by the same SGD
    update as :func:`fl_lightning.engine.sgd_step`:

    ``d_k = g_k + wd * w_k``,  ``b_k = m * b_k + d_k`` (``b_k = 0`` before the first step, so
    the first step gives ``b_k = d_k`` exactly),  ``w_k = w_k - lr * b_k``.

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
        losses: list[list[Tensor]] = [[] for _ in clients]
        for step in range(max(len(c.batches) for c in clients)):
            ctx.step = step
            for members in _groups(clients, step):
                x, y = _stack_batches(clients, members, step, x_all, y_all, plan)
                self._update(
                    step_fn, stacked, bufs, names, members, count, x, y, lr, momentum,
                    weight_decay, losses,
                )
        results = []
        for i, client in enumerate(clients):
            mean_loss = (
                torch.stack(losses[i]).mean() if losses[i] else torch.full((), float("nan"))
            )
            results.append(
                ClientResult(
                    client_id=client.client_id,
                    num_samples=client.num_samples,
                    params={k: v[i] for k, v in stacked.items()},
                    num_steps=len(client.batches),
                    loss=mean_loss,
                )
            )
        return results

    def _step_fn(self, algorithm: Algorithm, ctx: LocalContext):
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
        weight_decay: float, losses: list[list[Tensor]],
    ) -> None:
        everyone = len(members) == count
        sel = None if everyone else torch.tensor(members, device=x.device)
        params = stacked if everyone else {k: v[sel] for k, v in stacked.items()}
        with torch.enable_grad():
            direction, loss = step_fn(params, x, y)
        values = [params[k] for k in names]
        grads = [direction[k] for k in names]
        if weight_decay != 0.0:
            grads = torch._foreach_add(grads, values, alpha=weight_decay)
        if bufs is not None:
            active = bufs if everyone else [b[sel] for b in bufs]
            torch._foreach_mul_(active, momentum)
            torch._foreach_add_(active, grads)
            grads = active
            if not everyone:
                for b, new in zip(bufs, active, strict=True):
                    b[sel] = new
        torch._foreach_add_(values, grads, alpha=-lr)
        if not everyone:
            for k, new in zip(names, values, strict=True):
                stacked[k][sel] = new
        loss = loss.detach()
        for j, i in enumerate(members):
            losses[i].append(loss[j])


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
    xs, ys = [], []
    for i in members:
        client = clients[i]
        idx = client.batches[step].to(x_all.device, non_blocking=True)
        x = x_all[idx]
        if transform is not None:
            x = transform(x, plan.round, client.client_id, step)
        xs.append(x)
        ys.append(y_all[idx])
    return torch.stack(xs), torch.stack(ys)
