"""``FederatedDataModule``: a dataset split across clients, round plans, global evaluation."""

from __future__ import annotations

import os
from typing import Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from fl_lightning.data.augment import BatchAugment, paper_augmentation
from fl_lightning.data.datasets import dataset_info, load_dataset
from fl_lightning.data.lazy import ClientwiseRounds, as_input, no_whole_set, setup_lazy
from fl_lightning.data.natural import powerlaw_devices, split_devices, synthetic
from fl_lightning.data.options import (  # noqa: F401 - PARTITIONS, AUGMENTATIONS: their old home
    AUGMENTATIONS,
    PARTITIONS,
    check_options,
    check_priors,
)
from fl_lightning.data.partition import partition_indices
from fl_lightning.data.plans import (  # noqa: F401 - RoundAugmentation: its old home
    RoundAugmentation,
    augment_batch,
    client_plans,
    round_arrays,
    sample_clients,
)
from fl_lightning.data.ticker import RoundTicker
from fl_lightning.errors import ConfigError
from fl_lightning.protocol import RoundPlan

__all__ = ["FederatedDataModule", "RoundAugmentation"]

#: Partitions that give every device its own test split (the test set is their union).
DEVICE_SPLIT = ("natural", "powerlaw")
#: the default evaluation batch on a CPU and on a GPU (``--data.eval_batch_size null``): on a
#: CPU, batches of 1000 evaluate FedAvgCNN markedly slower than a few hundred (docs/benchmarks.md)
CPU_EVAL_BATCH = 256
ACCELERATOR_EVAL_BATCH = 1000

class FederatedDataModule(pl.LightningDataModule):
    """A dataset partitioned across ``num_clients`` clients, with Non-IID label skew.

    The training set is split once by ``partition`` (a pure function of the labels and
    ``seed``) and kept as tensors; local training reads mini-batches by index, so no per-client
    ``DataLoader`` exists. Every round, :meth:`round_plan` samples the participating clients and
    the order of each client's samples as pure functions of ``(seed, round, client)``, so a run
    resumed from a checkpoint sees exactly the data the uninterrupted run saw. Training batches
    are augmented on the device (:mod:`fl_lightning.data.augment`) with counter-based draws keyed
    by ``(seed, round, client, step, sample)`` (:mod:`fl_lightning.data.counters`), made for the
    whole round at once and copied to the device together with the round's index plan. The
    global model is evaluated on the dataset's test split (never augmented), kept on the
    trainer's device and read in slices.

    Args:
        dataset: ``digits`` (offline, bundled with scikit-learn), ``mnist``, ``cifar10``,
            ``svhn``, ``cinic10`` or any MedMNIST 2D flag (e.g. ``pathmnist``, ``tissuemnist``).
        data_dir: folder holding the files (``MNIST/raw/...``,
            ``cifar10/cifar-10-batches-py/...``, ``svhn/*_32x32.mat``,
            ``cinic10/{train,test}/<class>/*.png``, ``medmnist/<flag>.npz``; see
            ``docs/data.md``). Nothing is written there unless ``download`` is true.
        download: download missing files (needs a network).
        num_clients: number of clients the training set is split across.
        partition: ``iid``, ``shard`` (``shards_per_client`` label-sorted shards per client),
            ``lda`` (per class, Dirichlet(``alpha``) shares over the clients; the FedSoL code's
            procedure), ``dirichlet`` (per client, Dirichlet(``alpha``) class priors and
            ``client_size`` samples; pfl-research's CIFAR-10 benchmark procedure),
            ``natural`` (the dataset arrives split into devices: ``synthetic``,
            ``synthetic_iid``; one client per device) or ``powerlaw`` (MNIST as in the FedProx
            paper: train and test images pooled, standardized per pixel, two digits per
            device with power-law sizes; see :func:`fl_lightning.data.natural.powerlaw_devices`).
            With ``natural`` and ``powerlaw`` each device's samples are cut 90/10 into train
            and test, and the global test set is the union of the devices' test samples.
        shards_per_client: ``s`` of the shard partition.
        alpha: concentration of the ``lda`` and ``dirichlet`` partitions (smaller is more
            heterogeneous).
        client_size: samples per client of the ``dirichlet`` partition (default: training
            samples // ``num_clients``); rejected with the other partitions.
        seed: seed of the partition, the client sampling and the local data order.
        reference_partition: the official FedSoL code's partition (procedure, random stream).
            Seeded by ``seed``; the paper used 19940817.
        sampling: ``seeded`` (clients drawn from ``(seed, round)``) or ``official`` (the official
            code's draw, ``numpy.random.seed(round)``, independent of ``seed``).
        eval_batch_size: batch size of the global evaluation; ``None`` (default):
            :data:`CPU_EVAL_BATCH` (256) on a CPU, :data:`ACCELERATOR_EVAL_BATCH` (1000) on a
            GPU. It does not change training, and the evaluation's results only by float
            rounding.
        augment: ``paper`` (the official code's training augmentation for the dataset) or
            ``none``.
        verify_checksums: check raw files against the libraries' MD5 checksums. Switch off
            only for files you produced yourself.
        synthetic_alpha: alpha of Synthetic(alpha, beta), the std of ``u_k ~ N(0, alpha^2)``.
            Only with ``--data.dataset synthetic``.
        synthetic_beta: beta of Synthetic(alpha, beta), the std of ``B_k ~ N(0, beta^2)``.
            Only with ``--data.dataset synthetic``.

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
        partition: Literal["iid", "shard", "lda", "dirichlet", "natural", "powerlaw"] = "lda",
        shards_per_client: int = 2,
        alpha: float = 0.1,
        client_size: int | None = None,
        seed: int = 0,
        reference_partition: bool = False,
        sampling: Literal["seeded", "official"] = "seeded",
        eval_batch_size: int | None = None,
        augment: Literal["paper", "none"] = "paper",
        verify_checksums: bool = True,
        synthetic_alpha: float = 1.0,
        synthetic_beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.info = dataset_info(dataset)
        natural = check_options(
            dataset, num_clients, partition, shards_per_client, alpha, client_size, seed,
            sampling, eval_batch_size, augment, verify_checksums,
        )
        self.dataset = dataset
        self.data_dir = os.fspath(data_dir)
        self.download = bool(download)
        self.num_clients = int(num_clients)
        self.partition = partition
        self.shards_per_client = int(shards_per_client)
        self.alpha = float(alpha)
        self.client_size = client_size
        self.seed = int(seed)
        self.reference_partition = bool(reference_partition)
        self.sampling = sampling
        self.eval_batch_size = None if eval_batch_size is None else int(eval_batch_size)
        self.augment = augment
        self.verify_checksums = verify_checksums
        if natural:
            check_priors(synthetic_alpha, synthetic_beta)
        self.synthetic_alpha = float(synthetic_alpha)
        self.synthetic_beta = float(synthetic_beta)
        self.test_parts: list[Tensor] = []
        self.augmentation: BatchAugment | None = (
            paper_augmentation(dataset) if augment == "paper" else None
        )
        self.train_x: Tensor | None = None
        self.train_y: Tensor | None = None
        self.test_x: Tensor | None = None
        self.test_y: Tensor | None = None
        self.client_indices: list[Tensor] = []
        #: the lazy path (LEAF files, the synthetic population): rounds made client by client
        self.rounds: ClientwiseRounds | None = None
        self.population = None  # the SyntheticPopulation of synthetic_population
        self.input_scale = 1.0  # LEAF's uint8 pixels: x / 255
        self._device_cache: dict[tuple, tuple[Tensor, Tensor]] = {}

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
        if self.partition in DEVICE_SPLIT:
            if self.train_x is None and self.rounds is None:
                self._setup_devices()
            return
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
                client_size=self.client_size,
            )
            self._set_client_indices(parts, "client", "data")

    def _setup_devices(self) -> None:
        """Natural and power-law data: every device's train and test samples at once (LEAF
        files and the synthetic population: :func:`~fl_lightning.data.lazy.setup_lazy`)."""
        if setup_lazy(self):
            return
        if self.partition == "natural":
            data = synthetic(self.synthetic_alpha, self.synthetic_beta,
                             self.dataset == "synthetic_iid", self.num_clients, self.seed)
        else:
            x_all, y_all = _pooled_mnist(self.data_dir, self.download, self.verify_checksums)
            parts = powerlaw_devices(y_all, self.num_clients, seed=self.seed)
            data = split_devices([x_all[p] for p in parts], [y_all[p] for p in parts], self.seed)
        shape = (-1, *self.input_shape)
        self.train_x = torch.as_tensor(data.train_x, dtype=torch.float32).reshape(shape)
        self.train_y = torch.as_tensor(data.train_y, dtype=torch.long)
        self.test_x = torch.as_tensor(data.test_x, dtype=torch.float32).reshape(shape)
        self.test_y = torch.as_tensor(data.test_y, dtype=torch.long)
        self.test_parts = [torch.as_tensor(p, dtype=torch.long) for p in data.test_parts]
        self._set_client_indices(data.train_parts, "device", "training data")

    def _set_client_indices(self, parts: list, unit: str, what: str) -> None:
        """``client_indices`` from the partition's ``parts``; a ``unit`` (client or device)
        left without ``what`` stops the run with one line."""
        self.client_indices = [torch.as_tensor(p, dtype=torch.long) for p in parts]
        empty = [k for k, p in enumerate(self.client_indices) if len(p) == 0]
        if empty:
            raise ConfigError(
                f"--data.num_clients={self.num_clients} leaves {unit} {empty[0]} without "
                f"{what} under --data.partition={self.partition}: use fewer {unit}s"
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
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        x, y = self.test_tensors(device)
        return DataLoader(_Slices(x, y, self.eval_batch(device)), batch_size=None, shuffle=False)

    def eval_batch(self, device: torch.device | str = "cpu") -> int:
        """The evaluation batch size on ``device``: ``--data.eval_batch_size``, or by default
        :data:`CPU_EVAL_BATCH` on a CPU and :data:`ACCELERATOR_EVAL_BATCH` on a GPU."""
        if self.eval_batch_size is not None:
            return self.eval_batch_size
        cpu = torch.device(device).type == "cpu"
        return CPU_EVAL_BATCH if cpu else ACCELERATOR_EVAL_BATCH

    def test_tensors(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """The test split as ``(x, y)`` on ``device``; copied once per ``(device, dtype)``."""
        if self.test_x is None:
            self.setup("test")
        return self._on_device("test", self.test_x, self.test_y, device, dtype)

    def _on_device(self, split: str, x: Tensor, y: Tensor, device: torch.device | str,
                   dtype: torch.dtype | None) -> tuple[Tensor, Tensor]:
        """``(x, y)`` as the model's input on ``device`` (:func:`~fl_lightning.data.lazy.as_input`:
        floats in ``dtype``, token ids as int64), copied once per ``(split, device, dtype)``."""
        key = (split, torch.device(device), dtype)
        if key not in self._device_cache:
            self._device_cache[key] = (as_input(self, x, key[1], dtype), y.to(key[1]))
        return self._device_cache[key]

    # ------------------------------------------------------------------ federated API
    @property
    def client_sizes(self) -> list[int]:
        if self.rounds is not None:
            return self.rounds.sizes.tolist()
        return [len(p) for p in self.client_indices]

    @property
    def total_samples(self) -> int:
        """Training samples over the whole population, summed once per partition (the round
        plan reads it every round: ``O(N)`` once, not per round)."""
        parts = self.client_indices
        cached = getattr(self, "_total_samples", None)
        if cached is None or cached[0] is not parts or cached[1] != len(parts):
            cached = self._total_samples = (parts, len(parts), sum(len(p) for p in parts))
        return cached[2]

    def train_tensors(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor]:
        """The whole training set as ``(x, y)`` on ``device``, ``x`` in ``dtype`` (default: as
        loaded; float32 for LEAF's compact pixels; token ids stay int64); copied once per
        ``(device, dtype)``. The synthetic population has no whole training set (one line)."""
        if self.train_x is None:
            self.setup("fit")
        if self.population is not None:
            raise no_whole_set(self, "whole training set (train_tensors)")
        return self._on_device("train", self.train_x, self.train_y, device, dtype)

    def round_tensors(self, plan: RoundPlan, device: torch.device | str,
                      dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor] | None:
        """The optional lazy ``RoundSource`` method: the training data of ``plan``'s round only
        (its sampled clients, the plan's indices point into it), or ``None`` on the eager path
        (then the round reads :meth:`train_tensors`)."""
        return None if self.rounds is None else self.rounds.round_tensors(plan, device, dtype)

    def round_client_indices(self):
        """``client_indices`` of the last :meth:`round_tensors` (data-level attacks read it)."""
        return self.rounds.round_indices()

    def sample_clients(self, round_idx: int, clients_per_round: int) -> list[int]:
        """The ids of the clients that train in round ``round_idx`` (without replacement)."""
        return sample_clients(
            self.num_clients, clients_per_round, self.seed, round_idx, self.sampling
        )

    def _host_indices(self) -> list[np.ndarray]:
        if len(getattr(self, "_np_indices", ())) != len(self.client_indices):
            self._np_indices = [p.numpy().astype(np.int64) for p in self.client_indices]
        return self._np_indices

    def _round_arrays(
        self, round_idx: int, clients: list[int], local_epochs: int, batch_size: int
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The round's index plan and augmentation draws as host arrays
        (:func:`~fl_lightning.data.plans.round_arrays`; see :meth:`round_plan`)."""
        return round_arrays(self._host_indices(), clients, self.seed, round_idx, local_epochs,
                            batch_size, self.augmentation, self.input_shape[1:])

    def client_batches(
        self, round_idx: int, client_id: int, local_epochs: int, batch_size: int
    ) -> list[Tensor]:
        """Mini-batches of training-set indices for one client's local epochs (host tensors).

        Each epoch is a fresh random permutation of the client's samples cut into batches of
        ``batch_size`` (the last one may be smaller), as a shuffling ``DataLoader`` would give;
        the permutation sorts counter-based keys of ``(seed, round, client, epoch, sample)``
        (:mod:`fl_lightning.data.counters`), so it is the one :meth:`round_plan` gives.
        """
        if not self.client_indices:
            self.setup("fit")
        if self.population is not None:
            raise no_whole_set(self, "per-client batches outside a round (client_batches)")
        idx, _ = self._round_arrays(round_idx, [client_id], local_epochs, batch_size)
        n = len(self.client_indices[client_id])
        return [
            b for e in range(local_epochs)
            for b in torch.from_numpy(idx[e * n:(e + 1) * n]).split(batch_size)
        ]

    def augment_batch(self, x: Tensor, round_idx: int, client_id: int, step: int) -> Tensor:
        """``x`` augmented with the draws keyed ``(seed, round, client, step, sample)``."""
        return augment_batch(self.augmentation, x, self.seed, round_idx, client_id, step)

    def round_plan(
        self, round_idx: int, clients_per_round: int, local_epochs: int, batch_size: int,
        device: torch.device | str | None = None,
    ) -> RoundPlan:
        """Sampled clients and their per-step batches for round ``round_idx``.

        The whole round is planned at once: the index plan of every sampled client (each
        epoch a permutation sorted by counter-based keys) and, with augmentation, every
        sample's draws, keyed ``(seed, round, client, step, sample)``, are computed on the host
        and copied to ``device`` in one transfer. ``ClientPlan.batches`` are views of that one
        device tensor, and ``plan.transform`` (a :class:`RoundAugmentation`) reads the draws
        from it, so no generator and no host tensor is created inside a local step.
        """
        if not self.client_indices and self.rounds is None:
            self.setup("fit")
        if self.rounds is not None:  # the lazy path: indices into the round's own tensors
            return self.rounds.round_plan(round_idx, clients_per_round, local_epochs, batch_size,
                                          device)
        ids = self.sample_clients(round_idx, clients_per_round)
        idx, draws = self._round_arrays(round_idx, ids, local_epochs, batch_size)
        total = len(idx)
        host = idx if draws is None else np.concatenate([idx, draws.reshape(-1)])
        buf = torch.from_numpy(host)
        if device is not None and torch.device(device) != buf.device:
            buf = buf.to(device)
        sizes = [len(self.client_indices[c]) for c in ids]
        clients, layout = client_plans(buf[:total], ids, sizes, local_epochs, batch_size)
        transform = None
        if draws is not None:
            transform = RoundAugmentation(
                self, round_idx, buf[total:].view(total, 5), layout, batch_size
            )
        return RoundPlan(
            round=round_idx, clients=clients, transform=transform,
            num_clients=self.num_clients, total_samples=self.total_samples,
        )


def _pooled_mnist(data_dir: str, download: bool, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's train and test images pooled (70,000, as the official FedProx script's
    ``MNIST original``), each pixel standardized over the pool: ``(p - mean) / (std + 0.001)``
    on the 0..255 scale, as ``generate_niid.py`` does."""
    from fl_lightning.data.datasets import MNIST_MEAN, MNIST_STD

    xs, ys = [], []
    for split in ("train", "test"):
        x, y = load_dataset("mnist", data_dir, download, split, verify)
        xs.append(np.rint((x.numpy().reshape(len(y), -1) * MNIST_STD + MNIST_MEAN) * 255.0))
        ys.append(y.numpy())
    raw = np.concatenate(xs).astype(np.float32)
    mean, std = raw.mean(0), raw.std(0)
    return (raw - mean) / (std + 0.001), np.concatenate(ys).astype(np.int64)


class _Slices(Dataset):
    """Consecutive slices ``x[i*b:(i+1)*b]`` of tensors as a dataset of batches (no collation
    and no copy: the tensors already sit on the evaluation device)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        part = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[part], self.y[part]
