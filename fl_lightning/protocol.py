"""The types that cross a boundary of the round: one home for every message.

A round (:class:`fl_lightning.round.FederatedRound`) moves these between its parts:

- the data module plans it: a :class:`RoundPlan` of :class:`ClientPlan` (with an optional
  :data:`BatchTransform`); the systems mechanisms add a :class:`RoundSystems` record;
- a client engine trains each planned client: the algorithm's local step reads a
  :class:`LocalContext`, the local optimizer is a :class:`LocalOptim`, and each client sends
  back a :class:`ClientResult` (under DDP the all-gather's cost is a :class:`GatherCost`);
- callbacks read the round's :class:`RoundResult`.

This module imports neither an engine nor an algorithm, so data, systems, engines, algorithms
and the Flower apps all import their messages from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "BatchTransform",
    "ClientPlan",
    "ClientResult",
    "GatherCost",
    "LocalContext",
    "LocalOptim",
    "Params",
    "RoundPlan",
    "RoundResult",
    "RoundSystems",
]

#: A set of named tensors (weights, buffers, a state entry), as ``named_parameters`` gives them.
Params = dict[str, Tensor]


#: ``(in_transform, swapped_call)`` of :mod:`fl_lightning.algorithms.base`, which imports this
#: module: looked up once, on the first :meth:`LocalContext.forward` (a per-call import costs
#: about a microsecond, a sizeable share of a tiny model's forward)
_CALL_HELPERS: tuple[Callable[[], bool], Callable[..., Tensor]] | None = None


def _call_helpers() -> tuple[Callable[[], bool], Callable[..., Tensor]]:
    global _CALL_HELPERS
    from fl_lightning.algorithms.base import in_transform, swapped_call

    _CALL_HELPERS = (in_transform, swapped_call)
    return _CALL_HELPERS


@dataclass(frozen=True)
class LocalOptim:
    """The local optimizer of a round: SGD with momentum and weight decay, fresh per client.

    In PyTorch's convention (``d = g + weight_decay * w``; ``b = d`` at the first step, then
    ``b = momentum * b + d``; ``w = w - lr * b``).

    Attributes:
        lr: the round's local learning rate.
        momentum: the SGD momentum (0: none).
        weight_decay: the L2 coefficient added to the direction (0: none).

    Example:
        >>> LocalOptim(0.01, momentum=0.9).weight_decay
        0.0
    """

    lr: float
    momentum: float = 0.0
    weight_decay: float = 0.0


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
        padded: the batches may hold padding samples, labelled :data:`IGNORE_INDEX` (the
            batched engine's static shapes); a direction that splits its batch (Per-FedAvg)
            must then split the real samples, and every batch mean must skip the padding
            (:func:`batch_mean`).
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
    padded: bool = False
    _head: list[str] | None = field(default=None, repr=False)

    def forward(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Logits of the network at ``params`` on ``x``."""
        in_transform, swapped_call = _CALL_HELPERS or _call_helpers()
        if in_transform():
            return functional_call(self.net, (dict(params), self.buffers), (x,))
        return swapped_call(self.net, params, self.buffers, x)

    def head_names(self) -> list[str]:
        """Names of the parameters of the network's classifier head (its last child)."""
        from fl_lightning.algorithms.base import head_parameter_names

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
        buffers: the client's module buffers after local training (BatchNorm running
            statistics, kept per client; empty for models without them); the round loop sets
            the global buffers to their data-size weighted mean.
    """

    client_id: int
    num_samples: int
    params: Params
    num_steps: int
    loss: Tensor
    state: dict[str, Params] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    buffers: Params = field(default_factory=dict)


@dataclass
class ClientPlan:
    """One client's work in a round.

    Attributes:
        client_id: the client's id in the partition.
        num_samples: size of its training set (its aggregation weight).
        batches: one tensor of training-set indices per local step, in order.
        lrs: optional learning rate of every local step (one per batch), replacing the round's
            learning rate (and ``LocalContext.lr``) step by step, e.g. the per-epoch decay of
            LocalOnly's fine-tuning; :class:`~fl_lightning.engine.SequentialEngine` only.
        work: share of its local steps the client runs: below 1 for a straggler of
            ``--model.participation`` (whose ``batches`` the round has already cut); an
            engine whose clients plan their own batches where the data is (a Flower node)
            sends it so that the client cuts them the same way.
    """

    client_id: int
    num_samples: int
    batches: list[Tensor]
    lrs: list[float] | None = None
    work: float = 1.0


#: ``transform(x, round, client_id, step) -> x``: batch augmentation applied by the engine.
BatchTransform = Callable[[Tensor, int, int, int], Tensor]


@dataclass
class RoundPlan:
    """Which clients train in a round and which samples each sees at each local step.

    Attributes:
        round: index of the round.
        clients: the sampled clients' plans.
        transform: optional training-batch augmentation; the engine calls
            ``transform(x_all[idx], round, client_id, step)`` on every local batch (it must be a
            pure function of its arguments so that resumed runs stay exact).
        num_clients: size of the whole population (sampled or not); ``None`` when unknown.
        total_samples: training samples of the whole population; ``None`` when unknown.
            Server rules such as SCAFFOLD's and FedDyn's need these two. An engine that
            learns the population during the round (:class:`~fl_lightning.flower.FlowerEngine`,
            from the nodes' first replies) fills ``total_samples`` in.
    """

    round: int
    clients: list[ClientPlan]
    transform: BatchTransform | None = None
    num_clients: int | None = None
    total_samples: int | None = None


@dataclass
class RoundSystems:
    """What the systems mechanisms decided in a round (also its logged metrics): what
    :meth:`fl_lightning.systems.Systems.begin_round` returns.

    Attributes:
        round: index of the round.
        seed: the data seed (every draw is a pure function of it, the round and the client).
        sampled: ids of all sampled clients, before dropouts (secure aggregation's participants).
        dropped: sampled clients that dropped out before training.
        stragglers: sampled clients that ran only part of their local steps.
        expected_clients: clients sampled per round (DP's fixed denominator ``m``).
        sample_rate: ``m / N`` (the DP accountant's sampling rate).
        metrics: what is logged for the round (``stragglers``, ``dropped_clients``, ...).
    """

    round: int
    seed: int
    sampled: list[int]
    dropped: list[int] = field(default_factory=list)
    stragglers: list[int] = field(default_factory=list)
    expected_clients: int = 1
    sample_rate: float = 1.0
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class GatherCost:
    """What a DDP round moved between ranks: the all-gather of client results
    (:func:`fl_lightning.distributed.allgather_results`) or the all-reduce of the round's sums
    (:func:`fl_lightning.distributed.allreduce_sums`); the other one is 0.

    Attributes:
        tensor_bytes: bytes each rank received through the tensor all-gathers
            (``world_size * max_r(payload_r)`` per dtype, own share and padding included).
        payload_bytes: bytes of tensors the clients of all ranks actually produced.
        reduce_bytes: bytes each rank contributed to the all-reduce of the sums.
    """

    tensor_bytes: int = 0
    payload_bytes: int = 0
    reduce_bytes: int = 0


@dataclass
class RoundResult:
    """What one communication round produced.

    Attributes:
        round: index of the round, from 0.
        lr: local learning rate used by the clients.
        client_ids: ids of the clients that reported, in the order they trained.
        client_sizes: their training-set sizes (aggregation weights).
        clients: their :class:`ClientResult` (weights after local training, steps, mean
            loss).
        global_before: global weights sent to the clients.
        aggregate: the server rule's output (the average for FedAvg) before the server optimizer.
        global_after: global weights after the server optimizer step.
        train_loss: mean over clients of their mean local training loss.
        skipped_clients: ids of clients left out because their update was not finite
            (``--model.on_nonfinite skip_client``).
        systems: the round's systems metrics (``stragglers``, ``dropped_clients``,
            ``malicious_clients``, ``bytes_up``, ``epsilon``); empty without
            :mod:`fl_lightning.systems` options.
        sampled: ``(client_id, num_samples)`` of every client sampled in the round (all ranks,
            before dropouts).
        stragglers: ids of sampled clients that ran only part of their local steps.
        dropped: ids of sampled clients that dropped out before training (participation
            dropouts, and clients the engine got no result from, e.g. a lost Flower node).
        gather_cost: under DDP, what the all-gather of client results or the all-reduce of the
            round's sums moved (``None``: one process).
    """

    round: int
    lr: float
    client_ids: list[int]
    client_sizes: list[int]
    clients: list[ClientResult]
    global_before: Params
    aggregate: Params
    global_after: Params
    train_loss: Tensor
    skipped_clients: list[int] = field(default_factory=list)
    systems: dict[str, float] = field(default_factory=dict)
    sampled: list[tuple[int, int]] = field(default_factory=list)
    stragglers: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    gather_cost: GatherCost | None = None
