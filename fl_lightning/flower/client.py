"""The ClientApp: one fl-lightning client's local training on a SuperNode's own partition.

Every message starts a fresh ``flwr-clientapp`` process, so this module imports neither
Lightning nor the data module: the recipe sent by the server (algorithm and network as
``class_path``/``init_args``, the local optimizer's settings, the partition settings) is
instantiated with jsonargparse, the same machinery as the ``fl-lightning`` command line.

Node config (``flower-supernode --node-config``):
    ``partition-id``: which client of the partition this node is (``0 .. num-partitions-1``).
    ``num-partitions``: must equal the run's ``--data.num_clients``.
    ``data-dir`` (optional): where this node's copy of the dataset lives (default: the run's
    ``--data.data_dir``).
    ``threads`` (optional): PyTorch's intra-op thread count for the local training (default:
    PyTorch's own, which follows ``OMP_NUM_THREADS``). CPU kernels split their reductions by
    thread, so the last bits of a result depend on it: a node reproduces a simulation bit for
    bit only with the simulation's thread count (see ``docs/deployment.md``).

The node computes the run's partition (a pure function of the labels and the seed) and keeps
only its own samples; its persistent client state (SCAFFOLD's ``c_i``, ...) is kept in the
SuperNode's ``context.state`` between rounds and never sent.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import Tensor, nn

from fl_lightning.algorithms.base import Algorithm
from fl_lightning.data.augment import paper_augmentation
from fl_lightning.data.datasets import load_dataset
from fl_lightning.data.partition import partition_indices
from fl_lightning.data.plans import augment_batch, client_batches
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine
from fl_lightning.errors import ConfigError
from fl_lightning.flower.records import (
    extras_to_content,
    params_from_record,
    params_to_record,
)

__all__ = ["build_components", "local_partition", "make_client_app"]

NetFactory = Callable[[int, Sequence[int]], nn.Module]
STATE_PREFIX = "state."
SERVER_PREFIX = "server."


def build_components(recipe: dict[str, Any]) -> tuple[Algorithm, nn.Module]:
    """The algorithm and the network of a recipe, built as the CLI builds them."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--algorithm", type=Algorithm)
    parser.add_argument("--net", type=NetFactory)
    cfg = parser.parse_object({"algorithm": recipe["algorithm"], "net": recipe["net"]})
    init = parser.instantiate_classes(cfg)
    dtype = getattr(torch, recipe["dtype"])
    net = init.net(int(recipe["num_classes"]), tuple(recipe["input_shape"])).to(dtype)
    return init.algorithm, net


def _node_partition(context: Context, num_clients: int) -> int:
    node = context.node_config
    if "partition-id" not in node:
        raise ConfigError(
            "this SuperNode has no partition: start it with --node-config "
            f"\"partition-id=K num-partitions={num_clients}\" (K in 0..{num_clients - 1})"
        )
    pid, parts = int(node["partition-id"]), int(node.get("num-partitions", num_clients))
    if parts != num_clients or not 0 <= pid < num_clients:
        raise ConfigError(
            f"--node-config partition-id={pid} num-partitions={parts} does not fit the run's "
            f"--data.num_clients={num_clients}: use num-partitions={num_clients} and a "
            f"partition-id in 0..{num_clients - 1}"
        )
    return pid


def local_partition(
    data: dict[str, Any], client_id: int, data_dir: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """This client's training samples ``(x, y)`` (in partition order), nothing else kept, and
    their indices in the whole training set (the keys of their per-epoch order)."""
    x, y = load_dataset(
        data["dataset"], data_dir or data["data_dir"], False, "train", data["verify_checksums"]
    )
    parts = partition_indices(
        y.numpy(), data["num_clients"], data["partition"],
        shards_per_client=data["shards_per_client"], alpha=data["alpha"], seed=data["seed"],
        reference=data["reference_partition"],
    )
    own = torch.as_tensor(parts[client_id], dtype=torch.long)
    x_own, y_own = x[own].clone(), y[own].clone()
    del x, y
    return (x_own.to(dtype) if dtype is not None else x_own), y_own, own


def _node_threads(context: Context) -> None:
    """Apply the node's ``threads`` setting (if any) to PyTorch's intra-op thread pool."""
    value = context.node_config.get("threads")
    if value is None:
        return
    try:
        threads = int(value)
    except (TypeError, ValueError):
        threads = 0
    if threads < 1 or str(threads) != str(value).strip():
        raise ConfigError(
            f"--node-config threads={value!r} is invalid: use an integer >= 1 (e.g. threads=1) "
            "or leave it out for PyTorch's default"
        )
    torch.set_num_threads(threads)


def _train(msg: Message, context: Context) -> Message:
    _node_threads(context)
    cfg = msg.content["config"]
    recipe = json.loads(str(cfg["recipe"]))
    data = recipe["data"]
    client_id = _node_partition(context, int(data["num_clients"]))
    algorithm, net = build_components(recipe)
    dtype = getattr(torch, recipe["dtype"])
    x, y, own = local_partition(data, client_id, context.node_config.get("data-dir"), dtype)
    global_params = params_from_record(msg.content["global"])
    buffers = params_from_record(msg.content["buffers"]) if "buffers" in msg.content else {}
    server_state = {
        name[len(SERVER_PREFIX):]: params_from_record(rec)
        for name, rec in msg.content.items() if name.startswith(SERVER_PREFIX)
    }
    if server_state:
        algorithm.load_state_dict(server_state)
    own_state = {
        name[len(STATE_PREFIX):]: params_from_record(rec)
        for name, rec in context.state.items() if name.startswith(STATE_PREFIX)
    }
    if own_state:
        algorithm.clients.put(client_id, own_state)
    round_idx = int(cfg["round"])
    batches = client_batches(  # positions into x: the simulation's order of these samples
        own, int(data["seed"]), round_idx, client_id, int(recipe["local_epochs"]),
        int(recipe["batch_size"]), positions=True,
    )
    if "max_steps" in cfg:  # a straggler of the participation policy
        batches = batches[: int(cfg["max_steps"])]
    augmentation = paper_augmentation(data["dataset"]) if data["augment"] == "paper" else None

    def transform(xb: Tensor, r: int, c: int, step: int) -> Tensor:
        return augment_batch(augmentation, xb, int(data["seed"]), r, c, step)

    plan = RoundPlan(
        round=round_idx, clients=[ClientPlan(client_id, len(y), batches)],
        transform=None if augmentation is None else transform,
        num_clients=int(cfg["num_clients"]), total_samples=int(cfg["total_samples"]),
    )
    (result,) = SequentialEngine().run_round(
        algorithm, net, global_params, buffers, plan, (x, y), float(cfg["lr"]),
        float(recipe["momentum"]), float(recipe["weight_decay"]),
    )
    finite = bool(torch.isfinite(result.loss)) and all(
        bool(torch.isfinite(v).all()) for v in result.params.values()
    )
    if finite:  # as the round loop: only a kept client's new state is stored
        for entry, value in result.state.items():
            context.state[STATE_PREFIX + entry] = params_to_record(value)
    content = RecordDict({
        "params": params_to_record(result.params),
        "metrics": MetricRecord({
            "client_id": client_id, "num_samples": result.num_samples,
            "num_steps": result.num_steps, "loss": float(result.loss),
        }),
    })
    extras_to_content(result.extras, content)
    return Message(content, reply_to=msg)


def _query(msg: Message, context: Context) -> Message:
    recipe = json.loads(str(msg.content["config"]["recipe"]))
    data = recipe["data"]
    client_id = _node_partition(context, int(data["num_clients"]))
    _, y, _ = local_partition(data, client_id, context.node_config.get("data-dir"))
    reply = ConfigRecord({"client_id": client_id, "num_samples": len(y)})
    return Message(RecordDict({"info": reply}), reply_to=msg)


def make_client_app() -> ClientApp:
    """A Flower ``ClientApp`` answering ``query`` (which partition, how many samples) and
    ``train`` (one round of the algorithm's local training) messages."""
    app = ClientApp()
    app.train()(_train)
    app.query()(_query)
    return app
