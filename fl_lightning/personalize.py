"""Personalized evaluation (FedSoL paper, Table 5): fine-tune per client, test per client.

After federated training each client starts from the global model (or, for LocalOnly, from the
initial weights), fine-tunes it on its own training data for ``epochs`` epochs with the local
optimizer, and is evaluated on a test set drawn from the global test split with the client's
own label distribution (the official code's ``test_data_partitioning``: for each class ``c``,
``min(available_c, int(amount * p_c))`` test samples without replacement, ``p_c`` the client's
training label share). The report is the mean and the standard deviation (over clients) of
the per-client accuracies.

Methods: ``finetune`` (FedAvg-FT, FedSoL-FT, FedBABU, LocalOnly with ``start="initial"``),
``perfedavg`` (Per-FedAvg's first-order meta steps as the fine-tuning steps) and ``knn``
(kNN-Per: fine-tune, then mix the model's logits with a k-nearest-neighbour vote over the
client's training features).

Fine-tuning batches get the data module's training augmentation (``augment=True``, as the
official code, which fine-tunes on the client's training loader with its training transforms),
keyed by the fine-tuning round :data:`FINETUNE_ROUND`, so a fine-tuning run is bit-reproducible
from the data seed. One SGD optimizer (momentum kept across epochs) runs all epochs of a client;
``lr_decay`` multiplies its learning rate after every epoch (LocalOnly's official protocol:
200 epochs from the initial weights at ``0.01 * 0.99^epoch``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics.functional.classification import multiclass_accuracy

from fl_lightning import validate
from fl_lightning.algorithms.base import Algorithm, ClientResult, Params
from fl_lightning.algorithms.features import FeatureCaller
from fl_lightning.algorithms.fedavg import FedAvg
from fl_lightning.algorithms.perfedavg import PerFedAvg
from fl_lightning.engine import SequentialEngine
from fl_lightning.errors import ConfigError
from fl_lightning.protocol import ClientPlan, RoundPlan

__all__ = [
    "FINETUNE_ROUND",
    "PersonalizedEvaluation",
    "client_test_indices",
    "epoch_learning_rates",
    "finetune_client",
    "knn_logits",
    "personalize",
]

METHODS = ("finetune", "perfedavg", "knn")
LR_RULES = ("next_round", "initial")

#: The round index of the fine-tuning data order and augmentation draws: one that no federated
#: round uses, so fine-tuning sees a fresh, reproducible order.
FINETUNE_ROUND = 10**9 + 7


def client_test_indices(
    client_labels: Sequence[Tensor], test_labels: Tensor, num_classes: int, amount: int = 1000,
    seed: int = 0,
) -> list[Tensor]:
    """Per-client test indices drawn with each client's training label distribution.

    For client ``k`` with label shares ``p_c``, ``min(n_c, int(amount * p_c))`` indices of class
    ``c`` are drawn without replacement from the test split (``n_c`` test samples of class c),
    independently per client, from a generator seeded by ``(seed, k)``.

    Example:
        >>> idx = client_test_indices([torch.tensor([0, 0, 0, 1])], torch.tensor([0, 1] * 10), 2,
        ...                           amount=8)
        >>> torch.bincount(torch.tensor([0, 1] * 10)[idx[0]]).tolist()
        [6, 2]
    """
    test_np = test_labels.cpu().numpy()
    by_class = [np.flatnonzero(test_np == c) for c in range(num_classes)]
    out: list[Tensor] = []
    for k, labels in enumerate(client_labels):
        counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
        share = (counts / counts.sum()).tolist()
        rng = np.random.default_rng([int(seed), k])
        picked = [
            rng.choice(by_class[c], min(len(by_class[c]), int(amount * p)), replace=False)
            for c, p in enumerate(share)
        ]
        out.append(torch.as_tensor(np.concatenate(picked).astype(np.int64)))
    return out


def knn_logits(
    train_features: Tensor, train_labels: Tensor, features: Tensor, num_classes: int, k: int = 5,
    scale: float = 1.0,
) -> Tensor:
    """kNN-Per's vote: ``sum_j s_j onehot(y_j) / sum_j s_j`` over the ``k`` nearest training
    features (squared L2), with ``s_j = exp(-d_j / (dim * scale))``."""
    d = torch.cdist(features.double(), train_features.double()).pow(2)
    k = min(k, len(train_labels))
    dist, idx = d.topk(k, dim=1, largest=False)
    sim = torch.exp(-dist / (features.shape[1] * scale))
    onehot = torch.nn.functional.one_hot(train_labels[idx], num_classes).double()
    return ((sim.unsqueeze(-1) * onehot).sum(1) / sim.sum(1, keepdim=True)).to(features.dtype)


@torch.no_grad()
def _accuracy(net: nn.Module, params: Params, buffers: Params, x: Tensor, y: Tensor,
              extra: Tensor | None = None, weight: float = 0.0) -> float:
    """Micro accuracy in eval mode (no dropout), as the official ``evaluate_model``."""
    if len(y) == 0:
        return float("nan")
    was_training = net.training
    net.eval()
    try:
        logits = functional_call(net, (params, buffers), (x,))
    finally:
        net.train(was_training)
    if extra is not None:
        logits = weight * extra + (1.0 - weight) * logits
    return float(multiclass_accuracy(logits, y, logits.shape[1], average="micro"))


def epoch_learning_rates(lr: float, lr_decay: float, epochs: int) -> list[float]:
    """The learning rate of each fine-tuning epoch: ``lr * lr_decay^e``, multiplied out epoch
    by epoch as ``torch.optim.lr_scheduler.StepLR(gamma=lr_decay, step_size=1)`` stepped after
    every epoch does.

    Example:
        >>> [round(v, 6) for v in epoch_learning_rates(0.01, 0.5, 3)]
        [0.01, 0.005, 0.0025]
    """
    out, rate = [], float(lr)
    for _ in range(int(epochs)):
        out.append(rate)
        rate *= lr_decay
    return out


def finetune_plan(
    datamodule: Any, client: int, epochs: int, batch_size: int, lr: float, lr_decay: float,
    augment: bool,
) -> RoundPlan:
    """The fine-tuning of ``client`` as a one-client :class:`~fl_lightning.protocol.RoundPlan`
    of round :data:`FINETUNE_ROUND`: ``epochs`` passes over its samples in batches of
    ``batch_size``, the step learning rates ``lr * lr_decay^e`` of epoch ``e``, and the data
    module's training augmentation as the batch transform when ``augment`` and it has one."""
    dm = datamodule
    batches = dm.client_batches(FINETUNE_ROUND, client, epochs, batch_size)
    per_epoch = len(batches) // epochs
    lrs = [rate for rate in epoch_learning_rates(lr, lr_decay, epochs) for _ in range(per_epoch)]
    transform = None
    if augment and getattr(dm, "augmentation", None) is not None:
        transform = dm.augment_batch
    return RoundPlan(
        round=FINETUNE_ROUND, clients=[ClientPlan(client, len(dm.client_indices[client]),
                                                  batches, lrs)],
        transform=transform,
    )


def finetune_client(
    net: nn.Module,
    datamodule: Any,
    start: Params,
    client: int,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    algorithm: Algorithm | None = None,
    lr_decay: float = 1.0,
    augment: bool = True,
    data: tuple[Tensor, Tensor] | None = None,
) -> ClientResult:
    """Fine-tune ``start`` on client ``client``'s training data; returns its :class:`ClientResult`.

    ``epochs`` passes over the client's samples in batches of ``batch_size`` (a fresh order per
    epoch, keyed by :data:`FINETUNE_ROUND`), one SGD optimizer for all of them (``momentum``,
    ``weight_decay``; the momentum buffer is kept across epochs), at ``lr * lr_decay^e`` in epoch
    ``e``, with the algorithm's local direction (``FedAvg``: plain cross-entropy). With
    ``augment`` and a data module that has a training augmentation, every batch is augmented
    with the draws keyed ``(seed, FINETUNE_ROUND, client, step, sample)``.

    Example:
        >>> from fl_lightning.data.module import FederatedDataModule
        >>> from fl_lightning.models.cnn import FedAvgCNN
        >>> dm = FederatedDataModule(dataset="digits", num_clients=4); dm.setup("fit")
        >>> net = FedAvgCNN(dm.num_classes, dm.input_shape)
        >>> start = {k: p.detach() for k, p in net.named_parameters()}
        >>> res = finetune_client(net, dm, start, 0, epochs=1, lr=0.01, momentum=0.9,
        ...                       weight_decay=1e-5, batch_size=50)
        >>> res.num_steps == -(-len(dm.client_indices[0]) // 50)
        True
    """
    if isinstance(epochs, bool) or int(epochs) < 1:
        raise ConfigError(f"fine-tuning epochs={epochs!r} is invalid: it must be an integer >= 1")
    validate.positive(lr_decay, "fine-tuning lr_decay", "1: constant; LocalOnly's official 0.99")
    if data is None:
        ref = next(iter(start.values()))
        data = datamodule.train_tensors(ref.device, ref.dtype)
    buffers = {k: b.detach() for k, b in net.named_buffers()}
    plan = finetune_plan(datamodule, client, int(epochs), batch_size, lr, lr_decay, augment)
    was_training = net.training
    net.train()
    try:
        [res] = SequentialEngine().run_round(
            algorithm if algorithm is not None else FedAvg(), net, start, buffers, plan, data,
            lr, momentum, weight_decay,
        )
    finally:
        net.train(was_training)
    return res


def personalize(
    net: nn.Module,
    datamodule: Any,
    start: Params,
    epochs: int,
    lr: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    method: Literal["finetune", "perfedavg", "knn"] = "finetune",
    clients: Sequence[int] | None = None,
    amount: int = 1000,
    seed: int = 0,
    beta: float = 0.01,
    knn_k: int = 5,
    knn_capacity: int = 500,
    knn_weight: float = 0.5,
    knn_scale: float = 1.0,
    lr_decay: float = 1.0,
    augment: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``start`` per client (:func:`finetune_client`) and evaluate on per-client test
    sets.

    Returns ``{"acc_mean", "acc_std", "before_mean", "before_std", "clients", "acc",
    "before"}``: the accuracies after and before fine-tuning (the latter is ``start`` itself on
    the same per-client test sets). (Over 60 lines only by its 19 options; the body is ~40.)
    """
    validate.choice(method, "personalization method", METHODS)
    dm = datamodule
    ref = next(iter(start.values()))
    device, dtype = ref.device, ref.dtype
    x_all, y_all = dm.train_tensors(device, dtype)
    ids = list(range(dm.num_clients)) if clients is None else [int(c) for c in clients]
    test_idx = client_test_indices(
        [y_all[dm.client_indices[c].to(device)] for c in ids], dm.test_y, dm.num_classes, amount,
        seed,
    )
    buffers = {k: b.detach() for k, b in net.named_buffers()}
    algo: Algorithm = PerFedAvg(beta=beta) if method == "perfedavg" else FedAvg()
    caller = FeatureCaller(net, "kNN-Per") if method == "knn" else None
    acc, before = [], []
    for c, t_idx in zip(ids, test_idx, strict=True):
        x_t = dm.test_x[t_idx].to(device, dtype)
        y_t = dm.test_y[t_idx].to(device)
        before.append(_accuracy(net, start, buffers, x_t, y_t))
        res = finetune_client(net, dm, start, c, epochs, lr, momentum, weight_decay,
                              batch_size, algo, lr_decay, augment, (x_all, y_all))
        extra = None
        if caller is not None:
            own = _knn_memory(dm.client_indices[c], knn_capacity, int(seed) * 1_000_003 + c)
            own = own.to(device)
            f_train, f_test = _features(net, caller, res.params, buffers, x_all[own], x_t)
            extra = knn_logits(f_train, y_all[own], f_test, dm.num_classes, knn_k, knn_scale)
        acc.append(_accuracy(net, res.params, buffers, x_t, y_t, extra, knn_weight))
    acc_mean, acc_std = _mean_std(acc)
    before_mean, before_std = _mean_std(before)
    augmented = bool(augment and getattr(dm, "augmentation", None) is not None)
    return {"method": method, "epochs": int(epochs), "lr": float(lr), "lr_decay": float(lr_decay),
            "augment": augmented, "acc_mean": acc_mean, "acc_std": acc_std,
            "before_mean": before_mean, "before_std": before_std, "clients": ids, "acc": acc,
            "before": before}


def _knn_memory(own: Tensor, capacity: int, seed: int) -> Tensor:
    """kNN-Per's memory: the client's sample indices ``own``, or ``capacity`` of them drawn
    without replacement with a generator seeded ``seed`` when it has more."""
    if len(own) > capacity:
        gen = torch.Generator().manual_seed(seed)
        own = own[torch.randperm(len(own), generator=gen)[:capacity]]
    return own


def _features(net: nn.Module, caller: FeatureCaller, params: Params, buffers: Params,
              x_train: Tensor, x_test: Tensor) -> tuple[Tensor, Tensor]:
    """Penultimate features of ``x_train`` and ``x_test`` under ``params`` (eval mode, no
    gradient; the network's mode restored)."""
    was_training = net.training
    net.eval()
    with torch.no_grad():
        f_train = caller.features(params, buffers, x_train)
        f_test = caller.features(params, buffers, x_test)
    net.train(was_training)
    return f_train, f_test


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation of the values that are not NaN; NaN, NaN
    when there are none."""
    kept = np.array([v for v in values if not math.isnan(v)])
    if not len(kept):
        return float("nan"), float("nan")
    return float(kept.mean()), float(kept.std())


class PersonalizedEvaluation(pl.Callback):
    """Runs :func:`personalize` after the last round and reports mean/std over clients.

    Add it with ``--trainer.callbacks+=fl_lightning.personalize.PersonalizedEvaluation``. The
    fine-tuning uses the module's local optimizer settings (momentum, weight decay, batch size)
    and by default the local learning rate of the round after the last one (``lr * decay^R``:
    the official code hands its round-decayed optimizer to the fine-tuning clients). Results
    are printed and written to ``personalized_metrics.json`` in the log directory (and kept in
    :attr:`result`).

    The official LocalOnly protocol (``configs/algorithms/pers_localonly.yaml``) is
    ``start="initial", epochs=200, lr="initial", lr_decay=0.99``: every client trains from the
    weights before round 0 for 200 epochs at ``local_lr * 0.99^epoch``.

    Args:
        epochs: fine-tuning epochs per client; unset: ``min(local_epochs, 5)`` (the official
            fine-tuning rule of the federated methods).
        method: ``finetune``, ``perfedavg`` or ``knn`` (see the module docstring).
        start: ``global`` (the trained global model) or ``initial`` (the weights before round
            0: LocalOnly).
        lr: ``next_round`` (the local learning rate of the round after the last one),
            ``initial`` (``--model.local_lr``, the rate of round 0: LocalOnly) or a number.
        lr_decay: factor applied to the learning rate after every fine-tuning epoch (1: none;
            LocalOnly's official 0.99).
        augment: fine-tune on batches with the data module's training augmentation
            (``--data.augment``), as the official code does.
        num_clients: evaluate only the first ``num_clients`` clients (all when unset).
        amount: size parameter of the per-client test sets (official: 1000).
        seed: seed of the per-client test sets.
        beta: Per-FedAvg's meta step size (``method="perfedavg"``).
        knn_k, knn_capacity, knn_weight, knn_scale: kNN-Per's settings (official: 5, 500,
            0.5, 1).

    Raises:
        ConfigError: for an invalid ``epochs``, ``method``, ``start``, ``lr`` or ``lr_decay``.

    Example:
        >>> PersonalizedEvaluation(epochs=1).epochs
        1
        >>> PersonalizedEvaluation().epochs is None  # min(local_epochs, 5)
        True
    """

    def __init__(
        self,
        epochs: int | None = None,
        method: Literal["finetune", "perfedavg", "knn"] = "finetune",
        start: Literal["global", "initial"] = "global",
        lr: float | Literal["next_round", "initial"] = "next_round",
        lr_decay: float = 1.0,
        augment: bool = True,
        num_clients: int | None = None,
        amount: int = 1000,
        seed: int = 0,
        beta: float = 0.01,
        knn_k: int = 5,
        knn_capacity: int = 500,
        knn_weight: float = 0.5,
        knn_scale: float = 1.0,
    ) -> None:
        """Checks and stores the LightningCLI options (see the class docstring)."""
        option = "--trainer.callbacks.PersonalizedEvaluation.{}".format
        if epochs is not None:
            validate.integer(epochs, option("epochs"), 1, hint="or unset for min(local_epochs, 5)")
        validate.choice(method, option("method"), METHODS)
        validate.choice(start, option("start"), ("global", "initial"))
        if isinstance(lr, str):
            validate.choice(lr, option("lr"), LR_RULES, hint="or a number >= 0")
        else:
            validate.nonnegative(lr, option("lr"), hint="or 'next_round' or 'initial'")
        validate.positive(lr_decay, option("lr_decay"), "1: constant; LocalOnly's official 0.99")
        self.epochs = None if epochs is None else int(epochs)
        self.method = method
        self.start = start
        self.lr = lr if isinstance(lr, str) else float(lr)
        self.lr_decay = float(lr_decay)
        self.augment = bool(augment)
        self.num_clients = num_clients
        self.amount = int(amount)
        self.seed = int(seed)
        self.beta = float(beta)
        self.knn = {"knn_k": int(knn_k), "knn_capacity": int(knn_capacity),
                    "knn_weight": float(knn_weight), "knn_scale": float(knn_scale)}
        self.initial: Params | None = None
        self.result: dict[str, Any] | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.initial is None:
            self.initial = {k: p.detach().clone() for k, p in pl_module.net.named_parameters()}

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.initial = state_dict.get("initial")

    def learning_rate(self, module: Any, rounds: int) -> float:
        """The fine-tuning learning rate of epoch 0 after ``rounds`` federated rounds."""
        if self.lr == "next_round":
            return module.local_lr_at(rounds)
        if self.lr == "initial":
            return module.local_lr_at(0)
        return float(self.lr)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0:
            return
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must ask
        if not trainer.is_global_zero:
            return
        module = pl_module
        dm = module.datamodule
        if self.start == "initial":
            if self.initial is None:
                raise ConfigError(
                    "PersonalizedEvaluation start='initial' has no initial weights: the callback "
                    "must be attached before fit starts"
                )
            start = {k: v.to(module.device) for k, v in self.initial.items()}
        else:
            start = {k: p.detach() for k, p in module.net.named_parameters()}
        n = dm.num_clients if self.num_clients is None else min(int(self.num_clients),
                                                                  dm.num_clients)
        epochs = self.epochs if self.epochs is not None else min(module.local_epochs, 5)
        lr = self.learning_rate(module, trainer.global_step)
        result = personalize(
            module.net, dm, start, epochs, lr, module.momentum, module.weight_decay,
            module.batch_size, self.method, clients=range(n), amount=self.amount,
            seed=self.seed, beta=self.beta, lr_decay=self.lr_decay, augment=self.augment,
            **self.knn,
        )
        self.result = result
        print(
            f"fl-lightning: personalized ({self.method}, {epochs} epochs from lr {lr:.4g}"
            f" x {self.lr_decay:g}/epoch, augment={result['augment']}, start={self.start}, "
            f"{len(result['clients'])} clients) accuracy "
            f"{result['acc_mean']:.4f} +- {result['acc_std']:.4f} (before fine-tuning "
            f"{result['before_mean']:.4f} +- {result['before_std']:.4f})"
        )
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, "personalized_metrics.json"), "w") as fh:
                json.dump({"start": self.start, **result}, fh, indent=2)
