"""Trainer options that cannot work with the federated round loop, refused up front.

A training step is one communication round, optimization is manual (the client engine owns the
local optimizers) and one epoch is the whole run (``RoundTicker``). Lightning options that
assume automatic optimization or batches of a data loader either fail deep inside Lightning
(``accumulate_grad_batches``, ``val_check_interval=0``) or change the run silently
(``limit_train_batches=0`` trains nothing; a fractional ``val_check_interval`` is a share of the
whole run). :func:`check_trainer_options` names each such option and what to use instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fl_lightning.errors import ConfigError
from fl_lightning.validate import integer

__all__ = ["UNSUPPORTED", "check_trainer_options"]

# option: (values that are fine, why not / what to use instead)
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "accumulate_grad_batches": (
        (None, 1),
        "a training step is one communication round with manual optimization; to give each "
        "client more local work raise --model.local_epochs or --model.batch_size",
    ),
    "gradient_clip_val": (
        (None, 0, 0.0),
        "rounds use manual optimization, so Lightning cannot clip; remove the option",
    ),
    "gradient_clip_algorithm": (
        (None,),
        "rounds use manual optimization, so Lightning cannot clip; remove the option",
    ),
    "limit_train_batches": (
        (None, 1.0),
        "a training batch is one communication round; set the number of rounds with "
        "--trainer.max_steps",
    ),
    "overfit_batches": (
        (None, 0, 0.0),
        "a training batch is one communication round, there is no batch to overfit; run few "
        "rounds with --trainer.max_steps, or few clients with --data.num_clients",
    ),
    "check_val_every_n_epoch": (
        (None, 1),
        "one epoch is the whole run; evaluate every k rounds with --trainer.val_check_interval k",
    ),
}


def _allowed(value: Any, allowed: tuple[Any, ...]) -> bool:
    if isinstance(value, bool):
        return False
    return any(value is a if a is None else value == a for a in allowed)


def check_trainer_options(trainer: Mapping[str, Any]) -> None:
    """Raise one :class:`ConfigError` naming the first Trainer option the rounds cannot honour.

    Args:
        trainer: the ``trainer`` section of the resolved config.
    """
    for option, (allowed, why) in UNSUPPORTED.items():
        value = trainer.get(option)
        if not _allowed(value, allowed):
            raise ConfigError(f"--trainer.{option}={value} is not supported: {why}")
    every = trainer.get("val_check_interval")
    if every is not None:
        integer(every, "--trainer.val_check_interval", 1,
                hint="the number of rounds between evaluations: 10 evaluates the global model "
                "every 10 rounds; to skip evaluation use --trainer.limit_val_batches 0")
