"""Replica axes: ``--replicas.<option> v1,v2,...`` on the command line (``docs/sweeps.md``).

:func:`extract_axes` takes the replica arguments off the command line (LightningCLI never sees
them); :class:`ReplicaAxes` checks them against the parsed config (a numeric option, lists of
one length, ``--replicas.product``) and gives each replica's config. Used by
:mod:`fl_lightning.replicas` (which re-exports these names) and the CLI.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from jsonargparse import Namespace

from fl_lightning.errors import ConfigError

__all__ = ["DATA_AXES", "EXAMPLES", "PREFIX", "SEED_TARGETS", "ReplicaAxes", "extract_axes"]

PREFIX = "--replicas."
#: ``--replicas.seed`` sets both seeds, as a grid cell's seed does
SEED_TARGETS = ("seed_everything", "data.seed")
#: axes that change only the data or the initial weights: replicas that differ only there
#: share one vmapped local step
DATA_AXES = ("seed", "seed_everything", "data.")
EXAMPLES = "seed, model.local_lr, model.algorithm.mu, model.server_optimizer.lr, data.alpha"


def extract_axes(args: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """``(--replicas.* options as {key: text}, the other arguments)``; ``--replicas.k v`` and
    ``--replicas.k=v`` are both read.

    Raises:
        ConfigError: a ``--replicas.<key>`` without a value, or given twice.
    """
    axes: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = str(args[i])
        if not arg.startswith(PREFIX):
            rest.append(arg)
            i += 1
            continue
        key, eq, value = arg[len(PREFIX):].partition("=")
        if not eq:
            if i + 1 >= len(args) or str(args[i + 1]).startswith("--"):
                raise ConfigError(f"{arg} has no value: give comma-separated numbers, e.g. "
                                  f"{PREFIX}seed 0,1,2")
            value = str(args[i + 1])
            i += 1
        if key in axes:
            raise ConfigError(f"{PREFIX}{key} is given twice: give it once, with every value")
        axes[key] = value
        i += 1
    return axes, rest


@dataclass
class ReplicaAxes:
    """The replica axes of a run: ``values[k]`` is replica ``k``'s ``{axis: value}``.

    Args:
        axes: ``{axis: comma-separated numbers}`` (:func:`extract_axes`); ``product``
            (``true``/``false``) makes every combination of the axes' values.
        config: the parsed config of the subcommand (checks that each axis is a numeric
            option and gives each value its type).
    """

    names: list[str]
    values: list[dict[str, Any]]

    @classmethod
    def parse(cls, axes: dict[str, str], config: Namespace) -> ReplicaAxes:
        axes = dict(axes)
        product = axes.pop("product", "false").lower()
        if product not in ("true", "false"):
            raise ConfigError(f"{PREFIX}product={product!r} is invalid: it must be true or false")
        if not axes:
            raise ConfigError(f"{PREFIX}product needs at least one axis, e.g. {PREFIX}seed 0,1,2")
        columns = {name: _axis_values(name, text, config) for name, text in axes.items()}
        if product == "true":
            rows = [dict(zip(columns, combo, strict=True))
                    for combo in itertools.product(*columns.values())]
        else:
            lengths = {name: len(v) for name, v in columns.items()}
            if len(set(lengths.values())) > 1:
                given = ", ".join(f"{PREFIX}{k} has {n}" for k, n in lengths.items())
                raise ConfigError(
                    f"the replica axes have different lengths ({given} values): give every "
                    f"axis the same number of values, or add {PREFIX}product true for every "
                    "combination"
                )
            rows = [dict(zip(columns, vals, strict=True)) for vals in zip(*columns.values(),
                                                                             strict=True)]
        return cls(list(columns), rows)

    def __len__(self) -> int:
        return len(self.values)

    def label(self, k: int) -> str:
        return ", ".join(f"{name}={self.values[k][name]}" for name in self.names)

    def config(self, base: Namespace, k: int) -> Namespace:
        """``base`` (the subcommand's config) with replica ``k``'s values set (a copy)."""
        config = copy.deepcopy(base)
        for name, value in self.values[k].items():
            for target in SEED_TARGETS if name == "seed" else (name,):
                _set(config, target, value)
        return config

    def step_key(self, k: int) -> tuple:
        """What makes replica ``k``'s local step its own computation (the settings that are
        not a seed or a data option)."""
        return tuple((n, v) for n, v in self.values[k].items() if not n.startswith(DATA_AXES))


def _node(config: Namespace, key: str) -> tuple[Namespace | None, str]:
    """The namespace that holds option ``key`` (``model.algorithm.mu`` is under
    ``model.algorithm.init_args``) and the last part of the key; ``None``: no such option."""
    parts = key.split(".")
    node: Any = config
    for part in parts[:-1]:
        if not isinstance(node, Namespace):
            return None, parts[-1]
        if part in node:
            node = node[part]
        elif isinstance(node.get("init_args"), Namespace) and part in node.init_args:
            node = node.init_args[part]
        else:
            return None, parts[-1]
    if isinstance(node, Namespace) and parts[-1] not in node and isinstance(
            node.get("init_args"), Namespace) and parts[-1] in node.init_args:
        node = node.init_args
    if not isinstance(node, Namespace) or parts[-1] not in node:
        return None, parts[-1]
    return node, parts[-1]


def _set(config: Namespace, key: str, value: Any) -> None:
    node, last = _node(config, key)
    assert node is not None, key
    node[last] = value


def _axis_values(name: str, text: str, config: Namespace) -> list[Any]:
    """The typed values of axis ``name`` (``int`` where the option is an integer)."""
    targets = SEED_TARGETS if name == "seed" else (name,)
    integral = False
    for target in targets:
        node, last = _node(config, target)
        current = node[last] if node is not None else None
        if node is None or isinstance(current, bool) or not isinstance(current, (int, float)):
            what = ("there is no such option in this config" if node is None
                    else f"it is {current!r}, not a number")
            raise ConfigError(
                f"{PREFIX}{name} is invalid: replica axes take numeric options and {target} "
                f"is not one ({what}); e.g. {EXAMPLES}"
            )
        integral = integral or isinstance(current, int)
    values: list[Any] = []
    for part in text.split(","):
        try:
            number = float(part)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or (integral and number != int(number)):
            rule = "integers" if integral else "finite numbers"
            raise ConfigError(
                f"{PREFIX}{name}={text!r} is invalid: it must be comma-separated {rule} "
                f"(e.g. {PREFIX}{name} {'0,1,2' if integral else '0.5,1,2'})"
            )
        values.append(int(number) if integral else number)
    return values
