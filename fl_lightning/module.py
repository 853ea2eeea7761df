"""``FederatedModule``: the global model as a LightningModule; one round per training step."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from fl_lightning import plotting, preflight, validate
from fl_lightning.algorithms.base import Algorithm, Params
from fl_lightning.algorithms.fedavg import FedAvg
from fl_lightning.engine import ClientEngine, SequentialEngine, tracked_batchnorms
from fl_lightning.errors import ConfigError
from fl_lightning.models.base import FederatedNet
from fl_lightning.models.cnn import FedAvgCNN
from fl_lightning.optim import ServerSGD
from fl_lightning.protocol import LocalOptim
from fl_lightning.replicas import ReplicaSet
from fl_lightning.round import FederatedRound, RoundContext, RoundSource
from fl_lightning.stopping import Preempted, StopAtRoundBoundary
from fl_lightning.systems import (
    Attack,
    Compressor,
    DPFedAvg,
    Participation,
    RobustAggregator,
    SecureAggregation,
    Systems,
)
from fl_lightning.tensors import PRECISION_DTYPES

__all__ = ["FederatedModule", "Preempted"]

NetFactory = Callable[[int, Sequence[int]], FederatedNet]
OptimizerFactory = Callable[[Iterable], torch.optim.Optimizer]
_SYSTEMS_OPTIONS = (
    "participation", "attack", "compressor", "privacy", "secure_aggregation", "aggregator"
)


class FederatedModule(StopAtRoundBoundary, pl.LightningModule):
    """The global model of a federated run; each ``training_step`` is one communication round.

    Optimization is manual: a round trains the sampled clients locally (the client engine
    applies the algorithm's local update direction with a fresh SGD optimizer per client), then
    the server optimizer, the only optimizer Lightning knows about, steps on the pseudo-gradient
    ``w_global - aggregate``. Hence ``trainer.global_step`` is the number of rounds done and
    ``--trainer.max_steps`` is the number of rounds. The round itself is a
    :class:`~fl_lightning.round.FederatedRound` (:attr:`round`); this class is its Lightning
    adapter: it hands the round what it needs once (:meth:`build_round`) and logs its result.

    Args:
        net: a model class (a :class:`~fl_lightning.models.FederatedNet`) called as
            ``net(num_classes, input_shape)``.
        algorithm: the federated algorithm (``fl_lightning.algorithms``).
        server_optimizer: optimizer class (or factory) for the global weights.
        num_classes: number of classes (linked from the data module by the CLI).
        input_shape: ``(C, H, W)`` of one input (linked from the data module by the CLI).
        sample_ratio: share of clients sampled per round; ``max(int(N * ratio), 1)`` clients.
        local_epochs: ``E``, passes over its data that each sampled client makes.
        batch_size: ``B``, the local mini-batch size.
        local_lr: the local learning rate of the first round.
        lr_decay: per-round decay of the local learning rate: round ``r`` (counted from 1)
            uses ``local_lr * lr_decay^(r-1)``.
        momentum: local SGD momentum.
        weight_decay: local SGD weight decay.
        engine: the client engine.
        on_nonfinite: a client update with NaN/inf: stop naming it, or leave it out. ``raise``
            stops with the client id and round (checkpoints so far are kept); ``skip_client``
            leaves it out of the aggregation (the count is logged as ``skipped_clients``).
        participation: dropouts and stragglers (:class:`fl_lightning.systems.Participation`).
        attack: malicious clients' attack (e.g. :class:`fl_lightning.systems.SignFlip`).
        compressor: update compression (``StochasticQuantizer``, ``TopK``).
        privacy: client-level DP (:class:`fl_lightning.systems.DPFedAvg`).
        secure_aggregation: masked summation (:class:`fl_lightning.systems.SecureAggregation`).
        aggregator: robust rule replacing the weighted mean (``CoordinateMedian``,
            ``TrimmedMean``, ``Krum``, ``NormBounding``). See ``docs/systems.md``.

    Raises:
        ConfigError: for out-of-range values (one line naming the option and the fix).

    Example:
        >>> module = FederatedModule(num_classes=10, input_shape=(1, 28, 28))
        >>> module.clients_per_round(100)
        10
    """

    def __init__(
        self,
        net: NetFactory = FedAvgCNN,
        algorithm: Algorithm = lazy_instance(FedAvg),
        server_optimizer: OptimizerFactory = ServerSGD,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        sample_ratio: float = 0.1,
        local_epochs: int = 5,
        batch_size: int = 50,
        local_lr: float = 0.01,
        lr_decay: float = 0.99,
        momentum: float = 0.9,
        weight_decay: float = 1e-5,
        engine: ClientEngine = lazy_instance(SequentialEngine),
        on_nonfinite: Literal["raise", "skip_client"] = "raise",
        participation: Participation | None = None,
        attack: Attack | None = None,
        compressor: Compressor | None = None,
        privacy: DPFedAvg | None = None,
        secure_aggregation: SecureAggregation | None = None,
        aggregator: RobustAggregator | None = None,
    ) -> None:
        """Checks and stores the LightningCLI options (see the class docstring); it is long
        only because there are 20 of them."""
        super().__init__()
        self.save_hyperparameters(ignore=[
            "net", "algorithm", "server_optimizer", "engine", *_SYSTEMS_OPTIONS,
        ])
        self.automatic_optimization = False
        self.sample_ratio = validate.share(
            sample_ratio, "--model.sample_ratio",
            "the share of clients sampled per round; e.g. 0.1", low_open=True, high_open=False,
        )
        self.local_epochs = validate.integer(local_epochs, "--model.local_epochs", 1)
        self.batch_size = validate.integer(batch_size, "--model.batch_size", 1)
        self.local_lr = validate.nonnegative(local_lr, "--model.local_lr")
        self.lr_decay = validate.number(lr_decay, "--model.lr_decay", 0.0, 1e6, low_open=True,
                                        hint="e.g. 0.99")
        self.momentum = validate.share(momentum, "--model.momentum", "the paper uses 0.9",
                                       high_open=False)
        self.weight_decay = validate.nonnegative(weight_decay, "--model.weight_decay")
        validate.choice(on_nonfinite, "--model.on_nonfinite", ("raise", "skip_client"))
        self.on_nonfinite = on_nonfinite
        if not isinstance(algorithm, Algorithm):
            raise validate.invalid(
                "--model.algorithm", type(algorithm).__name__, "an fl_lightning Algorithm",
                "a class from fl_lightning.algorithms, e.g. FedSoL",
            )
        self.num_classes = validate.integer(num_classes, "--model.num_classes", 1)
        self.input_shape = tuple(int(v) for v in input_shape)
        self.net = net(self.num_classes, self.input_shape)
        self.algorithm = algorithm
        self.server_optimizer_factory = server_optimizer
        self.engine = engine
        self.systems = Systems(
            participation, attack, compressor, privacy, secure_aggregation, aggregator
        )
        self._round: FederatedRound | None = None
        self.curves: dict[str, list[tuple[int, float]]] = {
            "train_loss": [], "val_loss": [], "val_acc": [],
        }  # per round, for curves.png (kept in checkpoints)
        self._out_dir: str | None = None
        # a stop agreed on at the round boundary, deferred to the end of its evaluation
        self._stop_after_evaluation: tuple[str, tuple[int, ...]] | None = None
        self.val_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=self.num_classes, average="micro")
        self._datamodule = None
        #: the other runs trained together with this one (``--replicas.*``; ``None``: none)
        self.replicas: ReplicaSet | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def datamodule(self):
        """The federated data module (from the trainer, or set with :meth:`attach`)."""
        if self._datamodule is not None:
            return self._datamodule
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is None or not hasattr(dm, "round_plan"):
            raise ConfigError(
                "FederatedModule needs a FederatedDataModule: pass --data (CLI) or "
                "trainer.fit(module, datamodule=FederatedDataModule(...))"
            )
        return dm

    def attach(self, datamodule) -> FederatedModule:
        """Use ``datamodule`` outside a trainer (e.g. to run rounds by hand in a notebook)."""
        self._datamodule = datamodule
        self._round = None
        return self

    def clients_per_round(self, num_clients: int) -> int:
        """``max(int(num_clients * sample_ratio), 1)``, as in the official FedSoL code."""
        return max(int(num_clients * self.sample_ratio), 1)

    def local_lr_at(self, round_idx: int) -> float:
        """Local learning rate of round ``round_idx``: ``local_lr * lr_decay ** round_idx``,
        multiplied out round by round as a per-round ``StepLR(gamma=lr_decay)`` would."""
        lr = self.local_lr
        for _ in range(round_idx):
            lr *= self.lr_decay
        return lr

    def local_optim(self, round_idx: int) -> LocalOptim:
        """The local SGD of round ``round_idx`` (:meth:`local_lr_at`, momentum, weight decay)."""
        return LocalOptim(self.local_lr_at(round_idx), self.momentum, self.weight_decay)

    @property
    def round(self) -> FederatedRound:
        """The round this module runs (built by :meth:`build_round` at the start of training,
        or on first use outside a trainer)."""
        if self._round is None:
            self._round = self.build_round()
        return self._round

    def build_round(
        self, source: RoundSource | None = None, engine: ClientEngine | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> FederatedRound:
        """A :class:`~fl_lightning.round.FederatedRound` holding what it needs of this module
        and its trainer (world size and rank, callbacks), read once here.

        Args:
            source: the population and its data (default: the data module).
            engine: the client engine (default: ``--model.engine``).
            optimizer: the server optimizer when no trainer runs the module (Flower).
        """
        trainer = self._trainer
        callbacks = list(trainer.callbacks) if trainer is not None else []
        source = self.datamodule if source is None else source

        def on_round_end(result: Any) -> None:
            for callback in callbacks:
                hook = getattr(callback, "on_round_end", None)
                if callable(hook):
                    hook(trainer, self, result)

        return FederatedRound(RoundContext(
            source=source, algorithm=self.algorithm,
            engine=self.engine if engine is None else engine, net=self.net,
            server_update=lambda aggregate: self.server_update(aggregate, optimizer),
            local_optim=self.local_optim,
            clients_per_round=self.clients_per_round(source.num_clients),
            local_epochs=self.local_epochs, batch_size=self.batch_size,
            num_classes=self.num_classes, device=self.device, dtype=self.dtype,
            systems=self.systems, on_nonfinite=self.on_nonfinite,
            world_size=trainer.world_size if trainer is not None else 1,
            rank=trainer.global_rank if trainer is not None else 0,
            needs_client_results=any(
                getattr(cb, "needs_client_results", False) for cb in callbacks
            ),
            on_round_end=on_round_end if callbacks else None,
        ))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        validate.choice(precision, "--trainer.precision", PRECISION_DTYPES,
                        "federated local training runs its own optimizers")
        if precision == "64-true":
            # Lightning restores a checkpoint before its precision plugin converts the module:
            # float64 weights copied into float32 parameters would lose their last digits
            self.double()
        if self._trainer is not None and self.trainer.world_size > 1 and tracked_batchnorms(
            self.net
        ):
            raise validate.conflict(
                f"--trainer.strategy ddp ({self.trainer.world_size} processes)",
                f"--model.net={type(self.net).__name__}", "its BatchNorm running statistics are "
                "kept per client and the all-gather of client results does not carry them yet",
                "run it with --trainer.devices 1",
            )
        self.engine.check(self.algorithm, self.net)
        dm = self.datamodule
        if (dm.num_classes, tuple(dm.input_shape)) != (self.num_classes, self.input_shape):
            raise validate.conflict(
                f"--model.num_classes={self.num_classes} --model.input_shape={self.input_shape}",
                f"--data.dataset={dm.dataset}",
                f"it has {dm.num_classes} classes and inputs {tuple(dm.input_shape)}",
                "leave --model.num_classes/input_shape to the CLI link",
            )
        if self.systems.active:
            self.systems.check(self.algorithm, self.clients_per_round(dm.num_clients))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.server_optimizer_factory(self.net.parameters())

    def server_update(
        self, aggregate: Params, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        """Step the server optimizer on the pseudo-gradient ``w - aggregate`` (``optimizer``:
        the one from :meth:`configure_optimizers` when no trainer runs the module, as in
        ``fl_lightning.flower``)."""
        opt = self.optimizers() if optimizer is None else optimizer
        for name, p in self.net.named_parameters():
            p.grad = (p.detach() - aggregate[name]).to(p.dtype)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if self.replicas is None:
            result = self.round.run(self.global_step)
        else:  # every replica's round; this module's own result, None once it has diverged
            result = self.replicas.run_round(self, self.global_step)
            if result is None:
                # Lightning counts rounds by the server optimizer's steps: a step without
                # gradients counts the round and leaves the diverged weights where they are
                done = float(self.global_step + 1)
                opt = self.optimizers()
                opt.zero_grad(set_to_none=True)
                opt.step()
                self.log("round", done, on_step=True, batch_size=1)
                return
        self.log("train_loss", result.train_loss, on_step=True, prog_bar=True, batch_size=1)
        self.log("local_lr", result.lr, on_step=True, batch_size=1)
        self.log("round", float(result.round + 1), on_step=True, batch_size=1)
        self.log("skipped_clients", float(len(result.skipped_clients)), on_step=True, batch_size=1)
        for name, value in result.systems.items():
            self.log(name, value, on_step=True, batch_size=1)
        cost = result.gather_cost
        if cost is not None:  # DDP: bytes each rank received (all-gather) or sent (all-reduce)
            self.log("ddp_gather_bytes", float(cost.tensor_bytes), on_step=True, batch_size=1)
            self.log("ddp_reduce_bytes", float(cost.reduce_bytes), on_step=True, batch_size=1)
        self.curves["train_loss"].append((result.round + 1, float(result.train_loss)))
        self._log_clients(result)

    # ------------------------------------------------------------------ run outputs
    def on_train_start(self) -> None:
        # the round is built once per fit, with the model on its device and in its dtype
        self._round = self.build_round()
        # trainer.log_dir is a broadcast under DDP: every rank asks once, here
        self._out_dir = self.trainer.log_dir or self.trainer.default_root_dir
        self._stop_after_evaluation = None
        # the algorithm's server state, before the first round (after a checkpoint's is loaded)
        self.algorithm.init_server({k: p.detach() for k, p in self.net.named_parameters()})
        # the memory pre-flight: one warning line (rank zero) before training if the run will
        # not fit; a round that must hold every result and cannot fit once stops here
        steps = self.trainer.max_steps
        preflight.check(
            self._round, steps - self.trainer.global_step if steps and steps > 0 else None,
            warn=None if self.trainer.is_global_zero else (lambda line: None),
        )
        if self.replicas is not None:
            self.replicas.start(self)

    def _log_clients(self, result: Any) -> None:
        """Append the round's sampled clients to ``<log_dir>/clients.csv``.

        One row per sampled client: ``round`` (from 1), ``client_id``, ``num_samples`` and
        ``status``: ``trained``, ``straggler`` (ran part of its local steps), ``skipped``
        (non-finite update, left out) or ``dropped`` (dropped out before training).
        """
        if self._out_dir is None or self._trainer is None or not self.trainer.is_global_zero:
            return
        path = os.path.join(self._out_dir, "clients.csv")
        status = {c: "dropped" for c in result.dropped}
        status.update({c: "straggler" for c in result.stragglers})
        status.update({c: "skipped" for c in result.skipped_clients})
        sampled = result.sampled or list(zip(result.client_ids, result.client_sizes,
                                             strict=True))
        new = not os.path.isfile(path)
        os.makedirs(self._out_dir, exist_ok=True)
        with open(path, "a", newline="") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(["round", "client_id", "num_samples", "status"])
            for client_id, size in sampled:
                writer.writerow([result.round + 1, client_id, size,
                                 status.get(client_id, "trained")])

    def _record_evaluation(self) -> None:
        """Add the evaluation that has just ended to :attr:`curves` (once per round: a
        checkpoint written at the end of the evaluation records it first)."""
        metrics = self.trainer.callback_metrics
        step = int(self.trainer.global_step)
        for key in ("val_acc", "val_loss"):
            points = self.curves[key]
            if key in metrics and not (points and points[-1][0] == step):
                points.append((step, float(metrics[key])))
        if self.replicas is not None:  # once per round too (validation_end skips a done row)
            self.replicas.validation_end(self, step, metrics)

    def _eval_step(self, batch: Any, metric: MulticlassAccuracy, prefix: str) -> None:
        x, y = batch
        logits = self.net(x.to(self.dtype) if x.is_floating_point() else x)  # token ids stay
        metric.update(logits, y)
        loss = F.cross_entropy(logits, y)
        self.log(f"{prefix}_loss", loss, on_epoch=True, batch_size=len(y), sync_dist=True)
        self.log(f"{prefix}_acc", metric, on_epoch=True, prog_bar=True, batch_size=len(y))

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Accuracy and mean loss of the global model on the data module's test split."""
        dm = self.datamodule
        was_training = self.net.training
        self.net.eval()
        # this process's own evaluation (rank 0 only under DDP): no cross-process sync
        accuracy = MulticlassAccuracy(num_classes=self.num_classes, average="micro",
                                      sync_on_compute=False).to(self.device)
        loss_sum, n = 0.0, 0
        x_all, y_all = dm.test_tensors(self.device, self.dtype)
        batch = dm.eval_batch(self.device)
        for start in range(0, len(y_all), batch):
            x, y = x_all[start:start + batch], y_all[start:start + batch]
            logits = self.net(x)
            accuracy.update(logits, y)
            loss_sum = loss_sum + F.cross_entropy(logits, y, reduction="sum").double()
            n += len(y)
        self.net.train(was_training)
        acc = float(accuracy.compute()) if n else 0.0
        return {"test_acc": acc, "test_loss": float(loss_sum) / max(n, 1)}

    def on_train_end(self) -> None:
        if self.trainer.global_step == 0:
            return
        log_dir = self.trainer.log_dir  # a broadcast under DDP: every rank must ask
        if not self.trainer.is_global_zero:
            return
        rounds = int(self.trainer.global_step)
        if self.replicas is not None:  # every replica's outputs, under <log_dir>/replica_<k>
            metrics = self.replicas.train_end(self)
        else:
            metrics = {"rounds": rounds, **self.evaluate(), **self.systems.final_metrics(rounds)}
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, "final_metrics.json"), "w") as fh:
                json.dump(metrics, fh, indent=2)
        if log_dir is not None:
            curves = plotting.curves(
                self.curves, os.path.join(log_dir, "curves.png"),
                title=f"{type(self.algorithm).__name__}, {rounds} rounds",
            )
            if curves is not None:
                print(f"fl-lightning: learning curves saved to {curves}")
        print(
            f"fl-lightning: final global test accuracy {metrics['test_acc']:.4f} "
            f"(loss {metrics['test_loss']:.4f}) after {metrics['rounds']} rounds"
            + (f"; saved {os.path.join(log_dir, 'final_metrics.json')}" if log_dir else "")
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        if trainer is not None and trainer.validating and trainer.state.fn == "fit":
            self._record_evaluation()  # saved at the end of the round's evaluation
        checkpoint["fl_curves"] = {k: [list(p) for p in v] for k, v in self.curves.items()}
        checkpoint["fl_algorithm_state"] = self.algorithm.state_dict()
        if self.systems.active:
            checkpoint["fl_systems_state"] = self.systems.state_dict()
        if self.replicas is not None:
            checkpoint["fl_replicas"] = self.replicas.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for key, points in checkpoint.get("fl_curves", {}).items():
            self.curves[key] = [(int(r), float(v)) for r, v in points]
        self.algorithm.load_state_dict(checkpoint.get("fl_algorithm_state", {}))
        self.systems.load_state_dict(checkpoint.get("fl_systems_state", {}))
        path = getattr(self._trainer, "ckpt_path", None) if self._trainer is not None else None
        if self.replicas is not None:
            self.replicas.load_state_dict(checkpoint.get("fl_replicas"), str(path))
        elif checkpoint.get("fl_replicas") is not None:
            raise ConfigError(
                f"--ckpt_path={path} was written by a run with replicas "
                f"{[r['values'] for r in checkpoint['fl_replicas']['replicas']]}: resume it "
                "with the same --replicas.* options"
            )
