"""Command-line input checked before and while jsonargparse reads it: kept importable here;
the checks live in :mod:`fl_lightning.validate`."""

from __future__ import annotations

from fl_lightning.validate import check_config_files, explain_parser_error, finite_spellings

__all__ = ["check_config_files", "explain_parser_error", "finite_spellings"]
