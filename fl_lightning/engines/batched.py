"""``BatchedEngine``: all sampled clients of a round trained at once with ``torch.vmap``.

The engine's options and round set-up live here; the vmapped local step and the two ways a
round runs it are in :mod:`fl_lightning.engines.vmapped`, the stacked per-round data in
:mod:`fl_lightning.engines.stacked`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext, Params
from fl_lightning.engines.base import COMPILE_MODES, ClientEngine, compile_mode
from fl_lightning.engines.sequential import tracked_batchnorms
from fl_lightning.engines.stacked import (
    PaddedRound,
    StackedState,
    device_of,
    float_dtype,
    mixes_samples,
    to_channels_last,
)
from fl_lightning.engines.vmapped import grouped_round, padded_round
from fl_lightning.errors import ConfigError
from fl_lightning.memory import activation_bytes, available_memory, parse_bytes, tensor_bytes
from fl_lightning.validate import boolean, choice, conflict, integer, invalid

if TYPE_CHECKING:
    from fl_lightning.protocol import RoundPlan

__all__ = ["AUTOCAST", "COMPILE_MODES", "RANDOMNESS", "BatchedEngine", "PaddedRound",
           "StackedState", "unbatchable_reason"]

RANDOMNESS = ("error", "different")
AUTOCAST = ("none", "bf16")


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


def check_compile_backend(name: str) -> None:
    """Raise a one-line ``ConfigError`` listing the available ``torch.compile`` backends
    (``torch._dynamo.list_backends``) unless ``name`` is one (checked before any round: an
    unknown name otherwise fails in the first compiled step with a long traceback)."""
    import torch._dynamo  # only for a backend other than the default: ~1.5 s to import

    names = [b for b in torch._dynamo.list_backends(exclude_tags=()) if "TESTING" not in b]
    if name not in names:
        close = difflib.get_close_matches(name, names, n=1)
        raise invalid("--model.engine.compile_backend", name,
                      f"one of the available torch.compile backends: {', '.join(names)}",
                      f"did you mean {close[0]}?" if close else None)


class BatchedEngine(ClientEngine):
    """Trains all sampled clients of a round at once: ``torch.vmap`` over stacked weights.

    The clients' weights and SGD momentum buffers are stacked into tensors of shape
    ``(K, ...)``; at local step ``s`` the algorithm's ``direction(w_k, x_k, y_k, ctx_k)`` runs for
    every client ``k`` that still has a step ``s`` in one vmapped call, followed by the same SGD
    update as the sequential engine (:func:`~fl_lightning.engines.base.sgd_update`):

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
        max_clients_per_chunk: train at most this many clients at once (unset: no cap); the
            round's clients are trained chunk after chunk, each chunk's results handed to
            the round (streamed) before the next starts.
        memory_budget: bytes a chunk may take (``2GiB``, ``500MB``, an int; ``auto``/unset:
            80 % of the free GPU memory on a GPU, 50 % of the available memory on the CPU,
            see :meth:`budget`); the chunk holds as many clients as
            :meth:`client_bytes` estimates fit. Chunking gives the same clients' results
            as one chunk (up to floating-point rounding of batched kernels; equal within
            1e-12 in float64, ``tests/test_stream.py``).
        tail_rows: once at most this many clients of a round still have local steps, the
            lock-step stops and they finish as plain steps, one client after another
            (:mod:`~fl_lightning.engines.tails`; eager only, models without BatchNorm): with
            heavy-tailed client sizes most of a round's lock-step steps have a few live rows,
            and on the CPU a small model's vmapped step costs several plain ones. ``auto``
            (default): a tenth of the chunk's clients (at least 1) on the CPU, 1 on a GPU
            (:meth:`tail_rows_on`); ``0``: the lock-step runs every step.

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
        max_clients_per_chunk: int | None = None,
        memory_budget: int | str | None = None,
        tail_rows: int | str | None = None,
    ) -> None:
        self.compile = compile_mode(compile)
        self.tail_rows = (None if tail_rows in (None, "auto") else
                          integer(tail_rows, "--model.engine.tail_rows", 0,
                                  hint="or auto: a tenth of the clients on the CPU, 1 on a GPU"))
        if max_clients_per_chunk is not None:
            max_clients_per_chunk = integer(max_clients_per_chunk,
                                            "--model.engine.max_clients_per_chunk", 1)
        self.max_clients_per_chunk = max_clients_per_chunk
        self.memory_budget = (None if memory_budget in (None, "auto") else
                              parse_bytes(memory_budget, "--model.engine.memory_budget"))
        self.last_chunk_size: int | None = None
        self._activations: dict[tuple, int] = {}
        choice(randomness, "--model.engine.randomness", RANDOMNESS,
               "'error' rejects dropout, 'different' draws per-client dropout masks")
        if not (isinstance(compile_backend, str) and compile_backend) and not callable(
                compile_backend):
            raise invalid("--model.engine.compile_backend", compile_backend,
                          "a torch.compile backend name", "e.g. inductor, aot_eager or eager")
        if isinstance(compile_backend, str) and compile_backend != "inductor":
            check_compile_backend(compile_backend)
        for option, value in (("tf32", tf32), ("cudnn_benchmark", cudnn_benchmark),
                              ("channels_last", channels_last)):
            boolean(value, f"--model.engine.{option}")
        choice(autocast, "--model.engine.autocast", AUTOCAST,
               "'none' keeps the model's dtype, 'bf16' autocasts the local step to bfloat16")
        self.randomness = randomness
        self.compile_backend = compile_backend
        self.tf32 = tf32
        self.cudnn_benchmark = cudnn_benchmark
        self.channels_last = channels_last
        self.autocast = autocast
        self._compiled: dict[tuple, Any] = {}

    def tail_rows_on(self, device: torch.device, clients: int) -> int:
        """``tail_rows`` for a chunk of ``clients`` on ``device``; ``auto``: on the CPU
        ``clients // 10`` (at least 1): a vmapped step of the logistic regression over 80 rows
        costs ~4-6 plain steps there (a round of 8 FedProx replicas x 10 clients on the
        synthetic data: 13.7 s of CPU with the lock-step to the end, 10.0 s with 2, 8.3 s
        with 8; ``docs/benchmarks.md``, "Sweeps"); on a GPU 1 (a vmapped step costs about
        one plain step there)."""
        if self.tail_rows is not None:
            return self.tail_rows
        return 1 if device.type == "cuda" else max(1, clients // 10)

    def check(self, algorithm: Algorithm, net: nn.Module) -> None:
        """Raise a one-line ``ConfigError`` if this engine cannot run ``algorithm`` on ``net``."""
        reason = unbatchable_reason(algorithm, net, self.randomness)
        if reason is not None:
            raise conflict("--model.engine=BatchedEngine",
                           f"--model.algorithm={type(algorithm).__name__} here", reason,
                           "or use --model.engine SequentialEngine")

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
        sink: Callable[[list[ClientResult]], None] | None = None,
    ) -> list[ClientResult]:
        """Run local training for every client of ``plan`` at once; one result per client
        (with a ``sink``: given to it, ``[]`` returned)."""
        self.check(algorithm, net)
        if not plan.clients:
            return []
        if any(c.lrs is not None for c in plan.clients):
            raise ConfigError(
                "the batched engine trains every client at the round's learning rate: per-step "
                "learning rates (ClientPlan.lrs) need --model.engine sequential"
            )
        size = self.chunk_size(algorithm, net, global_params, plan, data, momentum)
        self.last_chunk_size = size
        results: list[ClientResult] = []
        for start in range(0, len(plan.clients), size):
            chunk = dataclasses.replace(plan, clients=plan.clients[start:start + size])
            done = self._run_chunk(algorithm, net, global_params, buffers, chunk, data, lr,
                                   momentum, weight_decay)
            if sink is None:
                results.extend(done)
            else:
                sink(done)
            del done
        return results

    def client_bytes(self, algorithm: Algorithm, net: nn.Module, global_params: Params,
                     plan: RoundPlan, data: tuple[Tensor, Tensor], momentum: float) -> int:
        """Estimated bytes one client takes in a chunk: its stacked weights, direction and
        new weights (3x the model), momentum buffers (+1x), its state entries and what it
        sends the server (+2x each), BatchNorm statistics, and twice the activations of a
        batch (:func:`~fl_lightning.memory.activation_bytes`, measured once per input
        shape and batch size)."""
        weights = tensor_bytes(global_params.values())
        copies = 3 + (momentum != 0.0) + 2 * len(algorithm.client_state)
        batch = max((len(c.batches[0]) for c in plan.clients if c.batches), default=1)
        x = data[0]
        key = (id(net), tuple(x.shape[1:]), x.dtype, batch)
        if key not in self._activations:
            self._activations = {key: activation_bytes(net, x[:1]) * batch}
        buffers = tensor_bytes(b for _, b in net.named_buffers())
        return weights * copies + buffers + 2 * self._activations[key]

    def chunk_size(self, algorithm: Algorithm, net: nn.Module, global_params: Params,
                   plan: RoundPlan, data: tuple[Tensor, Tensor], momentum: float) -> int:
        """Clients trained at once: at most ``max_clients_per_chunk``, and as many as
        :meth:`client_bytes` lets fit in the memory budget (at least one)."""
        size = len(plan.clients)
        if self.max_clients_per_chunk is not None:
            size = min(size, self.max_clients_per_chunk)
        budget = self.budget(device_of(global_params))
        if budget is not None and size > 1:
            per = self.client_bytes(algorithm, net, global_params, plan, data, momentum)
            size = max(1, min(size, budget // max(per, 1)))
        return size

    def budget(self, device: torch.device) -> int | None:
        """The bytes a chunk may take: ``memory_budget`` if set, else (``auto``) 80 % of the
        free GPU memory on a GPU and 50 % of the available memory on the CPU
        (:func:`~fl_lightning.memory.available_memory`; ``None`` if unknown)."""
        if self.memory_budget is not None:
            return self.memory_budget
        free, _ = available_memory(device)
        if free is None:
            return None
        return int(free * (0.8 if device.type == "cuda" else 0.5))

    def _run_chunk(self, algorithm: Algorithm, net: nn.Module, global_params: Params,
                   buffers: Params, plan: RoundPlan, data: tuple[Tensor, Tensor], lr: float,
                   momentum: float, weight_decay: float) -> list[ClientResult]:
        """Train the clients of ``plan`` (one chunk) at once; one result per client."""
        clients = plan.clients

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
        stacked = _stack(global_params, len(clients))
        # inside the step the round's lr is a 0-d tensor (an input, not a constant), so a
        # direction that reads it (Per-FedAvg) does not specialize a compiled step on its value
        ctx.lr = torch.tensor(lr, dtype=float_dtype(stacked), device=device_of(stacked))
        if self.channels_last:
            stacked = {k: to_channels_last(v) for k, v in stacked.items()}
        norms = tracked_batchnorms(net)
        stats = _stack(buffers, len(clients)) if norms else {}
        with self.device_options():
            if mixes_samples(net):
                sums = grouped_round(self, algorithm, net, ctx, state, stacked, stats, norms,
                                     names, plan, data, lr, momentum, weight_decay)
            else:
                sums = padded_round(self, algorithm, net, ctx, state, stacked, names, plan,
                                    data, lr, momentum, weight_decay)
        return _results(algorithm, contexts, plan, stacked, stats, sums)


def _stack(tensors: Params, count: int) -> Params:
    """Every tensor repeated ``count`` times along a new first dimension (a fresh copy)."""
    return {k: v.detach().unsqueeze(0).expand(count, *v.shape).clone()
            for k, v in tensors.items()}


def _results(algorithm: Algorithm, contexts: list[LocalContext], plan: RoundPlan,
             stacked: Params, stats: Params, sums: Tensor | None) -> list[ClientResult]:
    """One :class:`ClientResult` per client from its rows of the stacked weights, running
    statistics and loss sums (the mean over its steps; NaN without a step), after
    :meth:`Algorithm.client_end` has seen it."""
    clients = plan.clients
    steps = [len(c.batches) for c in clients]
    if sums is None:
        mean_losses = [torch.full((), float("nan"))] * len(clients)
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
