"""Client state off the heap for a run: every client store of the module spills to a file of
the run folder past a RAM budget, and checkpoints refer to those files instead of copying them.

:class:`ClientStateFiles` (added to every ``fl-lightning`` run, ``--client_state_ram_mb``)
points each :class:`~fl_lightning.algorithms.state.ClientStateStore` of the module (the
algorithm's ``clients``, FedSoL's proximal source's, the compressor's residuals) at
``<log_dir>/client_state/<name>.bin`` and wraps the strategy's checkpoint IO in
:class:`PinningCheckpointIO`, which tells the stores which checkpoint file holds their last
snapshot (kept while the file exists) and which one was removed (its records are reused).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback

from fl_lightning.algorithms.state import ClientStateStore
from fl_lightning.algorithms.state_file import Layout, StateFile, StateFileError

__all__ = [
    "ClientStateFiles", "PinningCheckpointIO", "StateFileError", "check_state_files",
    "client_stores", "relocate",
]

#: RAM budget per store before it moves to its file (``--client_state_ram_mb``)
DEFAULT_RAM_MB = 64.0


def client_stores(module: Any, depth: int = 3) -> dict[str, ClientStateStore]:
    """The client stores of ``module``'s algorithm and systems, by attribute path
    (``algorithm.clients``, ``algorithm.proximal.clients``, ``systems.compressor.residuals``)."""
    found: dict[str, ClientStateStore] = {}
    seen: set[int] = set()

    def walk(obj: Any, name: str, left: int) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, ClientStateStore):
            found[name] = obj
            return
        if left == 0 or isinstance(obj, (torch.Tensor, torch.nn.Module, type)):
            return
        for key, value in sorted(getattr(obj, "__dict__", {}).items()):
            walk(value, f"{name}.{key}", left - 1)

    for part in ("algorithm", "systems"):
        if getattr(module, part, None) is not None:
            walk(getattr(module, part), part, depth)
    return found


class PinningCheckpointIO(CheckpointIO):
    """Checkpoint IO that keeps what a checkpoint's client-state reference points to while
    the checkpoint file exists (wraps the strategy's own IO)."""

    def __init__(self, inner: CheckpointIO, stores: Iterable[ClientStateStore]) -> None:
        self.inner = inner
        self.stores = list(stores)

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        for store in self.stores:
            store.pin(str(path))
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)
        for store in self.stores:
            store.unpin(str(path))

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        checkpoint = self.inner.load_checkpoint(path, map_location=map_location,
                                                weights_only=weights_only)
        relocate(checkpoint, str(path))
        return checkpoint

    def teardown(self) -> None:
        self.inner.teardown()


class ClientStateFiles(Callback):
    """Keep each client store in RAM up to ``ram_mb`` MiB, then in ``<log_dir>/client_state/``.

    Under DDP every rank keeps its own file (``<name>.rank<r>.bin`` beside rank 0's
    ``<name>.bin``); checkpoints (written by rank 0) refer to rank 0's, and to every rank's
    when the store is sharded (:mod:`fl_lightning.sharding`). Without a local log folder the
    stores stay in RAM.

    Args:
        ram_mb: RAM budget per store, in MiB (0: on disk from the first client).
    """

    def __init__(self, ram_mb: float = DEFAULT_RAM_MB) -> None:
        self.ram_bytes = int(float(ram_mb) * 2**20)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if not isinstance(log_dir, str) or "://" in log_dir:
            return
        stores = client_stores(pl_module)
        if not stores:
            return
        rank = trainer.global_rank
        suffix = "" if rank == 0 else f".rank{rank}"
        folder = os.path.join(log_dir, "client_state")
        for name, store in stores.items():
            store.spill_to(os.path.join(folder, f"{name}{suffix}.bin"), self.ram_bytes)
        io = trainer.strategy.checkpoint_io
        if not isinstance(io, PinningCheckpointIO):
            trainer.strategy.checkpoint_io = PinningCheckpointIO(io, stores.values())
        if rank > 0:  # the checkpoint IO runs on rank 0 only; a sharded store's records here
            _pin_on_this_rank(trainer.strategy, list(stores.values()))  # are referenced too


def _pin_on_this_rank(strategy: Any, stores: list[ClientStateStore]) -> None:
    """On a DDP rank > 0 (which writes no file), pin the stores' last snapshot when the
    strategy saves a checkpoint (its ``save_checkpoint`` / ``remove_checkpoint`` run on every
    rank, the IO on rank 0 only): a checkpoint that refers to this rank's file keeps its
    records while the checkpoint exists."""
    if getattr(strategy, "_fl_pins", None) is not None:
        strategy._fl_pins[:] = stores
        return
    strategy._fl_pins = stores
    save, remove = strategy.save_checkpoint, strategy.remove_checkpoint

    def save_checkpoint(checkpoint, filepath, storage_options=None):
        for store in strategy._fl_pins:
            store.pin(str(filepath), collect=False)
        save(checkpoint, filepath, storage_options=storage_options)

    def remove_checkpoint(filepath):
        remove(filepath)
        for store in strategy._fl_pins:
            store.unpin(str(filepath))

    strategy.save_checkpoint, strategy.remove_checkpoint = save_checkpoint, remove_checkpoint


def _references(value: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        ref = value.get("store")
        if isinstance(ref, Mapping) and "files" in ref and "uids" in ref:
            yield ref
            return
        for sub in value.values():
            yield from _references(sub)


def _all_references(
    checkpoint: Mapping[str, Any], skip: Iterable[str] = ()
) -> Iterable[Mapping[str, Any]]:
    """The client-state references of a checkpoint; ``skip``: replaced components
    (``model.algorithm``, ``model.compressor``) whose state is not loaded."""
    skip = set(skip)
    if "model.algorithm" not in skip:
        yield from _references(checkpoint.get("fl_algorithm_state", {}))
    systems = checkpoint.get("fl_systems_state", {})
    for name, state in (systems.items() if isinstance(systems, Mapping) else ()):
        if not (name == "compressor" and "model.compressor" in skip):
            yield from _references(state)


def relocate(checkpoint: Mapping[str, Any], path: str) -> None:
    """Where a referenced file is gone but the run folder was moved with it (the file is in
    ``client_state/`` beside the checkpoint's ``checkpoints/`` folder), refer to it there."""
    run = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    for ref in _all_references(checkpoint):
        files = list(ref["files"])
        for i, file in enumerate(files):
            moved = os.path.join(run, "client_state", os.path.basename(str(file)))
            if not os.path.exists(str(file)) and os.path.exists(moved):
                files[i] = moved
        if isinstance(ref, dict):
            ref["files"] = files


def check_state_files(
    checkpoint: Mapping[str, Any], path: str | None = None, skip: Iterable[str] = ()
) -> None:
    """Every client-state file a loaded checkpoint (read from ``path``) refers to exists, is
    the file it was written with and holds the records it refers to.

    Raises:
        StateFileError: one line naming the file and what to do.
    """
    if path is not None:
        relocate(checkpoint, path)
    for ref in _all_references(checkpoint, skip):
        record = Layout.from_plain(ref["layout"]).nbytes
        files, slots = ref["file"].tolist(), ref["record"].tolist()
        for i, (file, uid) in enumerate(zip(ref["files"], ref["uids"], strict=True)):
            need = 1 + max((s for f, s in zip(files, slots, strict=True) if f == i), default=-1)
            StateFile.open(str(file), str(uid), record, need).close()
