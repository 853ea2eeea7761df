"""Command-line input checked before and while jsonargparse reads it.

- :func:`check_config_files`: every ``--config`` file is read first; a missing file, a YAML
  syntax error (tabs, a bad indent), a key repeated in one mapping (YAML would keep the last
  one silently) or a top level that is not a mapping stops the run with one line naming the
  file, the line(s) and the rule;
- :func:`finite_spellings`: ``nan``/``inf`` on the command line are spelt the YAML way
  (``.nan``/``.inf``) so that they reach the option's own check, which says what the rule is
  (``--data.alpha=nan is invalid: ... must be a finite number > 0``) instead of jsonargparse's
  "Expected a float. Got nan";
- :func:`explain_parser_error`: jsonargparse's messages for an unknown option, an unknown class
  or an unknown argument of a class, rewritten as one line with the closest name (difflib) and,
  for a key set in a config file, the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from fl_lightning.errors import ConfigError
from fl_lightning.suggest import class_choices, closest, did_you_mean, init_options, suggest_class
from fl_lightning.yamlcheck import DuplicateKeyError, safe_load_unique

__all__ = ["check_config_files", "explain_parser_error", "finite_spellings"]

_NONFINITE = {
    "nan": ".nan", "+nan": ".nan", "-nan": ".nan",
    "inf": ".inf", "+inf": ".inf", "-inf": "-.inf",
    "infinity": ".inf", "+infinity": ".inf", "-infinity": "-.inf",
}


def finite_spellings(args: Sequence[str]) -> list[str]:
    """``args`` with option values ``nan``, ``inf``, ``-inf`` (any case) spelt ``.nan``,
    ``.inf``, ``-.inf``, which jsonargparse reads as floats."""
    out: list[str] = []
    for arg in args:
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            if value.lower() in _NONFINITE:
                arg = f"{key}={_NONFINITE[value.lower()]}"
        elif arg.lower() in _NONFINITE and out and out[-1].startswith("--") and "=" not in out[-1]:
            # one token: argparse would take "-.inf" for an option
            out[-1] = f"{out[-1]}={_NONFINITE[arg.lower()]}"
            continue
        out.append(arg)
    return out


def _config_paths(args: Sequence[str]) -> list[str]:
    paths = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            paths.append(args[i + 1])
        elif arg.startswith("--config="):
            paths.append(arg.split("=", 1)[1])
    return paths


def check_config_files(args: Sequence[str]) -> list[str]:
    """Read every ``--config`` file given in ``args``; return their paths.

    Raises:
        ConfigError: ``--config=<file>: line L, column C: <rule>`` for a file that is missing,
            is not valid YAML, or whose top level is not a mapping of options.
    """
    files = []
    for path in _config_paths(args):
        if not os.path.isfile(path):
            if any(ch in path for ch in ":{\n"):
                continue  # an inline YAML string: jsonargparse reads it
            raise ConfigError(f"--config={path}: no such file (give the path of a YAML file)")
        files.append(path)
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        try:
            data = safe_load_unique(text)
        except DuplicateKeyError as err:
            raise ConfigError(
                f"--config={path}: {err}: YAML would silently keep only the second; delete "
                "or merge one of them"
            ) from None
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            line = text.splitlines()[mark.line] if mark and mark.line < len(
                text.splitlines()) else ""
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            if "\t" in line[: (mark.column + 1) if mark else None]:
                rule = "YAML is indented with spaces, not tabs (replace the tab)"
            else:
                rule = f"not valid YAML ({err.problem or err.context})"
            raise ConfigError(f"--config={path}: {where}{rule}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"--config={path}: not valid YAML ({err})") from None
        if data is not None and not isinstance(data, dict):
            raise ConfigError(
                f"--config={path}: the top level must be a mapping of options such as "
                f"'trainer: {{max_steps: 10}}', not a {type(data).__name__}"
            )
    return files


def _value_at(config: Mapping[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        if isinstance(node, Mapping) and "init_args" in node and part not in node:
            node = node["init_args"]
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    if isinstance(node, Mapping) and "class_path" in node:
        return node["class_path"]
    return node


_MISSING = object()


def _file_with(key: str, files: Sequence[str], value: Any = _MISSING) -> str | None:
    """The last config file that sets ``key`` (to ``value``, when given)."""
    for path in reversed(files):  # the last file wins when several set the key
        try:
            with open(path, encoding="utf-8") as fh:
                data = yaml.safe_load(fh)
        except (OSError, yaml.YAMLError):
            continue
        if not isinstance(data, dict):
            continue
        sections = [data, *(v for k, v in data.items() if k in ("fit", "validate", "test"))]
        for section in sections:
            if not isinstance(section, Mapping):
                continue
            found = _value_at(section, key)
            if found is not _MISSING and (value is _MISSING or found == value):
                return path
    return None


def _in_file(key: str, files: Sequence[str], value: Any = _MISSING) -> str:
    path = _file_with(key, files, value)
    return f" (set in --config {path})" if path else ""


def explain_parser_error(
    message: str, options: Sequence[str], files: Sequence[str] = ()
) -> str | None:
    """One line for a jsonargparse error about a name, with the closest valid name; ``None``
    for other errors.

    Args:
        message: jsonargparse's message.
        options: the parser's option strings (``--data.alpha``, ...).
        files: the ``--config`` files given (to say which one sets a bad key).
    """
    key_match = re.search(r'Parser key "([\w.]+)"', message)
    key = key_match.group(1) if key_match else None

    unknown = re.search(r"Option '(\w+)' is not accepted", message)
    class_path = re.search(r"class_path '([\w.]+)'", message)
    if unknown and key and class_path:
        name, cls = unknown.group(1), class_path.group(1)
        accepted = init_options(cls)
        hint = did_you_mean(name, accepted, prefix=f"--{key}.")
        listing = f"; it accepts {', '.join(accepted)}" if accepted else ""
        return (
            f"--{key}.{name}: {cls.rsplit('.', 1)[-1]} has no option '{name}'{hint}{listing}"
            f"{_in_file(f'{key}.{name}', files)}"
        )

    not_found = re.search(r"Expected a path but (\S+) either not accessible or invalid", message)
    value = not_found.group(1) if not_found else None
    if value is None and class_path and re.search(r"has no attribute|No module named", message):
        value = class_path.group(1)
    if value is not None and key:
        if "." not in value:
            reason = "a class is given by its import path"
        elif missing := re.search(r"No module named '([\w.]+)'", message):
            reason = f"no module {missing.group(1)}"
        else:
            reason = f"{value.rsplit('.', 1)[0]} has no class {value.rsplit('.', 1)[1]}"
        hint = suggest_class(key, value)
        if not hint:
            shorts = [c.rsplit(".", 1)[-1] for c in class_choices(key, value)]
            hint = f"; choose one of {', '.join(dict.fromkeys(shorts))}" if shorts else ""
        return f"--{key}={value}: not found ({reason}){hint}{_in_file(key, files, value)}"

    literal = re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (\S+)", message)
    if literal and key:
        allowed = [a.strip().strip("'\"") for a in literal.group(1).split(",")]
        value = literal.group(2)
        hint = did_you_mean(value, allowed, prefix=f"--{key} ")
        return (
            f"--{key}={value} is not one of {', '.join(allowed)}{hint}"
            f"{_in_file(key, files, value)}"
        )

    unrecognized = re.match(r"unrecognized arguments: (\S+)", message)
    if unrecognized:
        given = unrecognized.group(1).split("=", 1)[0]
        if given.startswith("-"):
            hint = did_you_mean(given, options)
            return f"{given} is not an option{hint}"

    config_key = re.search(r"does not accept option '([\w.]+)'", message)
    if config_key:
        name = config_key.group(1)
        hint = closest(f"--{name}", options)
        return (
            f"'{name}' is not an option{_in_file(name, files)}"
            + (f" (did you mean {hint.lstrip('-')}?)" if hint else "")
        )
    return None
