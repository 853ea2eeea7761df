"""A run never writes into another run's folder.

Lightning's ``CSVLogger`` with an explicit ``version`` whose folder exists warns and then deletes
the old ``metrics.csv``; ``SaveConfigCallback`` later aborts with a traceback because
``config.yaml`` exists. Without a logger, ``config.yaml``, ``final_metrics.json`` and the
checkpoints go to ``default_root_dir``. :func:`check_run_dir` refuses both cases up front, before
anything is written.
"""

from __future__ import annotations

import os

import lightning.pytorch as pl
from lightning.fabric.utilities.rank_zero import rank_zero_only

from fl_lightning.errors import ConfigError

__all__ = ["RUN_FILES", "check_run_dir", "run_files_in"]

# What a run writes into its folder.
RUN_FILES = (
    "metrics.csv", "config.yaml", "hparams.yaml", "final_metrics.json", "settings_changed.json",
    "personalized_metrics.json", "checkpoints", "analysis", "client_state",
)


def run_files_in(folder: str) -> list[str]:
    """The files of a run (see :data:`RUN_FILES`) present in ``folder``; an empty
    ``checkpoints`` or ``analysis`` folder does not count."""
    found = []
    for name in RUN_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path) or (os.path.isdir(path) and os.listdir(path)):
            found.append(name)
    return found


def _local(path: object) -> str | None:
    if not isinstance(path, str) or "://" in path:
        return None
    return path


def check_run_dir(trainer: pl.Trainer) -> None:
    """Refuse to start a run whose output folder already holds another run's files.

    Raises:
        ConfigError: naming the option that chose the folder, the files found and the fix.
    """
    if rank_zero_only.rank != 0:  # the launched DDP ranks see rank 0's new folder
        return
    loggers = list(trainer.loggers)
    for index, logger in enumerate(loggers):
        folder = _local(getattr(logger, "log_dir", None))
        if folder is None or not os.path.isdir(folder):
            continue
        found = run_files_in(folder) or sorted(os.listdir(folder))[:4]
        if not found:
            continue  # an empty folder made beforehand is fine
        version = getattr(logger, "_version", None)
        option = "--trainer.logger" + (f"[{index}]" if len(loggers) > 1 else "")
        what = (
            f"{option}.init_args.version={version}" if version is not None
            else f"{option} (folder {folder})"
        )
        raise ConfigError(
            f"{what}: {folder} already holds another run's files ({', '.join(found)}); a run "
            "never overwrites them: leave the version out to get a new folder, or choose an "
            "unused version"
        )
    if not loggers:
        folder = trainer.default_root_dir
        found = run_files_in(folder)
        if found:
            raise ConfigError(
                f"--trainer.logger=false writes into --trainer.default_root_dir={folder}, which "
                f"already holds another run's files ({', '.join(found)}); a run never "
                "overwrites them: pass an empty --trainer.default_root_dir, or keep a logger "
                "(each run then gets a new version folder)"
            )
