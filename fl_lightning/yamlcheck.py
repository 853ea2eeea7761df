"""A YAML reader for config files that refuses a key repeated in one mapping.

YAML parsers (PyYAML, and jsonargparse on top of it) keep the last of two equal keys of one
mapping without a word: a config with ``local_lr: 0.01`` and, further down, ``local_lr: 5.0``
trains at 5.0, and a second top-level ``model:`` section silently drops the first. The command
line reads every ``--config`` file with :func:`safe_load_unique` before the parser sees it
(:func:`fl_lightning.validate.check_config_files`), so a repeated key stops the run with one
line naming the file, the key and both lines.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["DuplicateKeyError", "safe_load_unique"]


class DuplicateKeyError(yaml.YAMLError):
    """A mapping holds ``key`` twice, at lines ``first`` and ``second`` (counted from 1)."""

    def __init__(self, key: object, first: int, second: int) -> None:
        super().__init__(f"key {key!r} appears twice in one mapping (lines {first} and {second})")
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's ``SafeLoader``, raising :class:`DuplicateKeyError` on a repeated key."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *anchor`` may repeat
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: SafeLoader reports it itself
                continue
            if first != line:
                raise DuplicateKeyError(key, first, line)
        return super().construct_mapping(node, deep=deep)


def safe_load_unique(text: str) -> Any:
    """``yaml.safe_load(text)``, except that a key repeated in one mapping is an error.

    Raises:
        DuplicateKeyError: naming the key and both of its lines.
        yaml.YAMLError: for text that is not valid YAML.
    """
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
