"""Errors raised for bad user input.

Every error in this module carries a single-line message that names the offending option or
file, the value it had, and how to fix it. The command line prints that line alone (no
traceback) and exits with status 2.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataNotFoundError", "exception_line"]


class ConfigError(ValueError):
    """A configuration value is invalid, or a combination of values is impossible."""


class DataNotFoundError(ConfigError):
    """A dataset's files are missing or unreadable under ``data_dir`` and download is off."""


def exception_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: message`` of ``exc`` on one line (white space folded), cut to ``limit``
    characters with ``...``."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
