"""Short names for every project class on the command line (like timm's model registry).

``jsonargparse`` resolves a bare class name (``--model.engine BatchedEngine``,
``--trainer.callbacks+=HessianEigenvalues``) against the imported subclasses of the option's
type. :func:`import_all` imports every module that defines a project class, so that all of them
resolve and ``--help`` lists them; :func:`short_names` maps each short name to its class path
(for messages and closest-name suggestions).

Example:
    >>> names = short_names("engine")
    >>> names["BatchedEngine"]
    'fl_lightning.engines.BatchedEngine'
    >>> short_names("callback")["HessianEigenvalues"]
    'fl_lightning.callbacks.HessianEigenvalues'
"""

from __future__ import annotations

import importlib
import inspect

__all__ = ["KINDS", "import_all", "short_names"]

#: kind -> (module whose ``__all__`` lists the public classes of that kind, CLI option)
KINDS: dict[str, tuple[str, str]] = {
    "algorithm": ("fl_lightning.algorithms", "--model.algorithm"),
    "engine": ("fl_lightning.engines", "--model.engine"),
    "model": ("fl_lightning.models", "--model.net"),
    "callback": ("fl_lightning.callbacks", "--trainer.callbacks"),
    "system": ("fl_lightning.systems", "--model.participation/attack/compressor/..."),
    "progress_bar": ("fl_lightning.progress", "--trainer.callbacks"),
    "checkpoint": ("fl_lightning.checkpoint", "--trainer.callbacks"),
    "logger": ("fl_lightning.loggers", "--trainer.logger"),
    "server_optimizer": ("fl_lightning.optim", "--model.server_optimizer"),
}


def import_all() -> None:
    """Import every module holding project classes (so that their short names resolve)."""
    for module, _ in KINDS.values():
        importlib.import_module(module)


def short_names(kind: str | None = None) -> dict[str, str]:
    """``{ShortName: class_path}`` of the public project classes of ``kind`` (all if None).

    Raises:
        KeyError: for an unknown ``kind`` (one of :data:`KINDS`).
    """
    kinds = [kind] if kind is not None else list(KINDS)
    out: dict[str, str] = {}
    for k in kinds:
        module_name, _ = KINDS[k]
        module = importlib.import_module(module_name)
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name, None)
            if inspect.isclass(obj) and not inspect.isabstract(obj):
                out.setdefault(name, f"{module_name}.{name}")
    return out
