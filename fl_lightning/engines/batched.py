"""``BatchedEngine``: all sampled clients of a round trained at once with ``torch.vmap``."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext, Params
from fl_lightning.engine import (
    BatchTransform,
    ClientPlan,
    RoundPlan,
    SequentialEngine,
    batch_statistics_only,
    running_stats_step,
    sgd_step,
    tracked_batchnorms,
)
from fl_lightning.errors import ConfigError

__all__ = ["BatchedEngine", "StackedState", "unbatchable_reason"]

RANDOMNESS = ("error", "different")


def unbatchable_reason(
    algorithm: Algorithm, net: nn.Module, randomness: str = "error"
) -> str | None:
    """Why ``algorithm`` on ``net`` cannot train its clients in one ``vmap`` (``None``: it can).

    - an algorithm that declares ``batchable = False``;
    - a model with dropout (``p > 0``) while ``randomness="error"``: per-client random masks
      under ``vmap`` cannot equal the sequential engine's stream, so they are opt-in
      (``randomness="different"``).
    """
    if not algorithm.batchable:
        return f"{type(algorithm).__name__} declares batchable = False"
    if randomness == "error":
        for name, module in net.named_modules():
            if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
                return (
                    f"the model's dropout {name!r} draws random numbers (set "
                    "--model.engine.randomness different for per-client masks; they are not "
                    "bit-equal to the sequential engine's)"
                )
    return None


class StackedState:
    """The sampled clients' ``ctx.state`` trees as per-client inputs of the vmapped step.

    Every client's state (what :meth:`Algorithm.client_begin` put into ``ctx.state``) must have
    the same structure. A leaf that is the very same object for every client (e.g. SCAFFOLD's
    server control variate ``c``) is passed once, unbatched; every other tensor leaf is stacked
    into a ``(K, ...)`` tensor and vmapped over dimension 0.

    Example:
        >>> a, b = torch.zeros(2), torch.ones(2)
        >>> s = StackedState([{"c": a, "c_i": a}, {"c": a, "c_i": b}])
        >>> [t.shape for t in s.batched], s.unpack(list(s.batched))["c"] is a
        ([torch.Size([2, 2])], True)
    """

    def __init__(self, states: list[dict[str, Any]]) -> None:
        flat = [tree_flatten(s) for s in states]
        self.spec = flat[0][1]
        for _, spec in flat[1:]:
            if spec != self.spec:
                raise ValueError(
                    "the clients' ctx.state have different structures; the batched engine "
                    "needs one structure for every client"
                )
        columns = list(zip(*(leaves for leaves, _ in flat), strict=True)) if flat[0][0] else []
        self.shared: list[Any] = []
        self.is_batched: list[bool] = []
        batched: list[Tensor] = []
        for column in columns:
            first = column[0]
            same = all(v is first for v in column[1:])
            if same or not isinstance(first, Tensor):
                if not same and not all(v == first for v in column[1:]):
                    raise ValueError("a non-tensor ctx.state entry differs between clients")
                self.shared.append(first)
                self.is_batched.append(False)
            else:
                self.shared.append(None)
                self.is_batched.append(True)
                batched.append(torch.stack(list(column)))
        self.batched: tuple[Tensor, ...] = tuple(batched)

    def unpack(self, batched: list[Tensor] | tuple[Tensor, ...]) -> dict[str, Any]:
        """One client's state tree from its rows of the batched leaves (inside ``vmap``)."""
        it = iter(batched)
        leaves = [next(it) if b else v for b, v in zip(self.is_batched, self.shared,
                                                        strict=True)]
        return tree_unflatten(leaves, self.spec)


class BatchedEngine(SequentialEngine):
    """Trains all sampled clients of a round at once: ``torch.vmap`` over stacked weights.

    The clients' weights and SGD momentum buffers are stacked into tensors of shape
    ``(K, ...)``; at local step ``s`` the algorithm's ``direction(w_k, x_k, y_k, ctx_k)`` runs for
    every client ``k`` that still has a step ``s`` in one vmapped call, followed by the same SGD
    update as :func:`fl_lightning.engine.sgd_step`:

    ``d_k = g_k + wd * w_k``,  ``b_k = m * b_k + d_k`` (``b_k = 0`` before the first step, so
    the first step gives ``b_k = d_k`` exactly),  ``w_k = w_k - lr * b_k``.

    Client state: :meth:`Algorithm.client_begin` runs for every sampled client before the
    first step (it reads the client's rows of the algorithm's
    :class:`~fl_lightning.algorithms.state.ClientStateStore`); their ``ctx.state`` trees are
    stacked (:class:`StackedState`) and passed to the vmapped step as a per-client input, so
    ``ctx_k.state`` inside ``direction`` is client ``k``'s own (SCAFFOLD's ``c_i``, FedDyn's
    ``h_i``, MOON's previous model, FedNova's ``c_i``). After the last step
    :meth:`Algorithm.client_end` runs per client on its row of the results, exactly as in the
    sequential engine; the round loop commits the new state.

    BatchNorm running statistics: every client keeps its own copy (``K x`` buffers), updated
    once per local step by a training-mode forward at the step's weights
    (:func:`~fl_lightning.engine.running_stats_step`); the step itself uses batch statistics
    (:func:`~fl_lightning.engine.batch_statistics_only`), the same as in the sequential engine.

    Clients with fewer steps are masked: at steps they do not have, their weights and buffers
    are not touched (only the active rows are gathered, updated and written back; the index
    tensors are made once per round for each distinct set of rows). Clients whose batch at step
    ``s`` has another size (the last batch of an epoch may be smaller) are run as a separate
    vmapped group, so every client computes exactly the mean loss over its own batch, as in
    the sequential engine. Augmentation stays per client (seeded by ``(seed, round, client,
    step)``), so both engines see the same data; they agree up to floating-point rounding
    (vmapped convolutions are grouped convolutions).

    The context passed to ``direction`` is the round's, with ``ctx.step`` the step,
    ``ctx.client_id = -1`` and ``ctx.state`` the client's own state.

    Args:
        compile: wrap the vmapped step in ``torch.compile`` (useful on a GPU; the first rounds
            pay the compilation).
        randomness: ``"error"`` (default: models with dropout are rejected) or ``"different"``
            (each client draws its own dropout masks, ``torch.vmap(randomness="different")``;
            the result is a valid federated run but not bit-equal to the sequential engine,
            whose clients draw one after another from the same stream).

    Raises:
        ConfigError: for an unknown ``randomness``, and (from :meth:`check`) for algorithms
            that declare ``batchable = False`` and, unless ``randomness="different"``, models
            with dropout.

    Example:
        >>> BatchedEngine().name
        'batched'
    """

    name = "batched"

    def __init__(
        self,
        compile: bool = False,  # noqa: A002 - the option's name
        randomness: str = "error",  # checked here, so the message states the rule
    ) -> None:
        if not isinstance(compile, bool):
            raise ConfigError(
                f"--model.engine.compile={compile!r} is invalid: use true or false"
            )
        if randomness not in RANDOMNESS:
            raise ConfigError(
                f"--model.engine.randomness={randomness!r} is unknown: use 'error' (reject "
                "dropout) or 'different' (per-client dropout masks)"
            )
        self.compile = compile
        self.randomness = randomness

    def check(self, algorithm: Algorithm, net: nn.Module) -> None:
        """Raise a one-line ``ConfigError`` if this engine cannot run ``algorithm`` on ``net``."""
        reason = unbatchable_reason(algorithm, net, self.randomness)
        if reason is not None:
            raise ConfigError(
                f"--model.engine=BatchedEngine cannot run --model.algorithm="
                f"{type(algorithm).__name__} here: {reason}; or use --model.engine "
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
        if any(c.lrs is not None for c in clients):
            raise ConfigError(
                "the batched engine trains every client at the round's learning rate: per-step "
                "learning rates (ClientPlan.lrs) need --model.engine sequential"
            )
        x_all, y_all = data

        def context(client_id: int) -> LocalContext:
            return LocalContext(
                net=net, global_params=global_params, buffers=buffers, round=plan.round,
                client_id=client_id, lr=lr, momentum=momentum, num_clients=plan.num_clients,
                total_samples=plan.total_samples,
            )

        ctx = context(-1)
        contexts = [context(c.client_id) for c in clients]
        for c in contexts:
            algorithm.client_begin(c)
        state = StackedState([c.state for c in contexts])
        frozen = algorithm.frozen(ctx)
        names = [k for k in global_params if k not in frozen]
        count = len(clients)
        stacked = {
            k: v.detach().unsqueeze(0).expand(count, *v.shape).clone()
            for k, v in global_params.items()
        }
        bufs = [torch.zeros_like(stacked[k]) for k in names] if momentum != 0.0 else None
        norms = tracked_batchnorms(net)
        stats = (
            {k: v.detach().unsqueeze(0).expand(count, *v.shape).clone()
             for k, v in buffers.items()} if norms else {}
        )
        step_fn, stats_fn = self._step_fn(algorithm, ctx, state, net)
        device = next(iter(global_params.values())).device
        rows: dict[tuple[int, ...], Tensor] = {}  # the index tensor of each set of rows, once
        losses: list[Tensor | None] = [None]  # the running sum of every client's batch losses
        for step in range(max(len(c.batches) for c in clients)):
            ctx.step = step
            for members in _groups(clients, step):
                sel = None
                if len(members) != count:
                    key = tuple(members)
                    if key not in rows:
                        rows[key] = torch.tensor(members, device=device)
                    sel = rows[key]
                x, y = _stack_batches(clients, members, step, x_all, y_all, plan)
                self._update(
                    step_fn, stats_fn, norms, stacked, bufs, stats, names, state, sel, count,
                    x, y, lr, momentum, weight_decay, losses, step,
                )
        steps = [len(c.batches) for c in clients]
        if losses[0] is None:
            mean_losses = [torch.full((), float("nan"))] * count
        else:
            mean_losses = list((losses[0] / losses[0].new_tensor(steps)).unbind())
        results = []
        for i, client in enumerate(clients):
            mean_loss = mean_losses[i] if steps[i] else torch.full((), float("nan"))
            result = ClientResult(
                client_id=client.client_id,
                num_samples=client.num_samples,
                params={k: v[i].contiguous() for k, v in stacked.items()},
                num_steps=len(client.batches),
                loss=mean_loss,
                buffers={k: v[i] for k, v in stats.items()},
            )
            algorithm.client_end(contexts[i], result)
            results.append(result)
        return results

    def _step_fn(self, algorithm: Algorithm, ctx: LocalContext, state: StackedState,
                 net: nn.Module):
        """The vmapped step ``(params, state rows, x, y) -> (directions, losses)`` and the
        vmapped running-statistics update ``(params, buffers, x) -> buffers``."""

        def stats(params: Params, buffers: Params, x: Tensor) -> Params:
            return running_stats_step(net, params, buffers, x)

        stats_fn = torch.vmap(stats, in_dims=(0, 0, 0), randomness=self.randomness)
        cls = type(algorithm)
        if (cls.direction is Algorithm.direction and cls.task_grad is Algorithm.task_grad
                and not self.compile and not state.batched):
            # The direction is the task gradient: vmap only the loss and take every client's
            # gradient with one ordinary backward of the sum of the K losses (client k's
            # weights reach only loss k, so the gradient w.r.t. them is that of loss k).
            losses = torch.vmap(lambda p, x, y: algorithm.task_loss(ctx, p, x, y),
                                randomness=self.randomness)

            def task_gradients(params: Params, batched: tuple[Tensor, ...], x: Tensor,
                               y: Tensor) -> tuple[Params, Tensor]:
                names = list(params)
                leaves = [params[k].detach().requires_grad_(True) for k in names]
                loss = losses(dict(zip(names, leaves, strict=True)), x, y)
                grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
                return {
                    k: (g if g is not None else torch.zeros_like(v))
                    for k, g, v in zip(names, grads, leaves, strict=True)
                }, loss.detach()

            return task_gradients, stats_fn

        def one(params: Params, batched: tuple[Tensor, ...], x: Tensor, y: Tensor):
            local = dataclasses.replace(ctx, state=state.unpack(batched))
            return algorithm.direction(params, x, y, local)

        fn = torch.vmap(one, in_dims=(0, 0, 0, 0), randomness=self.randomness)
        if self.compile:
            fn = torch.compile(fn, dynamic=False)
        return fn, stats_fn

    @staticmethod
    @torch.no_grad()
    def _update(
        step_fn, stats_fn, norms: list[nn.Module], stacked: Params,
        bufs: list[Tensor] | None, stats: Params, names: list[str], state: StackedState,
        sel: Tensor | None, count: int, x: Tensor, y: Tensor, lr: float, momentum: float,
        weight_decay: float, losses: list[Tensor | None], step: int = 0,
    ) -> None:
        everyone = sel is None
        params = stacked if everyone else {k: v[sel] for k, v in stacked.items()}
        batched = state.batched if everyone else tuple(s[sel] for s in state.batched)
        with torch.enable_grad(), batch_statistics_only(norms):
            direction, loss = step_fn(params, batched, x, y)
        if stats:  # each client's running statistics, at the weights the step started from
            new = stats_fn(params, stats if everyone else {k: v[sel] for k, v in stats.items()},
                           x)
            for k, v in new.items():
                if everyone:
                    stats[k].copy_(v)
                else:
                    stats[k][sel] = v
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
