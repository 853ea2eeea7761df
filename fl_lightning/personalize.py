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

from fl_lightning.algorithms.base import Algorithm, Params
from fl_lightning.algorithms.features import FeatureCaller
from fl_lightning.algorithms.fedavg import FedAvg
from fl_lightning.algorithms.perfedavg import PerFedAvg
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine
from fl_lightning.errors import ConfigError

__all__ = ["PersonalizedEvaluation", "client_test_indices", "knn_logits", "personalize"]

METHODS = ("finetune", "perfedavg", "knn")


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
    if len(y) == 0:
        return float("nan")
    logits = functional_call(net, (params, buffers), (x,))
    if extra is not None:
        logits = weight * extra + (1.0 - weight) * logits
    return float(multiclass_accuracy(logits, y, logits.shape[1], average="micro"))


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
) -> dict[str, Any]:
    """Fine-tune ``start`` per client and evaluate on per-client test sets.

    Returns ``{"acc_mean", "acc_std", "before_mean", "before_std", "clients", "acc",
    "before"}``: the accuracies after and before fine-tuning (the latter is ``start`` itself on
    the same per-client test sets).
    """
    if method not in METHODS:
        raise ConfigError(f"personalization method {method!r} is unknown: use one of {METHODS}")
    dm = datamodule
    device = next(iter(start.values())).device
    dtype = next(iter(start.values())).dtype
    x_all, y_all = dm.train_tensors(device, dtype)
    ids = list(range(dm.num_clients)) if clients is None else [int(c) for c in clients]
    test_idx = client_test_indices(
        [y_all[dm.client_indices[c].to(device)] for c in ids], dm.test_y, dm.num_classes, amount,
        seed,
    )
    buffers = {k: b.detach() for k, b in net.named_buffers()}
    algo: Algorithm = PerFedAvg(beta=beta) if method == "perfedavg" else FedAvg()
    engine = SequentialEngine()
    caller = FeatureCaller(net, "kNN-Per") if method == "knn" else None
    acc, before = [], []
    for c, t_idx in zip(ids, test_idx, strict=True):
        x_t = dm.test_x[t_idx].to(device, dtype)
        y_t = dm.test_y[t_idx].to(device)
        before.append(_accuracy(net, start, buffers, x_t, y_t))
        # a round index no federated round uses: fresh, reproducible local data order
        batches = dm.client_batches(10**9 + 7, c, epochs, batch_size)
        plan = RoundPlan(round=0, clients=[ClientPlan(c, len(dm.client_indices[c]), batches)])
        [res] = engine.run_round(algo, net, start, buffers, plan, (x_all, y_all), lr, momentum,
                                 weight_decay)
        extra = None
        if caller is not None:
            own = dm.client_indices[c]
            gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + c)
            if len(own) > knn_capacity:
                own = own[torch.randperm(len(own), generator=gen)[:knn_capacity]]
            own = own.to(device)
            with torch.no_grad():
                f_train = caller.features(res.params, buffers, x_all[own])
                f_test = caller.features(res.params, buffers, x_t)
            extra = knn_logits(f_train, y_all[own], f_test, dm.num_classes, knn_k, knn_scale)
        acc.append(_accuracy(net, res.params, buffers, x_t, y_t, extra, knn_weight))
    acc_t = np.array([a for a in acc if not math.isnan(a)])
    bef_t = np.array([a for a in before if not math.isnan(a)])
    return {
        "method": method,
        "epochs": int(epochs),
        "acc_mean": float(acc_t.mean()) if len(acc_t) else float("nan"),
        "acc_std": float(acc_t.std()) if len(acc_t) else float("nan"),
        "before_mean": float(bef_t.mean()) if len(bef_t) else float("nan"),
        "before_std": float(bef_t.std()) if len(bef_t) else float("nan"),
        "clients": ids,
        "acc": acc,
        "before": before,
    }


class PersonalizedEvaluation(pl.Callback):
    """Runs :func:`personalize` after the last round and reports mean/std over clients.

    Add it with ``--trainer.callbacks+=fl_lightning.personalize.PersonalizedEvaluation``. The
    fine-tuning uses the module's local optimizer settings (momentum, weight decay, batch size)
    and the local learning rate of the round after the last one (``lr * decay^R``, as the
    official code's scheduler has it). Results are printed, logged as ``pers_acc_mean`` /
    ``pers_acc_std`` and written to ``personalized_metrics.json`` in the log directory.

    Args:
        epochs: fine-tuning epochs per client; unset: ``min(local_epochs, 5)`` (official).
        method: ``finetune``, ``perfedavg`` or ``knn`` (see the module docstring).
        start: ``global`` (the trained global model) or ``initial`` (the weights before round
            0: LocalOnly).
        num_clients: evaluate only the first ``num_clients`` clients (all when unset).
        amount: size parameter of the per-client test sets (official: 1000).
        seed: seed of the per-client test sets.
        beta: Per-FedAvg's meta step size (``method="perfedavg"``).
        knn_k, knn_capacity, knn_weight, knn_scale: kNN-Per's settings (official: 5, 500,
            0.5, 1).

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
        num_clients: int | None = None,
        amount: int = 1000,
        seed: int = 0,
        beta: float = 0.01,
        knn_k: int = 5,
        knn_capacity: int = 500,
        knn_weight: float = 0.5,
        knn_scale: float = 1.0,
    ) -> None:
        if epochs is not None and (isinstance(epochs, bool) or int(epochs) < 1):
            raise ConfigError(
                f"PersonalizedEvaluation epochs={epochs!r} is invalid: it must be an integer >= 1 "
                "(or unset for the official min(local_epochs, 5))"
            )
        if method not in METHODS:
            raise ConfigError(
                f"PersonalizedEvaluation method={method!r} is unknown: use one of "
                f"{', '.join(METHODS)}"
            )
        if start not in ("global", "initial"):
            raise ConfigError(
                f"PersonalizedEvaluation start={start!r} is unknown: use 'global' or 'initial'"
            )
        self.epochs = None if epochs is None else int(epochs)
        self.method = method
        self.start = start
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

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == 0 or not trainer.is_global_zero:
            return
        module = pl_module
        dm = module.datamodule
        if self.start == "initial" and self.initial is not None:
            start = {k: v.to(module.device) for k, v in self.initial.items()}
        else:
            start = {k: p.detach() for k, p in module.net.named_parameters()}
        n = dm.num_clients if self.num_clients is None else min(int(self.num_clients),
                                                                  dm.num_clients)
        epochs = self.epochs if self.epochs is not None else min(module.local_epochs, 5)
        result = personalize(
            module.net, dm, start, epochs, module.local_lr_at(trainer.global_step),
            module.momentum, module.weight_decay, module.batch_size, self.method,
            clients=range(n), amount=self.amount, seed=self.seed, beta=self.beta, **self.knn,
        )
        self.result = result
        print(
            f"fl-lightning: personalized ({self.method}, {epochs} epochs, start="
            f"{self.start}, {len(result['clients'])} clients) accuracy "
            f"{result['acc_mean']:.4f} +- {result['acc_std']:.4f} (before fine-tuning "
            f"{result['before_mean']:.4f} +- {result['before_std']:.4f})"
        )
        log_dir = trainer.log_dir
        if log_dir is not None:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, "personalized_metrics.json"), "w") as fh:
                json.dump({"start": self.start, **result}, fh, indent=2)
