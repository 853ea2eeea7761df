"""Closest-name suggestions for misspelled options, classes and dataset names (``difflib``).

The choices come from what the project can enumerate: the public classes of
``fl_lightning.algorithms``, ``fl_lightning.models``, ``fl_lightning.engines``,
``fl_lightning.systems``, ``callbacks`` and Lightning's callbacks, ``torch.optim``, and the
dataset names of :func:`fl_lightning.data.datasets.available_datasets`.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Iterable
from typing import Any

__all__ = ["class_choices", "closest", "did_you_mean", "init_options", "suggest_class"]

# Where the classes an option accepts live (the option's key, without ``--``).
_CLASS_HOMES: dict[str, tuple[str, ...]] = {
    "model.algorithm": ("fl_lightning.algorithms",),
    "model.algorithm.proximal": ("fl_lightning.algorithms",),
    "model.net": ("fl_lightning.models",),
    "model.engine": ("fl_lightning.engines", "fl_lightning.engine"),
    "model.server_optimizer": ("fl_lightning.optim", "torch.optim"),
    "model.participation": ("fl_lightning.systems",),
    "model.attack": ("fl_lightning.systems",),
    "model.compressor": ("fl_lightning.systems",),
    "model.privacy": ("fl_lightning.systems",),
    "model.secure_aggregation": ("fl_lightning.systems",),
    "model.aggregator": ("fl_lightning.systems",),
    "trainer.callbacks": ("callbacks", "lightning.pytorch.callbacks"),
    "trainer.logger": ("lightning.pytorch.loggers",),
}


def closest(name: str, choices: Iterable[str]) -> str | None:
    """The choice most similar to ``name`` (case-insensitive), if any is similar enough."""
    choices = list(dict.fromkeys(choices))
    lowered = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hits[0]] if hits else None


def did_you_mean(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """``" (did you mean X?)"`` for the closest choice, or ``""``."""
    hit = closest(name, choices)
    return f" (did you mean {prefix}{hit}?)" if hit is not None else ""


# The base class of what an option accepts (its choices are the subclasses, not the base).
_BASES: dict[str, str] = {
    "model.algorithm": "fl_lightning.algorithms.base.Algorithm",
    "model.algorithm.proximal": "fl_lightning.algorithms.base.Algorithm",
    "model.net": "torch.nn.Module",
    "model.server_optimizer": "torch.optim.Optimizer",
    "trainer.callbacks": "lightning.pytorch.callbacks.Callback",
    "trainer.logger": "lightning.pytorch.loggers.Logger",
}


def _load(path: str) -> Any:
    module_name, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError):
        return None


def _public_classes(module_name: str, base: type | None = None) -> list[str]:
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return []
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    out = []
    for name in names:
        obj = getattr(module, name, None)
        if not inspect.isclass(obj) or obj is base:
            continue
        if base is None or issubclass(obj, base):
            out.append(f"{module_name}.{name}")
    return out


def class_choices(option: str, class_path: str = "") -> list[str]:
    """Class paths an option could mean: the classes of the module ``class_path`` names (when
    it imports), then those of the option's usual homes."""
    homes: list[str] = []
    if "." in class_path:
        homes.append(class_path.rsplit(".", 1)[0])
    key = option.lstrip("-")
    homes.extend(_CLASS_HOMES.get(key, ()))
    if key.startswith("trainer.callbacks"):
        homes.extend(_CLASS_HOMES["trainer.callbacks"])
    base_path = _BASES.get("trainer.callbacks" if key.startswith("trainer.callbacks") else key)
    base = _load(base_path) if base_path else None
    choices: list[str] = []
    for home in dict.fromkeys(homes):
        choices.extend(_public_classes(home, base if inspect.isclass(base) else None))
    return choices


def suggest_class(option: str, class_path: str) -> str:
    """``" (did you mean fl_lightning.algorithms.FedAvg?)"`` for a class path that failed."""
    choices = class_choices(option, class_path)
    short = class_path.rsplit(".", 1)[-1]
    by_short: dict[str, str] = {}
    for c in choices:
        by_short.setdefault(c.rsplit(".", 1)[-1], c)
    hit = closest(short, by_short)
    if hit is not None:
        return f" (did you mean {by_short[hit]}?)"
    hit = closest(class_path, choices)
    return f" (did you mean {hit}?)" if hit is not None else ""


def init_options(class_path: str) -> list[str]:
    """The constructor arguments of the class ``class_path`` (empty if it does not import)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        params = inspect.signature(cls.__init__).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p for p in params if p not in ("self", "args", "kwargs", "params")]
