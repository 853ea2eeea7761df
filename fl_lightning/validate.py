"""Checking what the user gave: one module, one message grammar.

Every bad value stops the run with one line (a :class:`~fl_lightning.errors.ConfigError`) in
one grammar::

    <option>=<value> is invalid: it must be <rule>[ (<hint>)]
    --model.local_lr=-1 is invalid: it must be a finite number > 0 (e.g. 0.01)
    --model.engine.autocast='bf61' is invalid: it must be one of 'none', 'bf16' (did you
        mean --model.engine.autocast bf16?)
    --model.aggregator.beta=0.5 is invalid: it must be in [0, 0.5) (the share trimmed at
        each end; e.g. 0.2)

(each on one line). ``<option>`` is the command-line name (``--model.engine.compile``),
``<value>`` the value as given (``repr``: strings in quotes), ``<rule>`` what is accepted and
``<hint>`` what the option means, an example, or the closest valid name. A combination that
cannot run reads ``<option>=<value> cannot be combined with <other>=<value>: <why>; <fix>``
(:func:`conflict`).

Checkers (each returns the checked value, converted, or raises):

- :func:`number`, :func:`positive`, :func:`nonnegative`: a finite float, with bounds;
- :func:`share`: a finite float in an interval of ``[0, 1]`` (``[0, 1)`` by default);
- :func:`integer`: an ``int`` (not a ``bool``), with bounds;
- :func:`choice`: one of a few values, with the closest one suggested;
- :func:`boolean`: ``True`` or ``False``;
- :func:`invalid` and :func:`conflict` build the message for any other rule.

Reading the command line (before and while jsonargparse reads it):

- :func:`check_config_files`: every ``--config`` file is read first; a missing file, a YAML
  syntax error (tabs, a bad indent) or a top level that is not a mapping stops the run with one
  line naming the file, the line and the rule;
- :func:`finite_spellings`: ``nan``/``inf`` on the command line are spelt the YAML way
  (``.nan``/``.inf``) so that they reach the option's own check, which says what the rule is
  (``--data.alpha=nan is invalid: ... must be a finite number > 0``) instead of jsonargparse's
  "Expected a float. Got nan";
- :func:`explain_parser_error`: jsonargparse's messages for an unknown option, an unknown class
  or an unknown argument of a class, rewritten as one line with the closest name (difflib) and,
  for a key set in a config file, the file.

Example:
    >>> positive(0.5, "--model.local_lr")
    0.5
    >>> share(1.5, "--ratio", hint="e.g. 0.2")
    Traceback (most recent call last):
    ...
    fl_lightning.errors.ConfigError: --ratio=1.5 is invalid: it must be in [0, 1) (e.g. 0.2)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import yaml

from fl_lightning.errors import ConfigError
from fl_lightning.suggest import class_choices, closest, did_you_mean, init_options, suggest_class
from fl_lightning.yamlcheck import DuplicateKeyError, safe_load_unique

__all__ = [
    "boolean",
    "check_config_files",
    "choice",
    "conflict",
    "explain_parser_error",
    "finite_spellings",
    "integer",
    "invalid",
    "nonnegative",
    "number",
    "positive",
    "share",
]


def invalid(option: str, value: Any, rule: str, hint: str | None = None) -> ConfigError:
    """The error ``<option>=<value!r> is invalid: it must be <rule>[ (<hint>)]`` (to raise)."""
    tail = f" ({hint})" if hint else ""
    return ConfigError(f"{option}={value!r} is invalid: it must be {rule}{tail}")


def conflict(first: str, second: str, why: str, fix: str) -> ConfigError:
    """The error ``<first> cannot be combined with <second>: <why>; <fix>`` (to raise), for two
    settings (``--model.aggregator=Krum``) that cannot run together."""
    return ConfigError(f"{first} cannot be combined with {second}: {why}; {fix}")


def _bounds(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def _inside(v: float, low: float | None, high: float | None, low_open: bool,
            high_open: bool) -> bool:
    above = low is None or (v > low if low_open else v >= low)
    below = high is None or (v < high if high_open else v <= high)
    return above and below


def number(value: Any, option: str, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, hint: str | None = None) -> float:
    """``value`` as a finite float within the bounds (``None``: unbounded; ``*_open``: the
    bound itself excluded).

    Raises:
        ConfigError: ``<option>=<value> is invalid: it must be a finite number <bounds>``.
    """
    bounds = _bounds(low, high, low_open, high_open)
    rule = f"a finite number {bounds}".rstrip()
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise invalid(option, value, rule, hint) from None
    if isinstance(value, bool) or not math.isfinite(v) or not _inside(v, low, high, low_open,
                                                                       high_open):
        raise invalid(option, value, rule, hint)
    return v


def positive(value: Any, option: str, hint: str | None = None) -> float:
    """``value`` as a finite float ``> 0`` (see :func:`number`)."""
    return number(value, option, 0.0, low_open=True, hint=hint)


def nonnegative(value: Any, option: str, hint: str | None = None) -> float:
    """``value`` as a finite float ``>= 0`` (see :func:`number`)."""
    return number(value, option, 0.0, hint=hint)


def share(value: Any, option: str, hint: str | None = None, *, low_open: bool = False,
          high_open: bool = True, high: float = 1.0) -> float:
    """``value`` as a float in ``[0, 1)`` (the ends per ``low_open``/``high_open``; the upper
    end ``high``).

    Raises:
        ConfigError: ``<option>=<value> is invalid: it must be in [0, 1)``.
    """
    rule = _bounds(0.0, high, low_open, high_open)
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise invalid(option, value, rule, hint) from None
    if isinstance(value, bool) or not (math.isfinite(v)
                                       and _inside(v, 0.0, high, low_open, high_open)):
        raise invalid(option, value, rule, hint)
    return v


def integer(value: Any, option: str, low: int | None = None, high: int | None = None, *,
            hint: str | None = None) -> int:
    """``value`` as an ``int`` (a ``bool`` is not one) in ``[low, high]``.

    Raises:
        ConfigError: ``<option>=<value> is invalid: it must be an integer <bounds>``.
    """
    rule = f"an integer {_bounds(low, high, False, False)}".rstrip()
    if isinstance(value, bool) or not isinstance(value, int) or not _inside(
            value, low, high, False, False):
        raise invalid(option, value, rule, hint)
    return value


def choice(value: Any, option: str, choices: Iterable[Any], hint: str | None = None) -> Any:
    """``value`` if it is one of ``choices``; else the closest choice is suggested.

    Raises:
        ConfigError: ``<option>=<value> is invalid: it must be one of <choices> (did you mean
            <option> <closest>?)``.
    """
    choices = list(choices)
    if any(value == c and type(value) is type(c) for c in choices):
        return value
    hits = did_you_mean(str(value), [str(c) for c in choices], prefix=f"{option} ").strip()
    hint = "; ".join(h for h in (hint, hits[1:-1] if hits else "") if h) or None
    listed = ", ".join(repr(c) for c in choices)
    raise invalid(option, value, f"one of {listed}", hint)


def boolean(value: Any, option: str) -> bool:
    """``value`` if it is ``True`` or ``False``.

    Raises:
        ConfigError: ``<option>=<value> is invalid: it must be true or false``.
    """
    if not isinstance(value, bool):
        raise invalid(option, value, "true or false")
    return value


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
            is not valid YAML, repeats a key in one mapping (YAML would keep the last one
            silently), or whose top level is not a mapping of options.
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
    for explain in (_unknown_class_option, _unknown_class, _not_in_literal):
        line = explain(message, key, files) if key else None
        if line is not None:
            return line
    return _unknown_option(message, options, files)


def _unknown_class_option(message: str, key: str, files: Sequence[str]) -> str | None:
    unknown = re.search(r"Option '(\w+)' is not accepted", message)
    class_path = re.search(r"class_path '([\w.]+)'", message)
    if not (unknown and class_path):
        return None
    name, cls = unknown.group(1), class_path.group(1)
    accepted = init_options(cls)
    hint = did_you_mean(name, accepted, prefix=f"--{key}.")
    listing = f"; it accepts {', '.join(accepted)}" if accepted else ""
    return (
        f"--{key}.{name}: {cls.rsplit('.', 1)[-1]} has no option '{name}'{hint}{listing}"
        f"{_in_file(f'{key}.{name}', files)}"
    )


def _unknown_class(message: str, key: str, files: Sequence[str]) -> str | None:
    not_found = re.search(r"Expected a path but (\S+) either not accessible or invalid", message)
    class_path = re.search(r"class_path '([\w.]+)'", message)
    value = not_found.group(1) if not_found else None
    if value is None and class_path and re.search(r"has no attribute|No module named", message):
        value = class_path.group(1)
    if value is None:
        return None
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


def _not_in_literal(message: str, key: str, files: Sequence[str]) -> str | None:
    literal = re.search(r"Expected a typing\.Literal\[(.*?)\]\. Got value: (\S+)", message)
    if not literal:
        return None
    allowed = [a.strip().strip("'\"") for a in literal.group(1).split(",")]
    value = literal.group(2)
    hint = did_you_mean(value, allowed, prefix=f"--{key} ")
    return (f"--{key}={value} is invalid: it must be one of {', '.join(allowed)}{hint}"
            f"{_in_file(key, files, value)}")


def _unknown_option(message: str, options: Sequence[str], files: Sequence[str]) -> str | None:
    unrecognized = re.match(r"unrecognized arguments: (\S+)", message)
    if unrecognized:
        given = unrecognized.group(1).split("=", 1)[0]
        if given.startswith("-"):
            return f"{given} is not an option{did_you_mean(given, options)}"
    config_key = re.search(r"does not accept option '([\w.]+)'", message)
    if config_key:
        name = config_key.group(1)
        hint = closest(f"--{name}", options)
        return (
            f"'{name}' is not an option{_in_file(name, files)}"
            + (f" (did you mean {hint.lstrip('-')}?)" if hint else "")
        )
    return None
