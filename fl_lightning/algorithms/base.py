"""What an algorithm is: a local update direction, optional client state, a server rule.

An algorithm never touches an optimizer, a data loader or a device. The client engine owns the
local optimizer (SGD with momentum and weight decay, fresh per client per round) and calls
:meth:`Algorithm.direction` once per local step with the client's current weights as a dict of
plain tensors; the direction it returns is what the optimizer applies. Writing the step as a
function of tensors (``torch.func``) lets the same code run one client at a time or many at once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value

from fl_lightning.errors import ConfigError

__all__ = [
    "Algorithm",
    "ClientResult",
    "LocalContext",
    "Params",
    "check_nonnegative",
    "check_positive",
    "finish_round",
    "head_parameter_names",
    "weighted_mean",
]

Params = dict[str, Tensor]


def head_parameter_names(net: nn.Module) -> list[str]:
    """Names of the parameters of ``net``'s last child module (its classifier head).

    The official FedSoL code uses the same convention ("the last entry of named_children").
    """
    children = list(net.named_children())
    if not children:
        return []
    head = children[-1][0]
    return [name for name, _ in net.named_parameters() if name.split(".", 1)[0] == head]


@dataclass
class LocalContext:
    """Everything a local step may read about the client and the round.

    Attributes:
        net: the global model's module, used only as a stateless function through
            :meth:`forward`.
        global_params: the weights the server sent this round (read-only).
        buffers: the module's buffers (e.g. BatchNorm statistics), passed to every call.
        round: index of the communication round, from 0.
        client_id: the client's id in the partition.
        step: index of the local step within this client's round, from 0.
        lr: this round's local learning rate.
        momentum: the local SGD momentum (SCAFFOLD's and FedNova's step corrections use it).
        num_clients: number of clients in the whole population (``None`` if unknown).
        total_samples: training samples over the whole population (``None`` if unknown).
        state: the client's persistent state (algorithms that keep none leave it empty).
    """

    net: nn.Module
    global_params: Params
    buffers: Params
    round: int
    client_id: int
    lr: float
    step: int = 0
    momentum: float = 0.0
    num_clients: int | None = None
    total_samples: int | None = None
    state: dict[str, Any] = field(default_factory=dict)
    _head: list[str] | None = field(default=None, repr=False)

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Logits of the network at ``params`` on ``x``."""
        return functional_call(self.net, (dict(params), self.buffers), (x,))

    def head_names(self) -> list[str]:
        if self._head is None:
            self._head = head_parameter_names(self.net)
        return self._head

    def select(self, params: Params, head: bool, body: bool) -> list[str]:
        """Names of the parameters in the head and/or the body of the network."""
        head_names = set(self.head_names())
        return [k for k in params if (k in head_names and head) or (k not in head_names and body)]


@dataclass
class ClientResult:
    """What one client sends back after its local training.

    Attributes:
        client_id: the client's id.
        num_samples: size of the client's training set (the aggregation weight).
        params: the client's weights after local training.
        num_steps: local steps taken.
        loss: mean training loss over the local steps (a 0-d tensor).
        state: the client's new persistent state after this round, one ``Params`` dict per
            entry the algorithm declares in :attr:`Algorithm.client_state` (e.g.
            ``{"c_i": ...}`` for SCAFFOLD). Filled by :meth:`Algorithm.client_end`; the round
            loop stores it with :meth:`Algorithm.commit_client` only if the client is kept.
        extras: what the client sends the server besides its weights (SCAFFOLD's
            ``delta_c``, FedDyn's ``move``, FedNova's ``a`` and ``d_i``); the server rule
            :meth:`Algorithm.aggregate` reads it.
    """

    client_id: int
    num_samples: int
    params: Params
    num_steps: int
    loss: Tensor
    state: dict[str, Params] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)


def check_nonnegative(name: str, value: float, option: str) -> float:
    """``value`` as a float if it is finite and >= 0, else a one-line ``ConfigError``."""
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ConfigError(
            f"{option}={value!r} is invalid: {name} must be a finite number >= 0 "
            f"(e.g. {option}=0.1)"
        )
    return value


def check_positive(name: str, value: float, option: str, hint: str) -> float:
    """``value`` as a float if it is finite and > 0, else a one-line ``ConfigError``
    ending in ``hint`` (e.g. the paper's value)."""
    value = float(value)
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{option}={value!r} is invalid: {name} must be > 0 ({hint})")
    return value


def cross_entropy_loss(ctx: LocalContext, params: Params, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(ctx.forward(params, x), y)


class Algorithm:
    """Federated averaging; the base class of every algorithm.

    The local step minimizes the cross-entropy ``CE(f(w; x), y)`` of the mini-batch; the
    direction handed to the local optimizer is its gradient. The server averages the client
    weights in proportion to their training-set sizes ``n_k``:
    ``w_avg = sum_k n_k w_k / sum_k n_k`` over the clients sampled this round.

    Subclasses override :meth:`direction` (the local update direction), optionally
    :meth:`client_begin` / :meth:`client_end` (client state) and :meth:`aggregate` (server rule),
    and declare what they need in three class attributes (an instance may override them in
    ``__init__``, as FedSoL does with its proximal source's):

    Attributes:
        client_state: names of the per-client state entries kept between rounds (SCAFFOLD:
            ``("c_i",)``); empty when clients are stateless.
        server_rule: ``"mean"`` when :meth:`aggregate` is the data-size weighted mean of the
            client weights (DDP computes it as one flat all-reduce; robust aggregators, DP and
            secure aggregation may replace it); ``"custom"`` when it needs more (the extras).
        batchable: whether the batched engine (``torch.vmap`` over clients) can run it.

    The life of a client in a round: :meth:`client_begin` reads its stored state into
    ``ctx.state``; the engine calls :meth:`direction` at every local step;
    :meth:`client_end` writes the new state and the server-bound extras into the
    :class:`ClientResult`; the round loop drops diverged clients, calls
    :meth:`commit_client` for the others, then :meth:`aggregate`. ``client_begin`` and
    ``client_end`` never change the algorithm, so a skipped client leaves no trace.

    Example:
        >>> algo = Algorithm()
        >>> algo.name, algo.client_state, algo.server_rule, algo.batchable
        ('fedavg', (), 'mean', True)
    """

    name = "fedavg"
    client_state: tuple[str, ...] = ()
    server_rule: str = "mean"
    batchable: bool = True

    def task_loss(self, ctx: LocalContext, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """The client's own objective on a batch: the cross-entropy ``CE(f(w; x), y)``.

        Every algorithm builds its direction from this loss, so a subclass that overrides it
        (e.g. a least-squares loss in tests) changes the task and nothing else.
        """
        return cross_entropy_loss(ctx, params, x, y)

    def task_grad(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Gradient of :meth:`task_loss` w.r.t. every parameter, and the loss."""
        return grad_and_value(lambda p: self.task_loss(ctx, p, x, y))(params)

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Return the local update direction at ``params`` for the batch, and the batch loss."""
        return self.task_grad(params, x, y, ctx)

    def frozen(self, ctx: LocalContext) -> set[str]:
        """Names of parameters the local optimizer must not touch this round (default none)."""
        del ctx
        return set()

    def client_begin(self, ctx: LocalContext) -> None:
        """Called before a client's first local step: read its stored state into ``ctx.state``
        (never change the algorithm here)."""

    def client_end(self, ctx: LocalContext, result: ClientResult) -> None:
        """Called after a client's last local step: fill ``result.state`` (the client's new
        state) and ``result.extras`` (what the server rule needs); never change the
        algorithm here."""

    def commit_client(self, result: ClientResult) -> None:
        """Store ``result.state`` as the client's state; called by the round loop only for
        clients whose update is kept (finite). Stateful algorithms keep a
        :class:`~fl_lightning.algorithms.state.ClientStateStore` in ``self.clients``."""
        if result.state:
            self.clients.put(result.client_id, result.state)

    def aggregate(
        self,
        global_params: Params,
        results: Sequence[ClientResult],
        *,
        num_clients: int | None = None,
        total_samples: int | None = None,
    ) -> Params:
        """New global weights from the clients' results: the data-size weighted average.

        ``num_clients`` and ``total_samples`` describe the whole population (sampled or not);
        server rules such as SCAFFOLD's and FedDyn's need them.
        """
        del num_clients, total_samples
        return weighted_mean(global_params, results)

    # Client state lives in checkpoints: algorithms with state override these two.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        del state


def finish_round(
    algorithm: Algorithm,
    global_params: Params,
    results: Sequence[ClientResult],
    *,
    num_clients: int | None = None,
    total_samples: int | None = None,
) -> Params:
    """The server side of a round without systems mechanisms: commit every client's new state
    (:meth:`Algorithm.commit_client`), then return the server rule's aggregate."""
    for r in results:
        algorithm.commit_client(r)
    return algorithm.aggregate(
        global_params, results, num_clients=num_clients, total_samples=total_samples
    )


def weighted_mean(global_params: Params, results: Sequence[ClientResult]) -> Params:
    """``sum_k n_k w_k / sum_k n_k`` over the results, for every entry of ``global_params``."""
    sizes = torch.tensor([float(r.num_samples) for r in results])
    weights = (sizes / sizes.sum()).tolist()
    out: Params = {}
    for name in global_params:
        acc = results[0].params[name] * weights[0]
        for w, r in zip(weights[1:], results[1:], strict=True):
            acc = acc + r.params[name] * w
        out[name] = acc
    return out


def grad_of(loss_fn, params: Params, names: Sequence[str]) -> tuple[Params, Tensor]:
    """Gradient of ``loss_fn(params)`` w.r.t. the parameters in ``names`` only, and the loss."""
    if len(names) == len(params):
        return grad_and_value(loss_fn)(params)

    def partial(sub: Params) -> Tensor:
        return loss_fn({**params, **sub})

    return grad_and_value(partial)({k: params[k] for k in names})


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm over all entries of all tensors (computed as the norm of per-tensor norms)."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
