"""The files of a grid cell's runs: logger versions, checkpoints to resume from, the curve.

A cell (``<runs>/<setting>/<algorithm>/seed<s>``) holds one logger version per run of its
``fl-lightning fit``: ``fl/version_<n>/metrics.csv`` and ``fl/version_<n>/checkpoints``. An
interrupted cell resumes from its newest readable checkpoint (an unreadable one, truncated or
corrupt, falls back to the older one, then to a fresh start, with a warning line each) in a
new version, and its curve joins the versions (:func:`joined_rows`). Nothing here imports
PyTorch: the grid process stays light.
"""

from __future__ import annotations

import csv
import glob
import math
import os
import re
import zipfile

__all__ = ["checkpoint_problem", "joined_rows", "read_curve", "resume_checkpoint"]


def _versions(folder: str) -> list[int]:
    found = []
    for path in glob.glob(os.path.join(folder, "fl", "version_*")):
        m = re.fullmatch(r"version_(\d+)", os.path.basename(path))
        if m:
            found.append(int(m.group(1)))
    return sorted(found)


def _checkpoints(folder: str) -> list[str]:
    """The cell's checkpoints, the most finished rounds first: the periodic
    ``round=<r>.ckpt`` and the ``preempted-round=<r>.ckpt`` a SIGTERM or Ctrl-C writes (both
    name the rounds done), over every logger version (the newest version first on a tie)."""
    found = []
    pattern = os.path.join(folder, "fl", "version_*", "checkpoints", "*round=*.ckpt")
    for path in glob.glob(pattern):
        m = re.fullmatch(r"(?:preempted-)?round=(\d+)\.ckpt", os.path.basename(path))
        v = re.search(r"version_(\d+)", path)
        if m and v:
            found.append((int(m.group(1)), int(v.group(1)), path))
    return [path for _, _, path in sorted(found, reverse=True)]


def _newest_checkpoint(folder: str) -> str | None:
    """The cell's checkpoint with the most finished rounds (readable or not)."""
    found = _checkpoints(folder)
    return found[0] if found else None


def checkpoint_problem(path: str) -> str | None:
    """Why ``path`` cannot be resumed from (truncated, corrupt, unreadable), or None.

    A checkpoint is a zip archive (``torch.save``) whose every member carries a CRC-32: the
    archive's index and every member's checksum are checked, without importing PyTorch."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return None if bad is None else f"member {bad} fails its CRC check"


def resume_checkpoint(folder: str, label: str = "") -> str | None:
    """The newest readable checkpoint of the cell in ``folder``, or None (a fresh start, in a
    new logger version: nothing is deleted). Each unreadable newer one is skipped with one
    warning line naming the file and what is used instead."""
    found = _checkpoints(folder)
    for i, path in enumerate(found):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        instead = (f"resuming from the older {found[i + 1]}" if i + 1 < len(found)
                   else "starting afresh in a new version (nothing deleted)")
        print(f"fl-lightning-grid: warning: {label + ': ' if label else ''}checkpoint {path} is "
              f"unreadable ({problem}); {instead}", flush=True)
    return None


def joined_rows(folder: str) -> list[dict[str, str]]:
    """The ``metrics.csv`` rows of a cell over its logger versions, in round order.

    A version resumed from a checkpoint runs again (bit-identically) the rounds that an
    interrupted earlier version ran past that checkpoint: from a version's first round on, its
    rows replace those of every earlier version (a fresh start replaces them all)."""
    joined: list[dict[str, str]] = []
    first = math.inf  # the first step of the versions already read (newer ones)
    for version in reversed(_versions(folder)):
        path = os.path.join(folder, "fl", f"version_{version}", "metrics.csv")
        if not os.path.isfile(path):
            continue
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("step", "") != ""]
        joined = [r for r in rows if int(r["step"]) < first] + joined
        first = min([first, *(int(r["step"]) for r in rows)])
    return joined


def read_curve(folder: str) -> dict[int, float]:
    """Round (1-based) -> test accuracy, joined over the logger versions (:func:`joined_rows`)."""
    return {int(r["step"]) + 1: float(r["val_acc"]) for r in joined_rows(folder)
            if r.get("val_acc")}
