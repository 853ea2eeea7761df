"""``BatchedEngine``: all sampled clients of a round trained at once with ``torch.vmap``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from fl_lightning.algorithms.base import (
    IGNORE_INDEX,
    Algorithm,
    ClientResult,
    LocalContext,
    Params,
)
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

__all__ = ["BatchedEngine", "PaddedRound", "StackedState", "unbatchable_reason"]

RANDOMNESS = ("error", "different")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
AUTOCAST = ("none", "bf16")


def _compile_mode(value: bool | str) -> str:
    """``compile`` as one of :data:`COMPILE_MODES` (``true`` is ``default``, ``false``
    ``none``), else a one-line ``ConfigError``."""
    if isinstance(value, bool):
        return "default" if value else "none"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ConfigError(
        f"--model.engine.compile={value!r} is invalid: use none, default, reduce-overhead, "
        "max-autotune (or true / false)"
    )


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
    into a ``(K, ...)`` tensor and vmapped over dimension 0. The tensors under the entries
    named in ``per_client`` (the algorithm's declared ``client_state``) are always stacked,
    even when every sampled client holds the same object (MOON's previous model in the first
    round is the initial model for everyone), so that the step sees the same structure in
    every round and a compiled step is not compiled again.

    Example:
        >>> a, b = torch.zeros(2), torch.ones(2)
        >>> s = StackedState([{"c": a, "c_i": a}, {"c": a, "c_i": b}])
        >>> [t.shape for t in s.batched], s.unpack(list(s.batched))["c"] is a
        ([torch.Size([2, 2])], True)
        >>> len(StackedState([{"c_i": a}, {"c_i": a}], per_client=("c_i",)).batched)
        1
    """

    def __init__(self, states: list[dict[str, Any]], per_client: tuple[str, ...] = ()) -> None:
        flat = [tree_flatten(s) for s in states]
        self.spec = flat[0][1]
        for _, spec in flat[1:]:
            if spec != self.spec:
                raise ValueError(
                    "the clients' ctx.state have different structures; the batched engine "
                    "needs one structure for every client"
                )
        # for each leaf: does it sit under a declared per-client entry? (a dict flattens its
        # values in insertion order, each value's leaves together)
        owned: list[bool] = []
        for key, value in states[0].items():
            owned += [key in per_client] * len(tree_flatten(value)[0])
        columns = list(zip(*(leaves for leaves, _ in flat), strict=True)) if flat[0][0] else []
        self.shared: list[Any] = []
        self.is_batched: list[bool] = []
        batched: list[Tensor] = []
        for column, mine in zip(columns, owned, strict=True):
            first = column[0]
            same = all(v is first for v in column[1:]) and not (mine and
                                                                isinstance(first, Tensor))
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
    ``ctx.client_id = -1``, ``ctx.state`` the client's own state and ``ctx.lr`` the round's
    learning rate as a 0-d tensor of the weights' dtype (the same number; a tensor so that a
    compiled step is not specialized on it).

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
        compile: bool | str = False,  # noqa: A002 - the option's name
        randomness: str = "error",  # checked here, so the message states the rule
        compile_backend: str = "inductor",
        tf32: bool = False,
        cudnn_benchmark: bool = False,
        channels_last: bool = False,
        autocast: str = "none",
    ) -> None:
        self.compile = _compile_mode(compile)
        if randomness not in RANDOMNESS:
            raise ConfigError(
                f"--model.engine.randomness={randomness!r} is unknown: use 'error' (reject "
                "dropout) or 'different' (per-client dropout masks)"
            )
        if not (isinstance(compile_backend, str) and compile_backend) and not callable(
                compile_backend):
            raise ConfigError(
                f"--model.engine.compile_backend={compile_backend!r} is invalid: use a "
                "torch.compile backend name such as inductor, aot_eager or eager"
            )
        for option, value in (("tf32", tf32), ("cudnn_benchmark", cudnn_benchmark),
                              ("channels_last", channels_last)):
            if not isinstance(value, bool):
                raise ConfigError(
                    f"--model.engine.{option}={value!r} is invalid: use true or false"
                )
        if autocast not in AUTOCAST:
            raise ConfigError(
                f"--model.engine.autocast={autocast!r} is unknown: use 'none' (the model's "
                "dtype) or 'bf16' (bfloat16 autocast of the local step)"
            )
        self.randomness = randomness
        self.compile_backend = compile_backend
        self.tf32 = tf32
        self.cudnn_benchmark = cudnn_benchmark
        self.channels_last = channels_last
        self.autocast = autocast
        self._compiled: dict[tuple, Any] = {}

    def check(self, algorithm: Algorithm, net: nn.Module) -> None:
        """Raise a one-line ``ConfigError`` if this engine cannot run ``algorithm`` on ``net``."""
        reason = unbatchable_reason(algorithm, net, self.randomness)
        if reason is not None:
            raise ConfigError(
                f"--model.engine=BatchedEngine cannot run --model.algorithm="
                f"{type(algorithm).__name__} here: {reason}; or use --model.engine "
                "fl_lightning.engine.SequentialEngine"
            )

    @contextmanager
    def device_options(self) -> Iterator[None]:
        """Set the TF32 and cuDNN flags this engine asks for; restore them afterwards."""
        matmul = torch.backends.cuda.matmul
        saved = (matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
                 torch.backends.cudnn.benchmark)
        try:
            if self.tf32:
                matmul.allow_tf32 = True
                torch.backends.cudnn.allow_tf32 = True
            if self.cudnn_benchmark:
                torch.backends.cudnn.benchmark = True
            yield
        finally:
            (matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark) = saved

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
        state = StackedState([c.state for c in contexts], tuple(algorithm.client_state))
        frozen = algorithm.frozen(ctx)
        names = [k for k in global_params if k not in frozen]
        count = len(clients)
        stacked = {
            k: v.detach().unsqueeze(0).expand(count, *v.shape).clone()
            for k, v in global_params.items()
        }
        # inside the step the round's lr is a 0-d tensor (an input, not a constant), so a
        # direction that reads it (Per-FedAvg) does not specialize a compiled step on its value
        ctx.lr = torch.tensor(lr, dtype=_float_dtype(stacked), device=_device(stacked))
        if self.channels_last:
            stacked = {k: _channels_last(v) for k, v in stacked.items()}
        norms = tracked_batchnorms(net)
        stats = (
            {k: v.detach().unsqueeze(0).expand(count, *v.shape).clone()
             for k, v in buffers.items()} if norms else {}
        )
        with self.device_options():
            if _mixes_samples(net):
                sums = self._grouped_round(algorithm, net, ctx, state, stacked, stats, norms,
                                           names, plan, data, lr, momentum, weight_decay)
            else:
                sums = self._padded_round(algorithm, net, ctx, state, stacked, names, plan,
                                          data, lr, momentum, weight_decay)
        steps = [len(c.batches) for c in clients]
        if sums is None:
            mean_losses = [torch.full((), float("nan"))] * count
        else:
            mean_losses = list((sums / sums.new_tensor(steps).clamp_min(1)).unbind())
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

    # -- static shapes: every client padded to one (clients, batch) shape per step -------------

    def _padded_round(
        self, algorithm: Algorithm, net: nn.Module, ctx: LocalContext, state: StackedState,
        stacked: Params, names: list[str], plan: RoundPlan, data: tuple[Tensor, Tensor],
        lr: float, momentum: float, weight_decay: float,
    ) -> Tensor | None:
        """The round as one vmapped call per local step on padded, masked batches; updates
        ``stacked`` in place and returns every client's sum of step losses."""
        x_all, y_all = data
        device = next(iter(stacked.values())).device
        padded = PaddedRound.build(plan, y_all, device)
        if padded.steps == 0:
            return None
        ctx.padded = True
        ctx.head_names()  # cached before any trace, so a compiled step never sees it change
        augment = padded.augment
        generic = plan.transform if augment is None else None  # any pure transform
        step = self._local_step(algorithm, net, names, momentum, weight_decay)
        if augment is not None and self.compile != "none":
            # one sample augmented eagerly fills the augmentation's per-shape caches, so the
            # compiled step never traces (and guards on) a cache miss
            augment(x_all[padded.index[0, 0, :1]], padded.draws[0, 0, :1])
        bufs = [torch.zeros_like(stacked[k]) for k in names] if momentum != 0.0 else None
        lr_t = ctx.lr
        lr_eager = lr if self.compile == "none" else None  # a Python float would specialize
        sums = None
        values = [stacked[k] for k in names]
        for s in range(padded.steps):
            ctx.step = s
            masked = self.compile != "none" or not padded.everyone[s]
            if generic is not None:  # gathered and augmented per client, outside the step
                x, idx = padded.transform_generic(generic, x_all, s), None
            else:
                x, idx = x_all, padded.index[s]
            values, bufs, loss = step(
                stacked, values, bufs, state.batched, ctx, state, x, idx, padded.labels[s],
                augment, None if padded.draws is None else padded.draws[s],
                padded.active[s] if masked else None, lr_t, lr_eager,
            )
            stacked.update(zip(names, values, strict=True))
            sums = loss if sums is None else sums + loss
        return sums

    def _local_step(self, algorithm: Algorithm, net: nn.Module, names: list[str],
                    momentum: float, weight_decay: float):
        """``step(stacked, values, bufs, batched state, ctx, state, x, idx, y, augment, draws,
        active, lr_t, lr_eager) -> (values, bufs, losses)``: gather the step's batches (rows
        ``idx`` of ``x``) from the round plan, augment them, take every client's direction in
        one vmapped call and the SGD update, masked to the clients that have this step
        (``active``; ``None``: everyone; eager, with ``lr_eager`` given, that update is in
        place). With ``compile`` set it is compiled (``fullgraph``: no graph break) once per
        engine, algorithm, network and SGD configuration, and reused by every later round."""
        fast = algorithm.plain_gradient and self.compile == "none"
        key = (id(algorithm), id(net), tuple(names), momentum, weight_decay, fast)
        if key in self._compiled:  # the entry holds the algorithm and net: ids stay theirs
            return self._compiled[key]
        self._compiled.clear()
        randomness = self.randomness
        autocast = self.autocast == "bf16"
        channels_last = self.channels_last

        def one(params: Params, batched: tuple[Tensor, ...], x: Tensor, y: Tensor,
                ctx: LocalContext, state: StackedState):
            saved = ctx.state  # the client's state for this call only: nothing vmapped
            ctx.state = state.unpack(batched)  # may stay behind in ctx after the call
            try:
                return algorithm.direction(params, x, y, ctx)
            finally:
                ctx.state = saved

        def directions(params, batched, x, y, ctx, state):
            if fast:  # the task gradient: vmap the loss only, one backward of the K losses
                keys = list(params)
                leaves = [params[k].detach().requires_grad_(True) for k in keys]
                loss = torch.vmap(lambda p, xb, yb: algorithm.task_loss(ctx, p, xb, yb),
                                  randomness=randomness)(dict(zip(keys, leaves, strict=True)),
                                                         x, y)
                grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
                return {k: (g if g is not None else torch.zeros_like(v))
                        for k, g, v in zip(keys, grads, leaves, strict=True)}, loss.detach()
            fn = torch.vmap(lambda p, b, xb, yb: one(p, b, xb, yb, ctx, state),
                            in_dims=(0, 0, 0, 0), randomness=randomness)
            return fn(params, batched, x, y)

        def step(stacked, values, bufs, batched, ctx, state, x, idx, y, augment, draws,
                 active, lr_t, lr_eager=None):
            if idx is not None:  # one row gather (index_select: ~6x x[idx] on the CPU)
                x = x.index_select(0, idx.reshape(-1)).view(*idx.shape, *x.shape[1:])
            if augment is not None:
                x = augment(x.flatten(0, 1), draws.flatten(0, 1)).view(x.shape)
            if channels_last:
                x = _channels_last(x)
            params = dict(stacked)
            params.update(zip(names, values, strict=True))
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16,
                                                     enabled=autocast):
                direction, loss = directions(params, batched, x, y, ctx, state)
            with torch.no_grad():
                grads = [direction[k] for k in names]
                if lr_eager is not None and active is None:
                    # eager and every client steps: the sequential engine's in-place update
                    # on the stacked rows (no new K x parameter tensors: ~2x less memory
                    # traffic on the CPU than the out-of-place form)
                    new_bufs = sgd_step(values, grads, bufs, lr_eager, momentum, weight_decay)
                    new_values = values
                else:
                    new_values, new_bufs = _sgd(values, grads, bufs, lr_t, momentum,
                                                weight_decay, active)
                loss = loss.detach().to(lr_t.dtype)
                if active is not None:
                    loss = torch.where(active, loss, torch.zeros_like(loss))
            return new_values, new_bufs, loss

        if self.compile != "none":
            options: dict[str, Any] = {"backend": self.compile_backend, "dynamic": False,
                                       "fullgraph": True}
            if self.compile != "default":
                options["mode"] = self.compile
            step = torch.compile(step, **options)
        self._compiled[key] = step
        return step

    # -- BatchNorm: batch statistics mix samples, so padding is not an option ----------------

    def _grouped_round(
        self, algorithm: Algorithm, net: nn.Module, ctx: LocalContext, state: StackedState,
        stacked: Params, stats: Params, norms: list[nn.Module], names: list[str],
        plan: RoundPlan, data: tuple[Tensor, Tensor], lr: float, momentum: float,
        weight_decay: float,
    ) -> Tensor | None:
        """Models with BatchNorm: one vmapped call per local step and batch size (a padding
        sample would enter the batch statistics); the rows of the clients of each group are
        gathered, stepped and written back."""
        clients = plan.clients
        x_all, y_all = data
        count = len(clients)
        bufs = [torch.zeros_like(stacked[k]) for k in names] if momentum != 0.0 else None
        step_fn, stats_fn = self._step_fn(algorithm, ctx, state, net)
        device = next(iter(stacked.values())).device
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
                if self.channels_last:
                    x = _channels_last(x)
                with torch.autocast(x.device.type, dtype=torch.bfloat16,
                                    enabled=self.autocast == "bf16"):
                    self._update(
                        step_fn, stats_fn, norms, stacked, bufs, stats, names, state, sel,
                        count, x, y, lr, momentum, weight_decay, losses, step,
                    )
        return losses[0]

    def _step_fn(self, algorithm: Algorithm, ctx: LocalContext, state: StackedState,
                 net: nn.Module):
        """The vmapped step ``(params, state rows, x, y) -> (directions, losses)`` and the
        vmapped running-statistics update ``(params, buffers, x) -> buffers``."""

        def stats(params: Params, buffers: Params, x: Tensor) -> Params:
            return running_stats_step(net, params, buffers, x)

        stats_fn = torch.vmap(stats, in_dims=(0, 0, 0), randomness=self.randomness)
        if algorithm.plain_gradient and self.compile == "none" and not state.batched:
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
        if self.compile != "none":
            options: dict[str, Any] = {"backend": self.compile_backend, "dynamic": False}
            if self.compile != "default":
                options["mode"] = self.compile
            fn = torch.compile(fn, **options)
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


def _mixes_samples(net: nn.Module) -> bool:
    """Whether a forward of ``net`` mixes the samples of a batch (training-mode BatchNorm
    normalizes with the batch's statistics, so a padding sample would change the others)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def _float_dtype(stacked: Params) -> torch.dtype:
    return next((v.dtype for v in stacked.values() if v.is_floating_point()),
                torch.get_default_dtype())


def _device(stacked: Params) -> torch.device:
    return next(iter(stacked.values())).device


def _channels_last(t: Tensor) -> Tensor:
    """``t`` with every trailing ``(C, H, W)`` block stored channels-last (the layout
    ``torch.channels_last`` gives a 4-d tensor, for any number of leading batch dimensions);
    other tensors unchanged."""
    if t.ndim < 4:
        return t
    lead = t.ndim - 3
    order = (*range(lead), lead + 1, lead + 2, lead)
    back = (*range(lead), t.ndim - 1, lead, lead + 1)
    return t.permute(order).contiguous().permute(back)


def _sgd(values: list[Tensor], grads: list[Tensor], bufs: list[Tensor] | None, lr: Tensor,
         momentum: float, weight_decay: float, active: Tensor | None,
         ) -> tuple[list[Tensor], list[Tensor] | None]:
    """The SGD step of :func:`~fl_lightning.engine.sgd_step` on stacked rows, out of place:
    ``d = g + wd w``, ``b = m b + d`` (``b = 0`` before the first step, so ``b = d`` there
    exactly), ``w = w - lr b``. Rows where ``active`` is false keep their weights and buffers
    bit for bit (``torch.where`` selects the old values)."""
    if weight_decay != 0.0:
        grads = torch._foreach_add(grads, values, alpha=weight_decay)
    new_bufs = None
    if bufs is not None:
        new_bufs = torch._foreach_add(torch._foreach_mul(bufs, momentum), grads)
        grads = new_bufs
    new = torch._foreach_sub(values, torch._foreach_mul(grads, lr))
    if active is not None:
        def keep(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
            return [torch.where(active.view(-1, *([1] * (n.ndim - 1))), n, o)
                    for n, o in zip(a, b, strict=True)]

        new = keep(new, values)
        if new_bufs is not None:
            new_bufs = keep(new_bufs, bufs)
    return new, new_bufs


class PaddedRound:
    """A round's plan as static-shape device tensors, built once per round.

    With ``S`` the most local steps of any client, ``K`` clients and ``B`` the largest batch:

    Attributes:
        index: ``(S, K, B)`` training-set indices (padding: index 0, any valid sample).
        labels: ``(S, K, B)`` labels, :data:`~fl_lightning.algorithms.base.IGNORE_INDEX` at
            padding samples (a client's short last batch, every sample of a step it does not
            have), so each client's losses average over its real samples only.
        active: ``(S, K)`` whether client ``k`` has a step ``s``.
        everyone: per step, whether every client has it (a host list, from the plan).
        draws: ``(S, K, B, 5)`` augmentation draws of the round (``None`` without the data
            module's augmentation), ``augment`` the function that applies them.
    """

    def __init__(self, plan: RoundPlan, index: Tensor, labels: Tensor, active: Tensor,
                 everyone: list[bool], lengths: list[int], draws: Tensor | None,
                 augment: Any) -> None:
        self.plan = plan
        self.index, self.labels, self.active, self.everyone = index, labels, active, everyone
        self.lengths = lengths
        self.draws, self.augment = draws, augment
        self.steps = index.shape[0]

    @classmethod
    def build(cls, plan: RoundPlan, y_all: Tensor, device: torch.device) -> PaddedRound:
        clients = plan.clients
        count = len(clients)
        steps = max(len(c.batches) for c in clients)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        seqs = [clients[k].batches[s].to(device) if s < len(clients[k].batches) else empty
                for s in range(steps) for k in range(count)]
        lengths = [len(q) for q in seqs]
        if steps == 0 or max(lengths) == 0:
            z = torch.zeros(0, count, 0, dtype=torch.long, device=device)
            return cls(plan, z, z, torch.zeros(0, count, dtype=torch.bool, device=device), [],
                       [], None, None)
        index = pad_sequence(seqs, batch_first=True, padding_value=0)
        width = index.shape[1]
        n = torch.tensor(lengths, device=device)
        valid = torch.arange(width, device=device) < n.unsqueeze(1)
        labels = torch.where(valid, y_all[index], torch.full_like(index, IGNORE_INDEX))
        everyone = [all(s < len(c.batches) for c in clients) for s in range(steps)]
        draws, augment = cls._draws(plan, lengths, steps, width, device)
        return cls(plan, index.view(steps, count, width), labels.view(steps, count, width),
                   (n > 0).view(steps, count), everyone, lengths,
                   None if draws is None else draws.view(steps, count, width, -1), augment)

    @staticmethod
    def _draws(plan: RoundPlan, lengths: list[int], steps: int, width: int,
               device: torch.device) -> tuple[Tensor | None, Any]:
        """The round's augmentation draws padded like the indices, when the transform is the
        data module's (:class:`~fl_lightning.data.module.RoundAugmentation` of this round)."""
        transform = plan.transform
        augment = getattr(transform, "augmentation", None)
        if (transform is None or not callable(getattr(transform, "step_draws", None))
                or getattr(transform, "round", None) != plan.round or augment is None):
            return None, None
        count = len(plan.clients)
        parts = []
        for j, size in enumerate(lengths):
            s, k = divmod(j, count)
            if size == 0:
                parts.append(torch.zeros(0, 5, dtype=torch.long, device=device))
                continue
            d = transform.step_draws(plan.clients[k].client_id, s, size)
            if d is None or d.device != device:
                return None, None
            parts.append(d)
        return pad_sequence(parts, batch_first=True, padding_value=0), augment

    def transform_generic(self, transform: Any, x_all: Tensor, step: int) -> Tensor:
        """Step ``step``'s padded batches ``(K, B, ...)`` with a generic pure ``transform``
        applied to each client's real samples (host work per client: the data module's
        augmentation takes the device path instead)."""
        x = x_all[self.index[step]]
        count = len(self.plan.clients)
        rows = []
        for k, client in enumerate(self.plan.clients):
            n = self.lengths[step * count + k]
            if n == 0:
                rows.append(x[k])
                continue
            real = transform(x[k, :n], self.plan.round, client.client_id, step)
            rows.append(torch.cat([real, x[k, n:]]) if n < x.shape[1] else real)
        return torch.stack(rows)
