"""Resuming a run: compare every setting that shapes the result with the checkpoint's own.

Lightning's ``fit --ckpt_path`` restores weights and optimizer state but knows nothing of the
federated settings; LightningCLI even re-applies the model hyper-parameters stored in the
checkpoint over the command line. A resumed run must instead either be the
same experiment as the one that wrote the checkpoint, or say loudly that it is not:

- every checkpoint written through the CLI carries the whole resolved config
  (``checkpoint["fl_config"]``, YAML text) and the record of earlier changed resumes
  (``checkpoint["fl_settings_changed"]``);
- on ``fit --ckpt_path`` the given config is compared with the stored one, key by key, except
  the keys in :data:`HARMLESS` (how long to run, where to log, how often to checkpoint, which
  devices): every difference is listed, one line per option, and the run is refused unless
  ``--resume_changes apply``;
- with ``apply`` the run goes on with the new values, prints them, and records them (round from
  which they apply, old and new value) in ``settings_changed.json`` in the run's folder, in
  ``final_metrics.json`` and in every checkpoint it writes, so a table built from it can tell;
  state that belongs to a replaced component (another algorithm's client state, another server
  optimizer's moments, another compressor's error memory) is not loaded into the new one;
- a checkpoint whose weights do not fit the model (another network, another input shape or
  number of classes) is refused before any weight is loaded (:func:`shape_mismatch`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import Callback

from fl_lightning.errors import ConfigError

__all__ = [
    "HARMLESS",
    "AdaptingCheckpointIO",
    "Change",
    "RunRecord",
    "compare",
    "flatten",
    "Resume",
    "check_resume",
    "replaced_components",
    "shape_mismatch",
    "stored_config",
]

# Options that do not change what a run computes, only how long it runs, where it writes, how
# often it checkpoints, how it reports progress and which devices it runs on. A key is harmless
# when it is one of these or lies under one of them.
HARMLESS: tuple[str, ...] = (
    "config", "print_config", "ckpt_path", "weights_only", "resume_changes",
    "checkpoint_every_n_rounds", "keep_last_checkpoints", "client_state_ram_mb",
    "ddp_timeout", "ddp_stop_timeout",
    "trainer.max_steps", "trainer.max_epochs", "trainer.min_steps", "trainer.min_epochs",
    "trainer.max_time", "trainer.logger", "trainer.callbacks", "trainer.enable_progress_bar",
    "trainer.enable_model_summary", "trainer.enable_checkpointing", "trainer.log_every_n_steps",
    "trainer.val_check_interval", "trainer.check_val_every_n_epoch",
    "trainer.num_sanity_val_steps", "trainer.default_root_dir", "trainer.accelerator",
    "trainer.strategy", "trainer.devices", "trainer.num_nodes", "trainer.profiler",
    "trainer.enable_autolog_hparams", "trainer.model_registry", "trainer.limit_test_batches",
    "trainer.limit_predict_batches",
    "data.data_dir", "data.download", "data.verify_checksums",
    # evaluation only (training does not read it; results move by float rounding), and its
    # default depends on the device
    "data.eval_batch_size",
    # linked from the data module (its dataset is compared); the weights' shapes are checked
    "model.num_classes", "model.input_shape",
)

# Components whose stored state belongs to their class: replaced, it is not loaded.
_STATEFUL = ("model.algorithm", "model.server_optimizer", "model.compressor")


def _harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") for h in HARMLESS)


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"algorithm": {"class_path": C, "init_args": {"rho": 2}}}}`` as
    ``{"model.algorithm": C, "model.algorithm.rho": 2}``: the keys are the command line's
    option names (without ``--``); a class-valued option maps to its class path."""
    flat: dict[str, Any] = {}
    for name, value in config.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and "class_path" in value:
            flat[key] = value["class_path"]
            for part in ("init_args", "dict_kwargs"):
                if isinstance(value.get(part), Mapping):
                    flat.update(flatten(value[part], key + "."))
        elif isinstance(value, Mapping):
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b) or (math.isnan(float(a)) and math.isnan(float(b)))
    return a == b


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


@dataclass(frozen=True)
class Change:
    """One setting that differs from the checkpoint's: ``--option=given (checkpoint: stored)``."""

    option: str
    stored: Any
    given: Any

    def line(self) -> str:
        return f"--{self.option}={_show(self.given)} (checkpoint: {_show(self.stored)})"

    def record(self) -> dict[str, Any]:
        return {"option": f"--{self.option}", "checkpoint": self.stored, "now": self.given}


def compare(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[Change]:
    """Every result-shaping option whose value differs between two resolved configs.

    Both are nested config dicts (as in ``config.yaml``). Options under :data:`HARMLESS` are
    skipped; so are options present in only one of them (an option added to the code after
    the checkpoint was written). When a class-valued option differs (another algorithm), its
    own arguments are not listed: the class line says it all.
    """
    a, b = flatten(stored), flatten(given)
    changes = []
    for key in sorted(a.keys() & b.keys()):
        if _harmless(key) or _same(a[key], b[key]):
            continue
        parts = key.split(".")
        ancestors = (".".join(parts[:i]) for i in range(1, len(parts)))
        if any(p in a and p in b and not _same(a[p], b[p]) for p in ancestors):
            continue
        changes.append(Change(key, a[key], b[key]))
    return changes


def replaced_components(changes: list[Change], stored: Mapping[str, Any]) -> list[str]:
    """The stateful components (algorithm, server optimizer, compressor) whose class, or the
    class of one of their class-valued arguments (FedSoL's proximal source), changed."""
    flat = flatten(stored)
    out = []
    for comp in _STATEFUL:
        for c in changes:
            if not (c.option == comp or c.option.startswith(comp + ".")):
                continue
            if c.option == comp or _looks_like_class(flat.get(c.option)) or _looks_like_class(
                c.given
            ):
                out.append(comp)
                break
    return out


def _looks_like_class(value: Any) -> bool:
    return isinstance(value, str) and "." in value and value.rsplit(".", 1)[1][:1].isupper()


def stored_config(checkpoint: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """The config a checkpoint was written with, and whether it is complete.

    Checkpoints written before the whole config was stored only have the module's and the
    data module's scalar hyper-parameters; those are returned (as ``model``/``data``) with
    ``False``.
    """
    text = checkpoint.get("fl_config")
    if isinstance(text, str):
        loaded = yaml.safe_load(text)
        if isinstance(loaded, dict):
            return loaded, True
    config: dict[str, Any] = {}
    for key, part in (("model", "hyper_parameters"), ("data", "datamodule_hyper_parameters")):
        hp = checkpoint.get(part) or {}
        config[key] = {k: v for k, v in hp.items() if not str(k).startswith("_")}
    return config, False


def shape_mismatch(stored: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    """The first tensor name whose presence or shape differs, described; ``None`` if all fit.

    ``stored``/``current`` map state-dict names to shapes (tuples)."""
    for name, shape in stored.items():
        if name not in current:
            return f"{name} {list(shape)} is in the checkpoint but not in this model"
        if tuple(current[name]) != tuple(shape):
            return (
                f"{name} is {list(shape)} in the checkpoint but {list(current[name])} in "
                "this model"
            )
    for name in current:
        if name not in stored:
            return f"{name} {list(current[name])} is in this model but not in the checkpoint"
    return None


class AdaptingCheckpointIO(CheckpointIO):
    """Loads checkpoints through ``inner`` and leaves out the state of replaced components.

    Used only for a resume with ``--resume_changes apply``: the replaced algorithm's client
    state and the replaced compressor's memory are dropped (the new ones start empty); a
    replaced server optimizer starts fresh; a server optimizer of the same class with changed
    arguments keeps its state (momentum, moments) but takes the new hyper-parameters (torch
    would otherwise restore the old learning rate with the state).
    """

    def __init__(
        self, inner: CheckpointIO, module: pl.LightningModule, replaced: list[str],
        optimizer_changed: bool,
    ) -> None:
        self.inner = inner
        self.module = module
        self.replaced = list(replaced)
        self.optimizer_changed = optimizer_changed

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        checkpoint = self.inner.load_checkpoint(
            path, map_location=map_location, weights_only=weights_only
        )
        if "model.algorithm" in self.replaced:
            checkpoint.pop("fl_algorithm_state", None)
        if "model.compressor" in self.replaced:
            checkpoint.get("fl_systems_state", {}).pop("compressor", None)
        if "model.server_optimizer" in self.replaced:
            checkpoint["optimizer_states"] = []  # Lightning then keeps the fresh optimizer
        elif self.optimizer_changed:
            fresh = self.module.server_optimizer_factory(self.module.net.parameters())
            new = {k: v for k, v in fresh.param_groups[0].items() if k != "params"}
            for state in checkpoint.get("optimizer_states", []):
                for group in state.get("param_groups", []):
                    group.update(new)
        return checkpoint


class RunRecord(Callback):
    """Writes the run's resolved config, and the settings changed on resume, into its outputs.

    Every checkpoint gets ``fl_config`` (the whole resolved config as YAML) and
    ``fl_settings_changed`` (a list, one entry per resume that changed settings: the round from
    which the new values apply, the checkpoint resumed from, and each option's old and new
    value). When that list is not empty, the run's folder gets ``settings_changed.json`` at the
    start and ``final_metrics.json`` a ``settings_changed`` entry at the end.

    Args:
        config: the resolved config as YAML text.
        history: the changed-settings record (from the checkpoint resumed from, plus this run's).
    """

    def __init__(self, config: str, history: list[dict[str, Any]] | None = None) -> None:
        self.config = config
        self.history = list(history or [])
        self._log_dir: str | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        checkpoint["fl_config"] = self.config
        checkpoint["fl_settings_changed"] = self.history

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._log_dir = trainer.log_dir  # a broadcast under DDP: every rank asks
        if self.history and trainer.is_global_zero and self._log_dir:
            os.makedirs(self._log_dir, exist_ok=True)
            with open(os.path.join(self._log_dir, "settings_changed.json"), "w") as fh:
                json.dump(self.history, fh, indent=2)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # after the module's on_train_end has written final_metrics.json
        if stage != "fit" or not self.history or not trainer.is_global_zero or not self._log_dir:
            return
        path = os.path.join(self._log_dir, "final_metrics.json")
        if not os.path.isfile(path):
            return
        with open(path) as fh:
            metrics = json.load(fh)
        metrics["settings_changed"] = self.history
        with open(path, "w") as fh:
            json.dump(metrics, fh, indent=2)
        where = ", ".join(
            f"{len(h['changes'])} from round {h['from_round']}" for h in self.history
        )
        print(
            f"fl-lightning: note: settings were changed on resume ({where}); recorded in {path} "
            "under settings_changed"
        )


@dataclass
class Resume:
    """What ``check_resume`` found: the differences to apply and what to leave out on load."""

    path: str
    stored: dict[str, Any]
    complete: bool
    changes: list[Change]
    history: list[dict[str, Any]]
    replaced: list[str]
    from_round: int

    @property
    def optimizer_changed(self) -> bool:
        return any(c.option.startswith("model.server_optimizer") for c in self.changes)

    def notes(self) -> list[str]:
        """What a resume with replaced components does with their stored state."""
        flat = flatten(self.stored)
        what = {
            "model.algorithm": "its state in the checkpoint (client state, server state) is "
            "not used; the new algorithm starts with empty state",
            "model.server_optimizer": "the server optimizer starts fresh (no stored moments)",
            "model.compressor": "the compressor's error-feedback memory starts empty",
        }
        notes = [f"--{c}: the checkpoint's {flat.get(c)} is replaced, {what[c]}"
                 for c in self.replaced]
        if self.optimizer_changed and "model.server_optimizer" not in self.replaced:
            notes.append("the server optimizer keeps its stored state with the new arguments")
        return notes


def check_resume(
    checkpoint: Mapping[str, Any], given: Mapping[str, Any], *, path: str, apply: bool,
    full: bool = True,
) -> Resume:
    """Compare the config ``given`` for a run with the one ``checkpoint`` was written with.

    Args:
        checkpoint: the loaded checkpoint.
        given: the resolved config of this run (nested dict, as ``config.yaml``).
        path: the checkpoint's path (for messages).
        apply: ``--resume_changes apply``: accept the differences instead of refusing.
        full: compare every result-shaping option (``fit``); ``False`` compares only the
            model's and data module's scalar settings (``validate``/``test``).

    Raises:
        ConfigError: there are differences and ``apply`` is false: one line naming how many,
            then one line per option ``--option=given (checkpoint: stored)``.
    """
    stored, complete = stored_config(checkpoint)
    if not full:
        stored, complete = stored_config({k: v for k, v in checkpoint.items() if k != "fl_config"})
    changes = compare(stored, given)
    history = list(checkpoint.get("fl_settings_changed") or [])
    from_round = int(checkpoint.get("global_step", 0)) + 1
    if changes and not apply:
        saved = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))),
                             "config.yaml")
        hint = f"--config {saved}" if os.path.isfile(saved) else "the run's original config"
        head = f"--ckpt_path={path}: "
        plural = "s" if len(changes) > 1 else ""
        tail = (
            f"; resume with {hint}, or add --resume_changes apply to use the new value{plural} "
            f"(the run is then marked as changed from round {from_round})" if full else
            f"; evaluate with {hint}, or add --resume_changes apply to use the new value{plural}"
        )
        if full and not complete:
            tail += (
                " (the checkpoint predates stored configs: only its model and data settings "
                "were compared)"
            )
        if len(changes) == 1:
            raise ConfigError(f"{head}{changes[0].line()} differs from the checkpoint{tail}")
        raise ConfigError(
            f"{head}{len(changes)} settings differ from the checkpoint{tail}:\n"
            + "\n".join(f"  {c.line()}" for c in changes)
        )
    if changes:
        history.append({
            "from_round": from_round,
            "checkpoint": os.path.abspath(path),
            "changes": [c.record() for c in changes],
        })
    return Resume(
        path=path, stored=stored, complete=complete, changes=changes, history=history,
        replaced=replaced_components(changes, stored), from_round=from_round,
    )
