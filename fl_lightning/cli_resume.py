"""What ``fl-lightning fit/validate/test --ckpt_path`` checks before Lightning loads a checkpoint.

:class:`~fl_lightning.cli.FederatedCLI` calls these in order:

1. :func:`check_ckpt_path` (after parsing, replacing ``LightningCLI._parse_ckpt_path``): the
   file exists and is a readable fl-lightning checkpoint, its stored settings are compared with
   the given ones (:func:`fl_lightning.resume.check_resume`) and the client-state files it
   names are there; nothing stored is re-applied over the command line;
2. :func:`check_fits` (once the model is built): the stored weights fit the model, else one
   line naming the option that makes them differ;
3. :func:`prepare_resume` (before ``fit``): the changed settings of ``--resume_changes apply``
   are printed and the checkpoint IO loads no state of a replaced component.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import Namespace
from lightning.fabric.utilities.rank_zero import rank_zero_only

from fl_lightning.errors import ConfigError
from fl_lightning.resume import (
    AdaptingCheckpointIO,
    Resume,
    check_resume,
    flatten,
    shape_mismatch,
    stored_config,
)
from fl_lightning.statefiles import StateFileError, check_state_files

__all__ = ["CheckpointCheck", "check_ckpt_path", "check_fits", "prepare_resume",
           "resolved_config"]


@dataclass
class CheckpointCheck:
    """What :func:`check_ckpt_path` found, kept for the checks after the model is built.

    Attributes:
        run_config: the run's resolved config as YAML (what ``config.yaml`` and every
            checkpoint store); empty without a subcommand.
        resume: the comparison with the checkpoint's settings (``None``: no ``--ckpt_path``).
        weight_shapes: the checkpoint's weight shapes by name (``None``: no ``--ckpt_path``).
        stored: the checkpoint's stored config (plain data; empty for an old checkpoint).
    """

    run_config: str = ""
    resume: Resume | None = None
    weight_shapes: dict[str, tuple[int, ...]] | None = None
    stored: dict[str, Any] = field(default_factory=dict)


def resolved_config(parser: Any, config: Namespace, sub: str) -> dict[str, Any]:
    """The subcommand's resolved config as plain data (what ``config.yaml`` holds)."""
    version = tuple(int(v) for v in metadata.version("jsonargparse").split(".")[:2])
    keep_none = (  # jsonargparse 4.49 renamed skip_none to skip_unset
        {"skip_unset": False} if version >= (4, 49) else {"skip_none": False}
    )
    dumped = parser.dump(config, skip_link_targets=False, format="yaml", **keep_none)
    return yaml.safe_load(dumped)[sub]


def check_ckpt_path(config: Namespace, sub: str, given: dict[str, Any]) -> CheckpointCheck:
    """Compare ``--ckpt_path``'s stored settings with ``given`` (the subcommand's resolved
    config); a missing or unreadable file, a refused change or a missing client-state file
    stops with one line (:class:`~fl_lightning.errors.ConfigError`)."""
    found = CheckpointCheck(run_config=yaml.safe_dump(given, sort_keys=False))
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path:
        return found
    if config.get("resume_changes") not in ("error", "apply"):
        return found  # refused with one line in FederatedCLI.before_instantiate_classes
    ckpt = read_checkpoint(ckpt_path)
    found.weight_shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
    found.stored = stored_config(ckpt)[0]
    resume = check_resume(
        ckpt, given, path=ckpt_path, apply=config.get("resume_changes") == "apply",
        full=sub == "fit",
    )
    try:  # the client-state files the load will read (not those of replaced components)
        check_state_files(ckpt, ckpt_path, skip=resume.replaced)
    except StateFileError as err:
        raise ConfigError(f"--ckpt_path={ckpt_path}: {err}") from None
    found.resume = resume
    if sub == "fit" and not resume.complete and rank_zero_only.rank == 0:
        print(
            f"fl-lightning: note: --ckpt_path={ckpt_path} was written before fl-lightning "
            "stored its whole config; only its model and data settings were compared",
            file=sys.stderr,
        )
    return found


def read_checkpoint(ckpt_path: str) -> dict[str, Any]:
    """The checkpoint at ``ckpt_path``, memory-mapped, or one line saying why it is none."""
    if not Path(ckpt_path).is_file():
        raise ConfigError(
            f"--ckpt_path={ckpt_path} does not exist: pass the path of a .ckpt file, e.g. "
            "lightning_logs/fl/version_0/checkpoints/round=10.ckpt"
        )
    try:
        # mmap: only the pages of what the check reads (the config, the weights' shapes)
        # are read here; Lightning's own load then reads the file once
        ckpt = _load_for_check(ckpt_path)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ConfigError(
            f"--ckpt_path={ckpt_path} is not a readable checkpoint ({type(err).__name__}): "
            "pass a .ckpt written by fl-lightning"
        ) from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(
            f"--ckpt_path={ckpt_path} holds no model weights: pass a .ckpt written by "
            "fl-lightning"
        )
    return ckpt


def _load_for_check(path: str) -> Any:
    """The checkpoint, memory-mapped (only what the check reads is read); a file torch cannot
    map (the legacy, non-zip format) is read whole."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except RuntimeError:
        return torch.load(path, weights_only=True, map_location="cpu")


def check_fits(found: CheckpointCheck, model: torch.nn.Module, ckpt_path: str) -> None:
    """Refuse a checkpoint whose weights do not fit ``model``, before loading any."""
    if found.weight_shapes is None:
        return
    current = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problem = shape_mismatch(found.weight_shapes, current)
    if problem is None:
        return
    stored = flatten(found.stored)
    now = flatten(yaml.safe_load(found.run_config) or {})
    parts = []
    for key in ("model.net", "data.dataset"):
        if key in stored and key in now and stored[key] != now[key]:
            parts.append(f"--{key}={now[key]} (checkpoint: {stored[key]})")
    why = f" because {' and '.join(parts)}" if parts else ""
    raise ConfigError(
        f"--ckpt_path={ckpt_path} does not fit this model{why}: {problem}; "
        "a checkpoint fits only the same network on data of the same input shape and "
        "number of classes"
    )


def prepare_resume(resume: Resume | None, trainer: Any, model: torch.nn.Module) -> None:
    """Print the settings a ``--resume_changes apply`` run changes, and load no state of a
    replaced component or changed optimizer (:class:`~fl_lightning.resume.AdaptingCheckpointIO`)."""
    if resume is not None and resume.changes and rank_zero_only.rank == 0:
        lines = [c.line() for c in resume.changes] + resume.notes()
        print(
            f"fl-lightning: resuming from round {resume.from_round} of {resume.path} with "
            f"{len(resume.changes)} changed setting(s) (--resume_changes apply; recorded in "
            "the run's settings_changed.json, final_metrics.json and checkpoints):\n"
            + "\n".join(f"  {line}" for line in lines)
        )
    if resume is not None and (resume.replaced or resume.optimizer_changed):
        strategy = trainer.strategy
        strategy.checkpoint_io = AdaptingCheckpointIO(
            strategy.checkpoint_io, model, resume.replaced, resume.optimizer_changed
        )
