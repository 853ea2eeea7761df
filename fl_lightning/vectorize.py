"""``fl-lightning-grid --vectorize``: the cells that differ only in seed (``seeds``) or also
in a numeric setting or a number of their algorithm configs (``numeric``: ``fedprox_mu0.yaml``
and ``fedprox_mu1.yaml``, which differ only in ``mu``) run as replicas of one ``fit``
(``--replicas.*``, ``docs/sweeps.md``); each cell's folder then gets its replica's metrics and
``result.json``, so the tables and figures are read exactly as for cells run one by one."""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence

from fl_lightning.cellfiles import _versions
from fl_lightning.grid import (
    Cell,
    Setting,
    _algorithm_config,
    _algorithm_name,
    cell_command,
    last_error_line,
    run_cell,
    run_logged,
)


def _numeric(text: str) -> bool:
    try:
        return math.isfinite(float(text))
    except ValueError:
        return False


def _numeric_options(setting: Setting) -> dict[str, str]:
    """The setting's numeric options (``--data.alpha 0.1``, the straggler share), by flag."""
    opts = setting.options()
    return {flag: value for flag, value in zip(opts[::2], opts[1::2], strict=True)
            if flag not in ("--data.dataset", "--data.partition") and _numeric(value)}


def _flat(tree: object, prefix: str = "") -> dict[str, object]:
    """A config tree as ``{option: value}``, written as on the command line (``init_args``
    left out: ``model.algorithm.init_args.mu`` is ``model.algorithm.mu``)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix[:-1]: json.dumps(tree, sort_keys=True)} if prefix else {}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(_flat(value, prefix if key == "init_args" else f"{prefix}{key}."))
    return out


def _given(extra: str) -> set[str]:
    """The options that ``--extra`` sets (``--model.local_lr 0.1`` -> ``model.local_lr``)."""
    import shlex

    return {a[2:].split("=")[0] for a in shlex.split(extra) if a.startswith("--")}


def _algorithm_numbers(name: str, setting: Setting, extra: str) -> tuple[tuple, dict[str, str]]:
    """``(shape, numbers)`` of algorithm config ``name``: ``numbers`` are its numeric
    ``model.*`` options (``--model.algorithm.mu``: ``"1.0"``) that neither ``--extra`` nor the
    setting sets (those would override a replica axis); ``shape`` is everything else, with the
    names of the numbers: two configs of one shape differ only in numbers, replica axes."""
    import yaml

    with open(_algorithm_config(name)) as fh:
        tree = yaml.safe_load(fh) or {}
    fixed = _given(extra) | {f[2:] for f in setting.options()[::2]}
    shape, numbers = [], {}
    for key, value in sorted(_flat(tree).items()):
        number = json.loads(value) if isinstance(value, str) else value
        if (key.startswith("model.") and key not in fixed and isinstance(number, (int, float))
                and not isinstance(number, bool) and math.isfinite(number)):
            numbers[f"--{key}"] = str(number)
            shape.append((key, None))
        else:
            shape.append((key, value))
    return tuple(shape), numbers


def vector_groups(cells: Sequence[Cell], mode: str, extra: str = "") -> list[list[Cell]]:
    """The cells that one process trains as replicas: ``seeds``: the cells of one algorithm
    and setting; ``numeric``: of one dataset and partition and one algorithm config up to
    its numbers (their seeds, partition values, straggler shares and algorithm configs'
    numbers differ; ``extra``: the grid's ``--extra``, whose options are no axes); ``none``:
    each cell alone. Groups keep the cells' order."""
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        if mode == "none":
            key: tuple = (cell,)
        elif mode == "seeds":
            key = (cell.algorithm, cell.setting)
        else:
            s = cell.setting
            shape = _algorithm_numbers(cell.algorithm, s, extra)[0]
            key = (shape, s.dataset, s.partition, tuple(_numeric_options(s)))
        groups.setdefault(key, []).append(cell)
    return list(groups.values())


def group_folder(cells: Sequence[Cell], runs: str) -> str:
    """Where a vectorized group's process writes (named by its cells, so the same group
    resumes from its own checkpoints)."""
    import hashlib

    first = cells[0]
    names = "\n".join(c.folder(runs) for c in cells)
    digest = hashlib.sha1(names.encode()).hexdigest()[:10]
    return os.path.join(runs, "vectorized", f"{_algorithm_name(first.algorithm)}_"
                        f"{first.setting.dataset}_{len(cells)}cells_{digest}")


def group_command(cells: Sequence[Cell], args: argparse.Namespace) -> list[str]:
    """One ``fl-lightning fit`` for the group: the first cell's command (its algorithm config)
    with one ``--replicas.*`` axis per option that differs between the cells (``seed`` for
    seeds, a setting's value, a number of the algorithm configs)."""
    cmd = cell_command(cells[0], args, group_folder(cells, args.runs))
    axes = {"seed": [str(c.seed) for c in cells]}
    columns = [{**_numeric_options(c.setting),
                **_algorithm_numbers(c.algorithm, c.setting, args.extra)[1]} for c in cells]
    for flag in columns[0]:
        values = [col[flag] for col in columns]
        if len(set(values)) > 1:
            axes[flag[2:]] = values
    for name, values in axes.items():
        cmd += [f"--replicas.{name}", ",".join(values)]
    return cmd


def pending_cells(cells: Sequence[Cell], args: argparse.Namespace) -> list[Cell]:
    """The cells of ``cells`` that have not finished (no ``result.json``)."""
    return [c for c in cells if not os.path.isfile(os.path.join(c.folder(args.runs),
                                                                "result.json"))]


def run_group(cells: Sequence[Cell], args: argparse.Namespace,
              started: Callable[[subprocess.Popen], None] | None = None) -> list[dict]:
    """Run the group's unfinished cells as replicas of one process (one cell: as itself);
    each cell then gets its replica's metrics and ``result.json``, as if it had run alone.

    A partly finished group (some cells finished, e.g. a replica that diverged, or seeds
    added to the grid): the finished cells are kept; the unfinished ones form a group of their
    own (its own folder, named by its cells: from round 0, since the first group's checkpoints
    hold other replicas), or run alone if only one is left. ``started``: as for
    :func:`~fl_lightning.grid.run_cell` (a submitit job stops the process on preemption)."""
    done = [os.path.join(c.folder(args.runs), "result.json") for c in cells]
    pending = pending_cells(cells, args)
    if len(pending) < 2 or args.report_only:
        return [run_cell(c, args, started) for c in cells]
    folder = group_folder(pending, args.runs)
    offsets = _version_offsets(pending, folder, args)
    cmd = group_command(pending, args)
    rc, seconds = run_logged(cmd, folder, started)
    unfinished = [cell for k, cell in enumerate(pending)
                  if not _replica_result(cell, k, folder, rc, seconds, cmd, args, offsets[k])]
    if unfinished:
        _say_why(unfinished, pending, folder)
    # every cell is finished now (its result.json), or said why and is reported as failed
    return [run_cell(c, args) if os.path.isfile(d) else {"rc": rc or 1}
            for c, d in zip(cells, done, strict=True)]


def _version_offsets(cells: Sequence[Cell], group: str, args: argparse.Namespace) -> list[int]:
    """For each cell, the logger version of its folder that the group's version 0 becomes:
    the one after the versions the cell held when the group started (its own interrupted run,
    another group's replica: a partly finished group), so that nothing there is overwritten and
    the group's rounds supersede theirs (:func:`~fl_lightning.cellfiles.joined_rows`). Kept in
    ``<group>/cells.json``; a group folder without it (an older grid's) maps versions 1:1."""
    path = os.path.join(group, "cells.json")
    if os.path.isfile(path):
        with open(path) as fh:
            return [int(entry["version_offset"]) for entry in json.load(fh)]
    if _versions(group):
        return [0] * len(cells)
    os.makedirs(group, exist_ok=True)
    offsets = []
    for cell in cells:
        found = _versions(cell.folder(args.runs))
        offsets.append(found[-1] + 1 if found else 0)
    with open(path, "w") as fh:
        json.dump([{"cell": c.folder(args.runs), "version_offset": o}
                   for c, o in zip(cells, offsets, strict=True)], fh, indent=2)
    return offsets


def _replica_result(cell: Cell, k: int, group: str, rc: int, seconds: float, cmd: list[str],
                    args: argparse.Namespace, offset: int = 0) -> bool:
    """Copy replica ``k``'s metrics of every logger version ``v`` of ``group`` into the
    cell's folder (as its version ``offset + v``) and write its ``result.json`` when it
    finished; whether it did."""
    target = cell.folder(args.runs)
    final = None
    for version in _versions(group):
        src = os.path.join(group, "fl", f"version_{version}", f"replica_{k}")
        if not os.path.isdir(src):
            continue
        dst = os.path.join(target, "fl", f"version_{offset + version}")
        os.makedirs(dst, exist_ok=True)
        for name in ("metrics.csv", "final_metrics.json", "curves.png"):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
        if os.path.isdir(os.path.join(src, "analysis")):  # replica-aware callbacks' files
            shutil.copytree(os.path.join(src, "analysis"), os.path.join(dst, "analysis"),
                            dirs_exist_ok=True)
        if os.path.isfile(os.path.join(src, "final_metrics.json")):
            final = json.load(open(os.path.join(src, "final_metrics.json")))
    if rc != 0 or final is None or "stopped" in final:
        return False
    json.dump({"rc": 0, "seconds": seconds, "cmd": cmd, "replica": k, "final": final},
              open(os.path.join(target, "result.json"), "w"), indent=2)
    print(f"fl-lightning-grid: {_label(cell)}: rc=0 {seconds:.0f}s (replica {k} of "
          f"{os.path.basename(group)}) test_acc={final.get('test_acc')}", flush=True)
    return True


def _label(cell: Cell) -> str:
    return f"{cell.setting.slug} {_algorithm_name(cell.algorithm)} seed {cell.seed}"


def _say_why(unfinished: Sequence[Cell], pending: Sequence[Cell], group: str) -> None:
    """One line per replica that stopped (it diverged: its ``stopped`` line), and one line for
    the group when its process failed before any replica finished (an error in its options,
    more replicas than the memory holds, a crash), naming its cells."""
    stopped = {}
    for cell in unfinished:
        k = pending.index(cell)
        for path in sorted(glob.glob(os.path.join(group, "fl", "version_*", f"replica_{k}",
                                                  "final_metrics.json"))):
            stopped[cell] = json.load(open(path)).get("stopped", stopped.get(cell))
    for cell in unfinished:
        if stopped.get(cell):
            print(f"fl-lightning-grid: {_label(cell)}: replica {pending.index(cell)} of "
                  f"{group} did not finish: {stopped[cell]}", flush=True)
    rest = [c for c in unfinished if not stopped.get(c)]
    if not rest:
        return
    why = last_error_line(os.path.join(group, "log.txt"))
    hint = ("; in fl-lightning-grid: smaller groups (--vectorize seeds instead of numeric, "
            "fewer --seeds) or one process per cell (--vectorize none)"
            if "replicas, whose weights need" in why else "")
    print(f"fl-lightning-grid: {len(rest)} cell(s) ({', '.join(_label(c) for c in rest)}), "
          f"replicas of {group}, did not finish: {why}{hint}", flush=True)
