"""Silence the Lightning messages that a federated run causes on purpose, and only those.

- ``ModelCheckpoint`` with manual optimization and ``every_n_train_steps`` warns that the
  checkpoint holds the weights after the optimizer step: :class:`~fl_lightning.checkpoint.
  RoundCheckpoint` saves at round boundaries, after the server step, which is what resuming
  needs.
- ``lightning.pytorch.utilities._pytree`` calls a deprecated ``torch.utils._pytree`` check
  (Lightning's own code, not ours).
- the "Tip: ... try installing litlogger / litmodels" banners.

Every other warning is still shown, and the ``DeprecationWarning`` of the old top-level name
``callbacks`` (``class_path: callbacks.X`` in an old config) is made visible.
"""

from __future__ import annotations

import logging
import warnings

__all__ = ["EXPECTED_WARNINGS", "quiet_expected_messages"]

#: regexes of the warning messages that are expected in a federated run
EXPECTED_WARNINGS: tuple[str, ...] = (
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
)
_BANNERS = ("💡 Tip:",)
_BANNER_LOGGERS = (
    "lightning.pytorch.trainer.connectors.logger_connector.logger_connector",
    "lightning.pytorch.trainer.connectors.callback_connector",
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
)


class _DropBanners(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_BANNERS)


def quiet_expected_messages() -> None:
    """Install the filters (idempotent)."""
    for pattern in EXPECTED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # the deprecated ``callbacks`` name in a config: say so (Python hides DeprecationWarning)
    warnings.filterwarnings("default", message="the top-level package 'callbacks' is deprecated",
                            category=DeprecationWarning)
    for name in _BANNER_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropBanners) for f in logger.filters):
            logger.addFilter(_DropBanners())
