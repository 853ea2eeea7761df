"""``FederatedDataModule``: a dataset split across clients, round plans, global evaluation."""

from __future__ import annotations

import math
import os
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from fl_lightning.data.augment import BatchAugment, paper_augmentation
from fl_lightning.data.datasets import dataset_info, load_dataset
from fl_lightning.data.partition import partition_indices
from fl_lightning.data.ticker import RoundTicker
from fl_lightning.engine import ClientPlan, RoundPlan
from fl_lightning.errors import ConfigError
from fl_lightning.suggest import did_you_mean

__all__ = ["FederatedDataModule"]

PARTITIONS = ("iid", "shard", "lda")
AUGMENTATIONS = ("paper", "none")
#: Extra key of the augmentation seed, so it never equals a batch-order seed.
_AUGMENT_STREAM = 1


def _sub_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of the integer keys."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


class FederatedDataModule(pl.LightningDataModule):
    """A dataset partitioned across ``num_clients`` clients, with Non-IID label skew.

    The training set is split once by ``partition`` (a pure function of the labels and
    ``seed``) and kept as tensors; local training reads mini-batches by index, so no per-client
    ``DataLoader`` exists. Every round, :meth:`round_plan` samples the participating clients and
    the order of each client's samples as pure functions of ``(seed, round, client)``, so a run
    resumed from a checkpoint sees exactly the data the uninterrupted run saw. Training batches
    are augmented on the device (:mod:`fl_lightning.data.augment`) with random draws seeded by
    ``(seed, round, client, step)``. The global model is evaluated on the dataset's test split
    (never augmented).

    Args:
        dataset: ``digits`` (offline, bundled with scikit-learn), ``mnist``, ``cifar10``,
            ``svhn``, ``cinic10`` or any MedMNIST 2D flag (e.g. ``pathmnist``, ``tissuemnist``).
        data_dir: folder holding the files (``MNIST/raw/...``,
            ``cifar10/cifar-10-batches-py/...``, ``svhn/*_32x32.mat``,
            ``cinic10/{train,test}/<class>/*.png``, ``medmnist/<flag>.npz``; see
            ``docs/data.md``). Nothing is written there unless ``download`` is true.
        download: download missing files (needs a network).
        num_clients: number of clients the training set is split across.
        partition: ``iid``, ``shard`` (``shards_per_client`` label-sorted shards per client) or
            ``lda`` (Dirichlet(``alpha``) class proportions per client).
        shards_per_client: ``s`` of the shard partition.
        alpha: concentration of the LDA partition (smaller is more heterogeneous).
        seed: seed of the partition, the client sampling and the local data order.
        reference_partition: reproduce the official FedSoL code's partition exactly (its
            procedure and its random number stream, seeded by ``seed``; the paper used 19940817).
        sampling: ``seeded`` (clients drawn from ``(seed, round)``) or ``official`` (the official
            code's draw, ``numpy.random.seed(round)``, independent of ``seed``).
        eval_batch_size: batch size of the global evaluation.
        augment: ``paper`` (the official code's training augmentation for the dataset) or
            ``none``.
        verify_checksums: check the raw files against the MD5 checksums the libraries ship;
            switch off only for files you produced yourself.

    Raises:
        ConfigError: for an unknown dataset or partition, or out-of-range numbers.

    Example:
        >>> dm = FederatedDataModule(dataset="digits", num_clients=10, partition="iid")
        >>> dm.num_classes, dm.input_shape
        (10, (1, 8, 8))
    """

    def __init__(
        self,
        dataset: str = "digits",
        data_dir: str = "data",
        download: bool = False,
        num_clients: int = 100,
        partition: Literal["iid", "shard", "lda"] = "lda",
        shards_per_client: int = 2,
        alpha: float = 0.1,
        seed: int = 0,
        reference_partition: bool = False,
        sampling: Literal["seeded", "official"] = "seeded",
        eval_batch_size: int = 1000,
        augment: Literal["paper", "none"] = "paper",
        verify_checksums: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.info = dataset_info(dataset)
        if partition not in PARTITIONS:
            raise ConfigError(
                f"--data.partition={partition!r} is unknown"
                f"{did_you_mean(str(partition), PARTITIONS, prefix='--data.partition ')}: use one "
                f"of {', '.join(PARTITIONS)}"
            )
        if isinstance(num_clients, bool) or int(num_clients) < 1:
            raise ConfigError(
                f"--data.num_clients={num_clients!r} is invalid: it must be an integer >= 1"
            )
        if partition == "lda" and not (math.isfinite(float(alpha)) and float(alpha) > 0):
            raise ConfigError(
                f"--data.alpha={alpha!r} is invalid: the Dirichlet concentration must be a finite "
                "number > 0 "
                "(e.g. 0.1 for strong, 1.0 for mild heterogeneity)"
            )
        if partition == "shard" and int(shards_per_client) < 1:
            raise ConfigError(
                f"--data.shards_per_client={shards_per_client!r} is invalid: it must be >= 1"
            )
        if isinstance(seed, bool) or int(seed) < 0:
            raise ConfigError(f"--data.seed={seed!r} is invalid: use an integer >= 0")
        if int(eval_batch_size) < 1:
            raise ConfigError(
                f"--data.eval_batch_size={eval_batch_size!r} is invalid: it must be >= 1"
            )
        if sampling not in ("seeded", "official"):
            raise ConfigError(
                f"--data.sampling={sampling!r} is unknown: use 'seeded' or 'official'"
            )
        if augment not in AUGMENTATIONS:
            raise ConfigError(
                f"--data.augment={augment!r} is unknown: use 'paper' (the official code's "
                "augmentation) or 'none'"
            )
        if not isinstance(verify_checksums, bool):
            raise ConfigError(
                f"--data.verify_checksums={verify_checksums!r} is invalid: use true or false"
            )
        self.dataset = dataset
        self.data_dir = os.fspath(data_dir)
        self.download = bool(download)
        self.num_clients = int(num_clients)
        self.partition = partition
        self.shards_per_client = int(shards_per_client)
        self.alpha = float(alpha)
        self.seed = int(seed)
        self.reference_partition = bool(reference_partition)
        self.sampling = sampling
        self.eval_batch_size = int(eval_batch_size)
        self.augment = augment
        self.verify_checksums = verify_checksums
        self.augmentation: BatchAugment | None = (
            paper_augmentation(dataset) if augment == "paper" else None
        )
        self.train_x: Tensor | None = None
        self.train_y: Tensor | None = None
        self.test_x: Tensor | None = None
        self.test_y: Tensor | None = None
        self.client_indices: list[Tensor] = []
        self._device_cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ static facts
    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.info.input_shape)

    # ------------------------------------------------------------------ Lightning hooks
    def prepare_data(self) -> None:
        if self.download:
            for split in ("train", "test"):
                load_dataset(self.dataset, self.data_dir, True, split, self.verify_checksums)

    def setup(self, stage: str | None = None) -> None:
        if self.test_x is None:
            self.test_x, self.test_y = load_dataset(
                self.dataset, self.data_dir, False, "test", self.verify_checksums
            )
        if stage in (None, "fit") and self.train_x is None:
            self.train_x, self.train_y = load_dataset(
                self.dataset, self.data_dir, False, "train", self.verify_checksums
            )
            parts = partition_indices(
                self.train_y.numpy(),
                self.num_clients,
                self.partition,
                shards_per_client=self.shards_per_client,
                alpha=self.alpha,
                seed=self.seed,
                reference=self.reference_partition,
            )
            self.client_indices = [torch.as_tensor(p, dtype=torch.long) for p in parts]
            empty = [k for k, p in enumerate(self.client_indices) if len(p) == 0]
            if empty:
                raise ConfigError(
                    f"--data.num_clients={self.num_clients} leaves client {empty[0]} without "
                    f"data under --data.partition={self.partition}: use fewer clients"
                )

    def train_dataloader(self) -> RoundTicker:
        trainer = self.trainer
        rounds = trainer.max_steps if trainer is not None else -1
        if rounds is None or rounds < 1:
            raise ConfigError(
                f"--trainer.max_steps={rounds} is invalid: set it to the number of "
                "communication rounds (e.g. --trainer.max_steps 200)"
            )
        return RoundTicker(rounds)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def _eval_loader(self) -> DataLoader:
        if self.test_x is None:
            self.setup("test")
        return DataLoader(
            TensorDataset(self.test_x, self.test_y), batch_size=self.eval_batch_size, shuffle=False
        )

    # ------------------------------------------------------------------ federated API
    @property
    def client_sizes(self) -> list[int]:
        return [len(p) for p in self.client_indices]

    def train_tensors(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """The whole training set as ``(x, y)`` on ``device``, ``x`` in ``dtype`` (default: as
        loaded); copied once per ``(device, dtype)``."""
        if self.train_x is None:
            self.setup("fit")
        key = (torch.device(device), dtype or self.train_x.dtype)
        if key not in self._device_cache:
            self._device_cache[key] = (
                self.train_x.to(key[0], key[1]), self.train_y.to(key[0])
            )
        return self._device_cache[key]

    def sample_clients(self, round_idx: int, clients_per_round: int) -> list[int]:
        """The ids of the clients that train in round ``round_idx`` (without replacement)."""
        if self.sampling == "official":
            rng = np.random.RandomState(round_idx)
            chosen = rng.choice(self.num_clients, clients_per_round, replace=False)
        else:
            rng = np.random.default_rng([self.seed, round_idx])
            chosen = rng.choice(self.num_clients, clients_per_round, replace=False)
        return [int(c) for c in chosen]

    def client_batches(
        self, round_idx: int, client_id: int, local_epochs: int, batch_size: int
    ) -> list[Tensor]:
        """Mini-batches of training-set indices for one client's local epochs.

        Each epoch is a fresh random permutation of the client's samples cut into batches of
        ``batch_size`` (the last one may be smaller), as a shuffling ``DataLoader`` would give.
        """
        indices = self.client_indices[client_id]
        gen = torch.Generator().manual_seed(_sub_seed(self.seed, round_idx, client_id))
        batches: list[Tensor] = []
        for _ in range(local_epochs):
            order = indices[torch.randperm(len(indices), generator=gen)]
            batches.extend(order.split(batch_size))
        return batches

    def augment_batch(self, x: Tensor, round_idx: int, client_id: int, step: int) -> Tensor:
        """``x`` augmented with random draws seeded by ``(seed, round, client, step)``."""
        if self.augmentation is None:
            return x
        gen = torch.Generator(device=x.device)
        gen.manual_seed(_sub_seed(self.seed, round_idx, client_id, step, _AUGMENT_STREAM))
        return self.augmentation(x, gen)

    def round_plan(
        self, round_idx: int, clients_per_round: int, local_epochs: int, batch_size: int
    ) -> RoundPlan:
        """Sampled clients and their per-step batches for round ``round_idx``."""
        if not self.client_indices:
            self.setup("fit")
        clients = [
            ClientPlan(
                client_id=c,
                num_samples=len(self.client_indices[c]),
                batches=self.client_batches(round_idx, c, local_epochs, batch_size),
            )
            for c in self.sample_clients(round_idx, clients_per_round)
        ]
        transform = None if self.augmentation is None else self.augment_batch
        return RoundPlan(
            round=round_idx, clients=clients, transform=transform,
            num_clients=self.num_clients, total_samples=sum(self.client_sizes),
        )
