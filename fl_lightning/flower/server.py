"""The ServerApp: fl-lightning's server side of a round (sampling, server rule, optimizer).

The run is described exactly as for ``fl-lightning fit``: a config file plus command-line
style overrides, parsed by the project's own CLI (so defaults, links and checks are the
same). The server builds the :class:`~fl_lightning.module.FederatedModule` and the data
module's sampling settings from it, never loads training data, and runs the very round of
``fl-lightning fit`` (:class:`~fl_lightning.round.FederatedRound`) with the federation as its
client engine (:class:`~fl_lightning.flower.engine.FlowerEngine`). Per round:

1. the round samples ``clients_per_round`` clients with the data module's seeded sampler (the
   same ids as the simulation) and applies ``--model.participation`` (planned dropouts are not
   asked; stragglers are named, with their share of the work);
2. the engine sends each sampled client's SuperNode the global weights, the server state its
   local step reads, and the round's settings (:mod:`fl_lightning.flower.records`); a node
   whose partition is not known yet (every node, in the first round) gets the message too and
   answers with its partition id and size: that is how the server maps partitions to nodes;
3. it collects the replies: a node that is gone, answers with an error, or does not answer
   within ``round-timeout`` seconds returns no result, and the round records the client as a
   participation dropout (nothing it sent is used, nothing of it is stored); the round's
   screen applies ``--model.on_nonfinite`` to the others;
4. the round combines with the algorithm's own server rule (``aggregate`` reads the clients'
   extras; the clients committed their state on their nodes) and steps the module's server
   optimizer on ``w - aggregate``.

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
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fl_lightning.errors import ConfigError, exception_line
from fl_lightning.flower.engine import FederationError
from fl_lightning.tensors import PRECISION_DTYPES

__all__ = ["ERROR_FILE", "FederationError", "build_run", "check_round", "check_supported",
           "make_server_app", "run_server", "write_error"]

#: where a failed run's one line goes, in its save-dir (read by ``python -m fl_lightning.flower``)
ERROR_FILE = "error.txt"


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


def check_supported(module: Any, precision: str) -> str:
    """The run's dtype name (``"float32"``, ``"float64"``), or a :class:`FederationError` (one
    line) for what the Flower apps cannot run: the ServerApp calls it through
    :func:`build_run`, and so does ``python -m fl_lightning.flower`` before it starts any
    process."""
    if precision not in PRECISION_DTYPES or precision == "bf16-mixed":
        raise FederationError(
            f"--trainer.precision={precision} is not supported with Flower: use 32-true or "
            "64-true"
        )
    systems = module.systems
    for option in ("attack", "compressor", "privacy", "secure_aggregation", "aggregator"):
        if getattr(systems, option) is not None:
            raise FederationError(
                f"--model.{option} is not supported by the Flower apps: they run "
                "--model.participation only (see docs/deployment.md for Flower's own mods)"
            )
    part = systems.participation
    if part is not None and part.straggler_epochs != "fixed" and part.straggler_policy != "drop":
        raise FederationError(
            f"--model.participation.straggler_epochs={part.straggler_epochs} with partial work "
            "is not supported by the Flower apps (a node cuts its steps by the fixed "
            "straggler_work share): use straggler_epochs fixed, or straggler_policy drop"
        )
    return str(PRECISION_DTYPES[precision]).removeprefix("torch.")


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
    dtype = check_supported(module, str(cfg.trainer.get("precision") or "32-true"))
    if dtype == "float64":
        module.double()
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


def run_server(grid: Grid, run_config: dict[str, Any], app_dir: Path) -> dict[str, Any]:
    """Run the configured experiment over the grid; returns the summary (also saved).

    Each round is the module's :class:`~fl_lightning.round.FederatedRound`, built with a
    :class:`~fl_lightning.flower.FlowerEngine` as its engine and the nodes as its population.
    """
    import torch

    from fl_lightning.flower.engine import FlowerEngine, wait_for_nodes

    config_path = str(run_config.get("config", ""))
    if config_path and not os.path.isabs(config_path):
        config_path = str(app_dir / config_path)
    rounds = int(run_config.get("rounds", 1))
    timeout = float(run_config.get("round-timeout", 600.0))
    wait_s = float(run_config.get("wait-nodes-timeout", 120.0))
    save_dir = str(run_config.get("save-dir", "") or "")
    module, dm, recipe = build_run(config_path, str(run_config.get("args", "")), rounds)
    # the algorithm's server state before the first round, as on_train_start does under fit
    module.algorithm.init_server({k: p.detach() for k, p in module.net.named_parameters()})
    nodes = wait_for_nodes(grid, dm.num_clients, wait_s)
    engine = FlowerEngine(grid, nodes, dm.num_clients, json.dumps(recipe), timeout)
    fl_round = module.build_round(
        source=engine.source(dm), engine=engine, optimizer=module.configure_optimizers()
    )
    if save_dir:
        os.makedirs(save_dir, exist_ok=True)
        progress_path = os.path.join(save_dir, "progress.jsonl")
        open(progress_path, "w").close()
    history: list[dict[str, Any]] = []
    for r in range(rounds):
        result = fl_round.run(r)
        record = _round_record(result, engine)
        history.append(record)
        print(f"fl-lightning (Flower): round {r + 1}/{rounds}: clients "
              f"{record['reported']} reported"
              + (f", dropped {record['dropped']}" if record["dropped"] else ""), flush=True)
        if save_dir:
            with open(progress_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
        check_round(record, r, rounds)
    module.attach(dm)
    metrics = module.evaluate()
    summary = {"rounds": rounds, **metrics, "num_clients": dm.num_clients,
               "client_sizes": [engine.sizes.get(c) for c in range(dm.num_clients)],
               "history": history}
    if save_dir:
        torch.save({k: v.detach().cpu() for k, v in module.net.state_dict().items()},
                   os.path.join(save_dir, "final.pt"))
        with open(os.path.join(save_dir, "summary.json"), "w") as fh:
            json.dump(summary, fh, indent=2)
    print(f"fl-lightning (Flower): final global test accuracy {metrics['test_acc']:.4f} "
          f"(loss {metrics['test_loss']:.4f}) after {rounds} rounds"
          + (f"; saved {save_dir}" if save_dir else ""), flush=True)
    return summary


def check_round(record: dict[str, Any], r: int, rounds: int) -> None:
    """Stop the run (a :class:`FederationError`, one line naming the first lost client's
    error) after a round in which no client reported and at least one was lost for a reason
    other than a planned dropout: its node failed, went away or did not answer. So a run in
    which no client ever reports stops in its first round (the participation policy never
    drops every sampled client, and a round whose every update is non-finite raises the
    round's own ``DivergenceError``)."""
    lost = record["dropped"]
    if record["reported"] or record["skipped_nonfinite"] or not lost:
        return
    first = lost[0]
    raise FederationError(
        f"round {r + 1}/{rounds}: no client reported, {len(lost)} lost ({lost}); client "
        f"{first}: {record['why'][str(first)]}"
    )


def _round_record(result: Any, engine: Any) -> dict[str, Any]:
    """One line of ``progress.jsonl``: who was sampled, dropped (planned by the participation
    policy, or lost: its node failed), straggled, skipped and reported, and the bytes moved."""
    lost = engine.failures
    return {
        "round": result.round, "sampled": [c for c, _ in result.sampled],
        "planned_dropouts": [c for c in result.dropped if c not in lost],
        "stragglers": list(result.stragglers), "dropped": sorted(lost),
        "why": {str(k): v for k, v in lost.items()},
        "skipped_nonfinite": list(result.skipped_clients), "reported": list(result.client_ids),
        "train_loss": (sum(float(x.loss) for x in result.clients) / len(result.clients)
                       if result.clients else None),
        "bytes_down": list(engine.bytes_down), "bytes_up": list(engine.bytes_up),
    }


def make_server_app(app_dir: str | os.PathLike) -> ServerApp:
    """A Flower ``ServerApp`` running the run config's fl-lightning experiment; relative
    ``config`` paths are resolved against ``app_dir`` (the Flower app's folder)."""
    app = ServerApp()
    folder = Path(app_dir)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        try:
            run_server(grid, run_config, folder)
        except Exception as err:  # the one line, where the launcher reads it (then Flower's
            # own log of the failure)
            save_dir = str(run_config.get("save-dir", "") or "")
            if save_dir:
                write_error(save_dir, err)
            raise

    return app


def write_error(save_dir: str, err: BaseException) -> None:
    """Write why the run failed (one line) to ``<save_dir>/error.txt``, atomically."""
    line = str(err) if isinstance(err, (FederationError, ConfigError)) else exception_line(err)
    os.makedirs(save_dir, exist_ok=True)
    tmp = os.path.join(save_dir, "error.txt.tmp")
    with open(tmp, "w") as fh:
        fh.write(" ".join(line.split()) + "\n")
    os.replace(tmp, os.path.join(save_dir, ERROR_FILE))


