"""The ServerApp: fl-lightning's server side of a round (sampling, server rule, optimizer).

The run is described exactly as for ``fl-lightning fit``: a config file plus command-line
style overrides, parsed by the project's own CLI (so defaults, links and checks are the
same). The server builds the :class:`~fl_lightning.module.FederatedModule` and the data
module's sampling settings from it, never loads training data, and per round:

1. samples ``clients_per_round`` clients with the data module's seeded sampler (the same
   ids as the simulation), applies ``--model.participation`` (planned dropouts are not asked;
   stragglers are named, with their share of the work);
2. sends each sampled client's SuperNode the global weights, the server state its local step
   reads, and the round's settings (:mod:`fl_lightning.flower.records`); a node whose partition
   is not known yet (every node, in the first round) gets the message too and answers with its
   partition id and size: that is how the server maps partitions to nodes;
3. collects the replies: a node that is gone, answers with an error, or does not answer within
   ``round-timeout`` seconds is dropped for the round (as a participation dropout: nothing it
   sent is used, nothing of it is stored); non-finite clients follow ``--model.on_nonfinite``;
4. aggregates with the algorithm's own server rule (``aggregate`` reads the clients' extras)
   and steps the module's server optimizer on ``w - aggregate``.

Run config (``[tool.flwr.app.config]`` of the Flower app, or ``flwr run --run-config``):
    ``config``: the fl-lightning config file, relative to the app folder or absolute.
    ``args``: more options in ``fl-lightning fit`` syntax (e.g. ``--model.algorithm
    fl_lightning.algorithms.SCAFFOLD``).
    ``rounds``: communication rounds (``--trainer.max_steps`` of the simulation).
    ``save-dir``: where ``final.pt`` (global weights), ``summary.json`` and ``progress.jsonl``
    are written (empty: nowhere).
    ``round-timeout``: seconds a round waits for its replies.
    ``wait-nodes-timeout``: seconds the run waits for every partition's SuperNode.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

__all__ = ["make_server_app", "run_server"]

POLL_S = 0.2
# replies are polled at first every FIRST_POLL_S, then ever less often, up to every MAX_POLL_S:
# a local round takes seconds, and every poll is a request the SuperLink serves
FIRST_POLL_S, MAX_POLL_S = 0.1, 1.0
SUPPORTED_PRECISION = {"32-true": "float32", "64-true": "float64", "32": "float32",
                       "64": "float64"}


class FederationError(RuntimeError):
    """The federation cannot run the configured experiment (one line says why)."""


def _plain(value: Any) -> Any:
    """A jsonargparse Namespace (class_path/init_args) as plain JSON-able data."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    return value


def build_run(config_path: str, args: str, rounds: int):
    """``(module, datamodule, recipe)`` from an fl-lightning config, as ``fl-lightning fit``
    would build them (same parser, same seeding before the weights are initialized)."""
    from fl_lightning.cli import FederatedCLI

    argv = ["--config", config_path, *shlex.split(args), "--trainer.max_steps", str(rounds),
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false",
            "--trainer.enable_progress_bar", "false"]
    saved_argv, sys.argv = sys.argv, sys.argv[:1]  # flwr-serverapp's own flags are not ours
    try:
        cli = FederatedCLI(args=argv, run=False)
    finally:
        sys.argv = saved_argv
    module, dm, cfg = cli.model, cli.datamodule, cli.config
    precision = str(cfg.trainer.get("precision") or "32-true")
    if precision not in SUPPORTED_PRECISION:
        raise FederationError(
            f"--trainer.precision={precision} is not supported with Flower: use 32-true or "
            "64-true"
        )
    dtype = SUPPORTED_PRECISION[precision]
    if dtype == "float64":
        module.double()
    systems = module.systems
    for option in ("attack", "compressor", "privacy", "secure_aggregation", "aggregator"):
        if getattr(systems, option) is not None:
            raise FederationError(
                f"--model.{option} is not supported by the Flower apps: they run "
                "--model.participation only (see docs/deployment.md for Flower's own mods)"
            )
    recipe = {
        "algorithm": _plain(cfg.model.algorithm),
        "net": _plain(cfg.model.net),
        "num_classes": module.num_classes,
        "input_shape": list(module.input_shape),
        "local_epochs": module.local_epochs,
        "batch_size": module.batch_size,
        "momentum": module.momentum,
        "weight_decay": module.weight_decay,
        "dtype": dtype,
        "data": {
            "dataset": dm.dataset, "data_dir": dm.data_dir, "num_clients": dm.num_clients,
            "partition": dm.partition, "shards_per_client": dm.shards_per_client,
            "alpha": dm.alpha, "seed": dm.seed, "reference_partition": dm.reference_partition,
            "client_size": dm.client_size,
            "augment": dm.augment, "verify_checksums": dm.verify_checksums,
        },
    }
    return module, dm, recipe


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
            if reply.has_error():
                failures[key] = f"error {reply.error.code}: {reply.error.reason}"
            else:
                replies[key] = reply
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(wait)
        wait = min(MAX_POLL_S, wait * 1.5)
    for key in pending.values():
        failures[key] = f"no reply within round-timeout={timeout:g} s"
    return replies, failures


def _wait_for_nodes(grid: Grid, num_clients: int, wait_s: float) -> list[int]:
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


def _learn_partitions(
    replies: dict[int, Message], nodes: dict[int, int], where: dict[int, int],
    sizes: dict[int, int], num_clients: int,
) -> None:
    """Record which node holds which partition id and its size, from the ``info`` every reply
    carries (``nodes``: message key -> node id); two nodes with one partition id are an
    error."""
    for key, reply in replies.items():
        info = reply.content["info"]
        cid, node = int(info["client_id"]), nodes[key]
        if not 0 <= cid < num_clients:
            raise FederationError(
                f"a SuperNode holds partition-id={cid} but --data.num_clients={num_clients}"
            )
        if where.get(cid, node) != node:
            raise FederationError(
                f"two SuperNodes hold partition-id={cid}: give each node its own partition-id"
            )
        where[cid], sizes[cid] = node, int(info["num_samples"])


def _population(sizes: dict[int, int], num_clients: int) -> int | None:
    """Training samples over every partition, once every node has reported (else ``None``)."""
    return sum(sizes.values()) if len(sizes) == num_clients else None


def _server_state(algorithm) -> dict[str, Any]:
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


def run_server(grid: Grid, run_config: dict[str, Any], app_dir: Path) -> dict[str, Any]:
    """Run the configured experiment over the grid; returns the summary (also saved)."""
    import torch

    from fl_lightning.algorithms.base import ClientResult, LocalContext
    from fl_lightning.flower.records import (
        extras_from_content,
        params_from_record,
        params_to_record,
        record_bytes,
    )
    from fl_lightning.loop import RoundLoop

    config_path = str(run_config.get("config", ""))
    if config_path and not os.path.isabs(config_path):
        config_path = str(app_dir / config_path)
    rounds = int(run_config.get("rounds", 1))
    timeout = float(run_config.get("round-timeout", 600.0))
    wait_s = float(run_config.get("wait-nodes-timeout", 120.0))
    save_dir = str(run_config.get("save-dir", "") or "")
    module, dm, recipe = build_run(config_path, str(run_config.get("args", "")), rounds)
    algorithm, net = module.algorithm, module.net
    algorithm.init_server({k: p.detach() for k, p in net.named_parameters()})
    num_clients = dm.num_clients
    nodes = _wait_for_nodes(grid, num_clients, wait_s)
    # which node holds which partition id (and how many samples) is learnt from the replies:
    # a node whose partition is not known yet gets every round's message (the first round's
    # goes to all) and answers it, by training where it is asked to, else with its size only
    where: dict[int, int] = {}
    sizes: dict[int, int] = {}
    optimizer = module.configure_optimizers()
    participation = module.systems.participation
    per_round = module.clients_per_round(num_clients)
    loop = RoundLoop(module)
    recipe_json = json.dumps(recipe)
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        progress_path = os.path.join(save_dir, "progress.jsonl")
        open(progress_path, "w").close()
    history: list[dict[str, Any]] = []
    for r in range(rounds):
        total_samples = _population(sizes, num_clients)
        sampled = dm.sample_clients(r, per_round)
        planned, slow = participation.split(dm.seed, r, sampled) if participation else ([], [])
        asked = [c for c in sampled if c not in set(planned)]
        global_before = {k: p.detach().clone() for k, p in net.named_parameters()}
        buffers = dict(net.named_buffers())
        if asked:  # as the simulation's engine does on the object that aggregates: lets the
            # algorithm create its server state lazily (SCAFFOLD's c = 0); the server holds no
            # client state, so this reads none
            algorithm.client_begin(LocalContext(
                net=net, global_params=global_before, buffers=buffers, round=r,
                client_id=asked[0], lr=module.local_lr_at(r), momentum=module.momentum,
                num_clients=num_clients, total_samples=total_samples,
            ))
        content = RecordDict({"global": params_to_record(global_before)})
        if buffers:
            content["buffers"] = params_to_record(buffers)
        for key, value in _server_state(algorithm).items():
            content[f"server.{key}"] = params_to_record(value)
        cfg = {"round": r, "lr": module.local_lr_at(r), "num_clients": num_clients,
               "recipe": recipe_json, "train": json.dumps(asked), "slow": json.dumps(slow),
               "straggler-work": participation.straggler_work if participation else 1.0}
        if total_samples is not None:
            cfg["total_samples"] = total_samples
        content["config"] = ConfigRecord(cfg)
        online = set(grid.get_node_ids())
        known = set(where.values())
        targets = {c: where[c] for c in asked if c in where and where[c] in online}
        targets.update({-1 - i: n for i, n in enumerate(nodes) if n not in known and n in online})
        messages = {key: Message(RecordDict(dict(content.items())), node, "train",
                                 group_id=str(r)) for key, node in targets.items()}
        replies, failures = _exchange(grid, messages, timeout) if messages else ({}, {})
        down = [record_bytes(m.content) for m in messages.values()]
        _learn_partitions(replies, targets, where, sizes, num_clients)
        by_client = {int(m.content["info"]["client_id"]): m for m in replies.values()}
        failed = {targets[k]: why for k, why in failures.items()}
        gone: dict[int, str] = {}
        for c in asked:
            if c in by_client:
                continue
            node = where.get(c)
            gone[c] = (failed.get(node, "its SuperNode is offline") if node is not None
                       else next(iter(failed.values()), "its SuperNode never answered"))
        failures = gone
        results = []
        up = []
        for c in asked:
            if c not in by_client:
                continue
            rc = by_client[c].content
            if "params" not in rc:  # answered with its size only, although asked to train
                failures[c] = "its reply holds no trained weights"
                continue
            up.append(record_bytes(rc))
            m = rc["metrics"]
            result = ClientResult(
                client_id=int(m["client_id"]), num_samples=int(m["num_samples"]),
                params=params_from_record(rc["params"]), num_steps=int(m["num_steps"]),
                loss=torch.tensor(float(m["loss"])), extras=extras_from_content(rc),
            )
            results.append(result)
        results, skipped = loop._drop_diverged(results, r) if results else ([], [])
        total_samples = _population(sizes, num_clients)
        if results:
            # the clients committed their own state on their nodes: only the server rule here
            aggregate = algorithm.aggregate(
                global_before, results, num_clients=num_clients, total_samples=total_samples
            )
            module.server_update(aggregate, optimizer)
        record = {
            "round": r, "sampled": sampled, "planned_dropouts": planned, "stragglers": slow,
            "dropped": sorted(failures), "why": {str(k): v for k, v in failures.items()},
            "skipped_nonfinite": skipped, "reported": [x.client_id for x in results],
            "train_loss": (sum(float(x.loss) for x in results) / len(results)
                           if results else None),
            "bytes_down": down, "bytes_up": up,
        }
        history.append(record)
        print(f"fl-lightning (Flower): round {r + 1}/{rounds}: clients "
              f"{record['reported']} reported"
              + (f", dropped {record['dropped']}" if failures else ""), flush=True)
        if save_dir:
            with open(progress_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
    module.attach(dm)
    metrics = module.evaluate()
    summary = {"rounds": rounds, **metrics, "num_clients": num_clients,
               "client_sizes": [sizes.get(c) for c in range(num_clients)], "history": history}
    if save_dir:
        torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()},
                   os.path.join(save_dir, "final.pt"))
        with open(os.path.join(save_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    print(f"fl-lightning (Flower): final global test accuracy {metrics['test_acc']:.4f} "
          f"(loss {metrics['test_loss']:.4f}) after {rounds} rounds"
          + (f"; saved {save_dir}" if save_dir else ""), flush=True)
    return summary


def make_server_app(app_dir: str | os.PathLike) -> ServerApp:
    """A Flower ``ServerApp`` running the run config's fl-lightning experiment; relative
    ``config`` paths are resolved against ``app_dir`` (the Flower app's folder)."""
    app = ServerApp()
    folder = Path(app_dir)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, dict(context.run_config), folder)

    return app


