"""``FlowerEngine``: a Flower federation as one more client engine of the round.

On the server of a Flower deployment the round is the very same
:class:`~fl_lightning.round.FederatedRound` as ``fl-lightning fit``'s: it samples with the data
module's seeded sampler, applies ``--model.participation``, screens non-finite clients,
combines with the algorithm's server rule and steps the server optimizer. Only two parts
differ: the population (:class:`NodePopulation`: the sampled clients without their batches,
since the server holds no training data; sizes learnt from the nodes) and the engine
(:class:`FlowerEngine`: its :meth:`~FlowerEngine.run_round` sends each planned client's
SuperNode the round's message and turns the replies into
:class:`~fl_lightning.protocol.ClientResult`; a lost or failed node returns nothing, which the
round records as a participation dropout).
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Message, RecordDict

from fl_lightning.flower.records import (
    extras_from_content,
    params_from_record,
    params_to_record,
    record_bytes,
)
from fl_lightning.protocol import ClientPlan, ClientResult, LocalContext, Params, RoundPlan

if TYPE_CHECKING:
    import torch
    from flwr.serverapp import Grid
    from torch import Tensor, nn

    from fl_lightning.algorithms.base import Algorithm

__all__ = ["FederationError", "FlowerEngine", "NodePopulation"]

POLL_S = 0.2
# replies are polled at first every FIRST_POLL_S, then ever less often, up to every MAX_POLL_S:
# a local round takes seconds, and every poll is a request the SuperLink serves
FIRST_POLL_S, MAX_POLL_S = 0.1, 1.0


class FederationError(RuntimeError):
    """The federation cannot run the configured experiment (one line says why)."""


def _exchange(
    grid: Grid, messages: dict[int, Message], timeout: float
) -> tuple[dict[int, Message], dict[int, str]]:
    """Push one message per client, poll for the replies until all arrived or ``timeout``.

    Returns ``(replies, failures)`` keyed by client id; a failure says why (Flower's error,
    e.g. the node went offline, or no reply in time).
    """
    keys = list(messages)
    ids = list(grid.push_messages([messages[k] for k in keys]))
    pending = {mid: k for mid, k in zip(ids, keys, strict=True) if mid}
    failures = {k: "the message could not be pushed" for mid, k in zip(ids, keys, strict=True)
                if not mid}
    replies: dict[int, Message] = {}
    deadline = time.monotonic() + timeout
    wait = FIRST_POLL_S
    while pending:
        for reply in grid.pull_messages(list(pending)):
            key = pending.pop(reply.metadata.reply_to_message_id, None)
            if key is None:
                continue
            if reply.has_error():  # Flower's own: the node went away, the app crashed
                failures[key] = f"error {reply.error.code}: {reply.error.reason}"
            elif "error" in reply.content:  # the ClientApp's: what failed on the node
                failures[key] = str(reply.content["error"]["reason"])
            else:
                replies[key] = reply
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(wait)
        wait = min(MAX_POLL_S, wait * 1.5)
    for key in pending.values():
        failures[key] = f"no reply within round-timeout={timeout:g} s"
    return replies, failures


def wait_for_nodes(grid: Grid, num_clients: int, wait_s: float) -> list[int]:
    """The connected SuperNodes, once there are ``num_clients`` of them (or an error)."""
    deadline = time.monotonic() + wait_s
    while len(list(grid.get_node_ids())) < num_clients and time.monotonic() < deadline:
        time.sleep(POLL_S)
    nodes = list(grid.get_node_ids())
    if len(nodes) < num_clients:
        raise FederationError(
            f"only {len(nodes)} SuperNode(s) connected within wait-nodes-timeout={wait_s:g} s "
            f"but --data.num_clients={num_clients}: start one SuperNode per partition "
            f"(--node-config \"partition-id=K num-partitions={num_clients}\")"
        )
    return nodes


def _server_state(algorithm: Algorithm) -> dict[str, Any]:
    """What the local step reads of the server's state: the algorithm's
    ``server_state_dict()`` (SCAFFOLD's ``c``, FedNova's ``d``, MOON's initial model)."""
    out = {}
    for key, value in algorithm.server_state_dict().items():
        if not (isinstance(value, dict) and all(hasattr(v, "shape") for v in value.values())):
            raise FederationError(
                f"{type(algorithm).__name__}'s server state {key!r} is not a dict of tensors: "
                "it cannot be sent to the clients by the Flower apps"
            )
        out[key] = value
    return out


class FlowerEngine:
    """Trains a round's planned clients on the SuperNodes of a Flower federation.

    Each planned client's node gets the global weights, the buffers, the server state its
    local step reads and the round's settings (:mod:`fl_lightning.flower.records`); a node
    whose partition is not known yet (every node, in the first round) gets the message too and
    answers with its partition id and size: that is how the engine maps partitions to nodes and
    learns the population's size (:meth:`population`, then written into the plan's
    ``total_samples``). A client whose node is gone, answers with an error or not within
    ``timeout`` seconds gets no result (the round records it as a dropout; nothing it sent is
    used, nothing of it is stored); why is kept in :attr:`failures`.

    Args:
        grid: Flower's ``Grid`` of the ServerApp.
        nodes: the node ids connected at the start (:func:`wait_for_nodes`).
        num_clients: partitions of the run (``--data.num_clients``).
        recipe: the JSON recipe a ClientApp builds its algorithm, network and data from.
        timeout: seconds a round waits for its replies.

    Attributes:
        where: partition id -> node id, as learnt from the replies.
        sizes: partition id -> its training samples, as learnt from the replies.
        failures: the last round's lost clients and why.
        bytes_down: payload bytes of each message the last round sent.
        bytes_up: payload bytes of each trained client's reply in the last round.
    """

    name = "flower"

    def __init__(
        self, grid: Grid, nodes: list[int], num_clients: int, recipe: str, timeout: float
    ) -> None:
        self.grid, self.nodes, self.num_clients = grid, list(nodes), num_clients
        self.recipe, self.timeout = recipe, timeout
        self.where: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.failures: dict[int, str] = {}
        self.bytes_down: list[int] = []
        self.bytes_up: list[int] = []

    def population(self) -> int | None:
        """Training samples over every partition, once every node has reported (else
        ``None``)."""
        return sum(self.sizes.values()) if len(self.sizes) == self.num_clients else None

    def source(self, datamodule: Any) -> NodePopulation:
        """The round's population: ``datamodule``'s sampler, the sizes this engine learns."""
        return NodePopulation(datamodule, self)

    def run_round(
        self, algorithm: Algorithm, net: nn.Module, global_params: Params, buffers: Params,
        plan: RoundPlan, data: tuple[Tensor, Tensor] | None, lr: float, momentum: float,
        weight_decay: float,
    ) -> list[ClientResult]:
        """Send the round's messages; one result per client that reported trained weights.

        ``data`` and ``weight_decay`` are not used here: the nodes hold the data, and the
        recipe carries the local optimizer's settings.
        """
        del data, weight_decay
        asked = [c.client_id for c in plan.clients]
        if asked:  # as the simulation's engine does on the object that aggregates: lets the
            # algorithm create its server state lazily (SCAFFOLD's c = 0); the server holds no
            # client state, so this reads none
            algorithm.client_begin(LocalContext(
                net=net, global_params=global_params, buffers=buffers, round=plan.round,
                client_id=asked[0], lr=lr, momentum=momentum, num_clients=plan.num_clients,
                total_samples=plan.total_samples,
            ))
        targets, messages = self._messages(algorithm, global_params, buffers, plan, lr)
        replies, failed = _exchange(self.grid, messages, self.timeout) if messages else ({}, {})
        self.bytes_down = [record_bytes(m.content) for m in messages.values()]
        self._learn_partitions(replies, targets)
        results = self._results(asked, replies, {targets[k]: why for k, why in failed.items()})
        if plan.total_samples is None:  # every node answered the first round: now known
            plan.total_samples = self.population()
        return results

    def _messages(
        self, algorithm: Algorithm, global_params: Params, buffers: Params, plan: RoundPlan,
        lr: float,
    ) -> tuple[dict[int, int], dict[int, Message]]:
        """``(targets, messages)`` keyed alike: a planned client's id, or ``-1 - i`` for node
        ``i`` whose partition is not known yet; ``targets`` maps a key to its node id."""
        content = RecordDict({"global": params_to_record(global_params)})
        if buffers:
            content["buffers"] = params_to_record(buffers)
        for key, value in _server_state(algorithm).items():
            content[f"server.{key}"] = params_to_record(value)
        work = {str(c.client_id): c.work for c in plan.clients if c.work < 1.0}
        cfg = {"round": plan.round, "lr": lr, "num_clients": self.num_clients,
               "recipe": self.recipe, "train": json.dumps([c.client_id for c in plan.clients]),
               "work": json.dumps(work)}
        if plan.total_samples is not None:
            cfg["total_samples"] = plan.total_samples
        content["config"] = ConfigRecord(cfg)
        online = set(self.grid.get_node_ids())
        known = set(self.where.values())
        targets = {c.client_id: self.where[c.client_id] for c in plan.clients
                   if c.client_id in self.where and self.where[c.client_id] in online}
        # the nodes connected at the start first, then any that joined later (a SuperNode that
        # was restarted without authentication comes back under a new node id)
        unknown = [n for n in self.nodes if n in online] + sorted(online - set(self.nodes))
        targets.update({-1 - i: n for i, n in enumerate(unknown) if n not in known})
        messages = {key: Message(RecordDict(dict(content.items())), node, "train",
                                 group_id=str(plan.round)) for key, node in targets.items()}
        return targets, messages

    def _learn_partitions(self, replies: dict[int, Message], targets: dict[int, int]) -> None:
        """Record which node holds which partition id and its size, from the ``info`` every
        reply carries; two connected nodes with one partition id are an error (a partition
        whose node went away and came back under a new id moves to it)."""
        online = set(self.grid.get_node_ids())
        for key, reply in replies.items():
            info = reply.content["info"]
            cid, node = int(info["client_id"]), targets[key]
            if not 0 <= cid < self.num_clients:
                raise FederationError(
                    f"a SuperNode holds partition-id={cid} but --data.num_clients="
                    f"{self.num_clients}"
                )
            if self.where.get(cid, node) != node and self.where[cid] in online:
                raise FederationError(
                    f"two SuperNodes hold partition-id={cid}: give each node its own "
                    "partition-id"
                )
            self.where[cid], self.sizes[cid] = node, int(info["num_samples"])

    def _results(
        self, asked: list[int], replies: dict[int, Message], failed: dict[int, str]
    ) -> list[ClientResult]:
        """The trained clients' results in plan order; the others' reasons go to
        :attr:`failures` (``failed``: node id -> why its message failed)."""
        import torch

        by_client = {int(m.content["info"]["client_id"]): m for m in replies.values()}
        self.failures, self.bytes_up = {}, []
        results = []
        for c in asked:
            if c not in by_client:
                node = self.where.get(c)
                self.failures[c] = (
                    failed.get(node, "its SuperNode is offline") if node is not None
                    else next(iter(failed.values()), "its SuperNode never answered")
                )
                continue
            rc = by_client[c].content
            if "params" not in rc:  # answered with its size only, although asked to train
                self.failures[c] = "its reply holds no trained weights"
                continue
            self.bytes_up.append(record_bytes(rc))
            m = rc["metrics"]
            results.append(ClientResult(
                client_id=int(m["client_id"]), num_samples=int(m["num_samples"]),
                params=params_from_record(rc["params"]), num_steps=int(m["num_steps"]),
                loss=torch.tensor(float(m["loss"])), extras=extras_from_content(rc),
            ))
        return results


class NodePopulation:
    """The population a Flower server plans rounds over: the data module's seeded sampler (the
    same clients as the simulation), without training data; client sizes are those the
    :class:`FlowerEngine` learnt so far (0 before a node answered).

    Args:
        datamodule: the run's data module (its sampling settings only; never set up).
        engine: the engine that learns the nodes' partitions.
    """

    def __init__(self, datamodule: Any, engine: FlowerEngine) -> None:
        self.datamodule, self.engine = datamodule, engine
        self.num_clients: int = datamodule.num_clients
        self.seed: int = datamodule.seed

    def round_plan(
        self, round_idx: int, clients_per_round: int, local_epochs: int, batch_size: int,
        device: torch.device | str | None = None,
    ) -> RoundPlan:
        """The sampled clients of round ``round_idx``; their nodes plan their own batches."""
        del local_epochs, batch_size, device
        ids = self.datamodule.sample_clients(round_idx, clients_per_round)
        return RoundPlan(
            round=round_idx,
            clients=[ClientPlan(c, self.engine.sizes.get(c, 0), []) for c in ids],
            num_clients=self.num_clients, total_samples=self.engine.population(),
        )

    def train_tensors(self, device: Any, dtype: Any) -> None:
        """No training data on the server: the nodes hold it."""
        del device, dtype
        return None
