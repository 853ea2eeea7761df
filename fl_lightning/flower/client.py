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
    ``state-dir`` (optional): a folder on the node for its clients' state files
    (``run-<run id>-client-<K>.pt``), so that a SuperNode that is restarted keeps them.

The node computes the run's partition (a pure function of the labels and the seed) and keeps
only its own samples; its persistent client state (SCAFFOLD's ``c_i``, ...) is kept in the
SuperNode's ``context.state`` between rounds and, with a ``state-dir``, in a state file
written atomically after each round it trains; it is never sent. A failure on the node is
answered with an ``error`` record naming it (one line), which the server reports.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fl_lightning.errors import ConfigError, exception_line

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

    from fl_lightning.algorithms.base import Algorithm
    from fl_lightning.protocol import RoundPlan

__all__ = ["build_components", "local_partition", "make_client_app", "partition_size"]

STATE_PREFIX = "state."
SERVER_PREFIX = "server."
# PyTorch and the training code are imported for local training only: every message starts a
# fresh ClientApp process, and a node that only reports its partition needs none of them
# (numpy only, for digits).


def build_components(recipe: dict[str, Any]) -> tuple[Algorithm, nn.Module]:
    """The algorithm and the network of a recipe, built as the CLI builds them."""
    from collections.abc import Callable, Sequence

    import torch
    from jsonargparse import ArgumentParser
    from torch import nn

    from fl_lightning.algorithms.base import Algorithm

    NetFactory = Callable[[int, Sequence[int]], nn.Module]  # noqa: N806 - a type, as in the CLI
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
    import torch

    from fl_lightning.data.datasets import load_dataset

    x, y = load_dataset(
        data["dataset"], data_dir or data["data_dir"], False, "train", data["verify_checksums"]
    )
    own = torch.as_tensor(_partition(data, y.numpy())[client_id], dtype=torch.long)
    x_own, y_own = x[own].clone(), y[own].clone()
    del x, y
    return (x_own.to(dtype) if dtype is not None else x_own), y_own, own


def partition_size(data: dict[str, Any], client_id: int, data_dir: str | None = None) -> int:
    """How many training samples this client holds: its part of the run's partition, computed
    from the labels alone (for ``digits`` without importing PyTorch)."""
    from fl_lightning.data.datasets import load_labels

    labels = load_labels(
        data["dataset"], data_dir or data["data_dir"], "train", data["verify_checksums"]
    )
    return len(_partition(data, labels)[client_id])


def _partition(data: dict[str, Any], labels) -> list:
    """The run's partition of the training labels, as the data module computes it."""
    from fl_lightning.data.partition import partition_indices

    return partition_indices(
        labels, data["num_clients"], data["partition"],
        shards_per_client=data["shards_per_client"], alpha=data["alpha"], seed=data["seed"],
        reference=data["reference_partition"], client_size=data.get("client_size"),
    )


def _node_threads(context: Context) -> None:
    """Apply the node's ``threads`` setting (if any) to PyTorch's intra-op thread pool."""
    value = context.node_config.get("threads")
    if value is None:
        return
    import torch

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


def _info(client_id: int, num_samples: int) -> ConfigRecord:
    """Which partition this node holds and how many training samples it has."""
    return ConfigRecord({"client_id": client_id, "num_samples": num_samples})


def _data_dir(context: Context) -> str | None:
    """The node's ``data-dir`` (``None``: the run's ``--data.data_dir``); a folder that does
    not exist is an error, whatever the dataset."""
    value = context.node_config.get("data-dir")
    if value is None or str(value) == "":
        return None
    if not os.path.isdir(str(value)):
        raise ConfigError(
            f"--node-config data-dir={str(value)!r} is invalid: it must be an existing folder "
            "on this SuperNode (the dataset's folder, as --data.data_dir)"
        )
    return str(value)


def _train(msg: Message, context: Context) -> Message:
    """A round's message: train where this node's client is in the round's ``train`` list,
    else answer with its partition id and size only (how the server learns them). Whatever
    fails is answered with an ``error`` record (one line: the exception's type and message),
    which the server names when it stops a run whose clients all failed; the traceback goes
    to this node's log."""
    try:
        cfg = msg.content["config"]
        recipe = json.loads(str(cfg["recipe"]))
        client_id = _node_partition(context, int(recipe["data"]["num_clients"]))
        if client_id in json.loads(str(cfg["train"])):
            return _local_training(msg, context, cfg, recipe, client_id)
        size = partition_size(recipe["data"], client_id, _data_dir(context))
        return Message(RecordDict({"info": _info(client_id, size)}), reply_to=msg)
    except Exception as err:  # noqa: BLE001 - any failure is the reply's error, never silent
        traceback.print_exc()
        reason = ConfigRecord({"reason": f"node {context.node_id}: {exception_line(err, 500)}"})
        return Message(RecordDict({"error": reason}), reply_to=msg)


def _client_plan(
    cfg: ConfigRecord, recipe: dict[str, Any], client_id: int, own: Tensor
) -> RoundPlan:
    """This client's plan of the round: the simulation's batches of its samples (positions
    into its own tensors), cut to a straggler's ``work``, with the run's augmentation."""
    import math

    from fl_lightning.data.augment import paper_augmentation
    from fl_lightning.data.plans import augment_batch, client_batches
    from fl_lightning.protocol import ClientPlan, RoundPlan

    data = recipe["data"]
    round_idx = int(cfg["round"])
    batches = client_batches(  # positions into x: the simulation's order of these samples
        own, int(data["seed"]), round_idx, client_id, int(recipe["local_epochs"]),
        int(recipe["batch_size"]), positions=True,
    )
    work = json.loads(str(cfg["work"])).get(str(client_id))
    if work is not None:  # a straggler of the participation policy (ClientPlan.work): the
        # simulation's share of its local steps
        batches = batches[: max(1, int(math.floor(float(work) * len(batches) + 1e-9)))]
    augmentation = paper_augmentation(data["dataset"]) if data["augment"] == "paper" else None

    def transform(xb: Tensor, r: int, c: int, step: int) -> Tensor:
        return augment_batch(augmentation, xb, int(data["seed"]), r, c, step)

    return RoundPlan(
        round=round_idx, clients=[ClientPlan(client_id, len(own), batches)],
        transform=None if augmentation is None else transform,
        num_clients=int(cfg["num_clients"]),  # total_samples: absent until every node answered
        total_samples=int(cfg["total_samples"]) if "total_samples" in cfg else None,
    )


def state_file(context: Context, client_id: int) -> Path | None:
    """Where this node keeps client ``client_id``'s state of the context's run (``None``
    without a ``state-dir`` in the node config)."""
    folder = context.node_config.get("state-dir")
    if folder is None or str(folder) == "":
        return None
    return Path(str(folder)).expanduser() / f"run-{context.run_id}-client-{client_id}.pt"


def _load_state(context: Context, client_id: int) -> dict[str, Any]:
    """The client's persistent state: Flower's ``context.state`` of this SuperNode, else (a
    SuperNode that was restarted has none) its state file; empty if neither has any."""
    import torch

    from fl_lightning.flower.records import params_from_record

    own = {name[len(STATE_PREFIX):]: params_from_record(rec)
           for name, rec in context.state.items() if name.startswith(STATE_PREFIX)}
    path = state_file(context, client_id)
    if own or path is None or not path.is_file():
        return own
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file: one line, nothing lost
        raise ConfigError(
            f"the client state file {path} is unreadable ({exception_line(err)}): move it "
            f"away to start client {client_id}'s state afresh (SCAFFOLD's c_i = 0)"
        ) from None


def _save_state(context: Context, client_id: int, state: dict[str, Any]) -> None:
    """Keep the client's new state in ``context.state`` and, with a ``state-dir``, in its
    state file, written atomically (a temporary file, then ``os.replace``): a node killed
    while writing leaves the previous round's file."""
    import torch

    from fl_lightning.flower.records import params_to_record

    for entry, value in state.items():
        context.state[STATE_PREFIX + entry] = params_to_record(value)
    path = state_file(context, client_id)
    if path is None or not state:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save({k: {n: t.detach().cpu() for n, t in v.items()} for k, v in state.items()}, tmp)
    os.replace(tmp, path)


def _local_training(
    msg: Message, context: Context, cfg: ConfigRecord, recipe: dict[str, Any], client_id: int
) -> Message:
    import torch

    from fl_lightning.engine import SequentialEngine
    from fl_lightning.flower.records import (
        extras_to_content,
        params_from_record,
        params_to_record,
    )

    _node_threads(context)
    data = recipe["data"]
    algorithm, net = build_components(recipe)
    dtype = getattr(torch, recipe["dtype"])
    x, y, own = local_partition(data, client_id, _data_dir(context), dtype)
    global_params = params_from_record(msg.content["global"])
    buffers = params_from_record(msg.content["buffers"]) if "buffers" in msg.content else {}
    server_state = {
        name[len(SERVER_PREFIX):]: params_from_record(rec)
        for name, rec in msg.content.items() if name.startswith(SERVER_PREFIX)
    }
    if server_state:
        algorithm.load_state_dict(server_state)
    own_state = _load_state(context, client_id)
    if own_state:
        algorithm.clients.put(client_id, own_state)
    plan = _client_plan(cfg, recipe, client_id, own)
    (result,) = SequentialEngine().run_round(
        algorithm, net, global_params, buffers, plan, (x, y), float(cfg["lr"]),
        float(recipe["momentum"]), float(recipe["weight_decay"]),
    )
    finite = bool(torch.isfinite(result.loss)) and all(
        bool(torch.isfinite(v).all()) for v in result.params.values()
    )
    if finite:  # as the round loop: only a kept client's new state is stored
        _save_state(context, client_id, result.state)
    content = RecordDict({
        "info": _info(client_id, len(y)),
        "params": params_to_record(result.params),
        "metrics": MetricRecord({
            "client_id": client_id, "num_samples": result.num_samples,
            "num_steps": result.num_steps, "loss": float(result.loss),
        }),
    })
    extras_to_content(result.extras, content)
    return Message(content, reply_to=msg)


def make_client_app() -> ClientApp:
    """A Flower ``ClientApp`` answering ``train`` messages: one round of the algorithm's local
    training where the node's client is asked to train, its partition id and size otherwise."""
    app = ClientApp()
    app.train()(_train)
    return app
