"""``fl-lightning-grid``: algorithm configs x settings x seeds, run and tabulated.

One command runs every cell of the grid (one ``fl-lightning fit`` per algorithm config,
setting and seed), each in its own folder, and writes the paper-style table (mean and standard
deviation over seeds of the final and the best test accuracy, arrows against FedAvg as in
Table 1 of the FedSoL paper) as Markdown and CSV, plus one learning-curve figure per setting
with a band of one standard deviation over seeds.

Example (from the repository root; ``DATA_DIR`` holds ``medmnist/pneumoniamnist.npz``)::

    fl-lightning-grid --base configs/mnist/fedavg_lda.yaml \\
        --algorithms fedavg,fedntd,fedsol,fedsol_head \\
        --settings pneumoniamnist:lda:0.1,pneumoniamnist:lda:0.5 --seeds 0,1,2 \\
        --rounds 200 --jobs 1 --data-dir DATA_DIR --runs runs/grid --out runs/grid/table

A setting is ``DATASET:PARTITION[:VALUE]``: ``mnist:lda:0.1`` (``--data.alpha 0.1``),
``mnist:shard:2`` (``--data.shards_per_client 2``), ``mnist:iid``, ``mnist:powerlaw`` (the
FedProx paper's MNIST devices), or the FedProx paper's synthetic data: ``synthetic:A:B``
(Synthetic(alpha=A, beta=B), ``--data.partition natural``) and ``synthetic_iid``. An algorithm
is the name of a file in ``configs/algorithms`` (``fedsol``) or the path of any YAML config.
``--stragglers 0,0.5,0.9`` adds a straggler level to every setting
(``--model.participation.straggler_ratio``; the base or algorithm config defines
``model.participation``, e.g. the FedProx paper's uniform epochs and FedAvg's drop policy).

Config files (``--base`` and the algorithms) are looked up first relative to the current
folder, then in the ``configs/`` folder of the repository the package was installed from
(:data:`CONFIGS`; the wheel does not ship ``configs/``, an editable install or a source
checkout has it): ``--base quickstart.yaml`` or ``--base mnist/fedavg_lda.yaml`` works from any
folder. Each cell runs with absolute config paths.

Resumable: a cell whose run finished (``result.json`` in its folder) is skipped; a cell that
was interrupted resumes from its newest checkpoint (``--ckpt_path``), written every
``--checkpoint-every`` rounds (the last two kept), in a new logger version; an unreadable
newest checkpoint (truncated, corrupt) falls back to the older one, then to a fresh start, with
one warning line each (``fl_lightning.cellfiles``). Its learning curve joins the versions, each
from the round it resumed at, so the table of an interrupted cell is that of an uninterrupted
one.
``--report-only`` writes the tables from what has finished, running nothing.

On a cluster: ``--launcher submitit`` submits each unfinished cell (or vectorized group,
``--vectorize``) as a SLURM job through submitit and waits for them
(``fl_lightning/launchers.py``, ``docs/cluster.md``).

Fails early and says why: every setting's dataset and every algorithm config is checked before
any cell starts; a second grid on the same ``--runs`` folder stops at once (``.grid.lock``,
taken over when the grid that held it is gone); a failed cell prints the line of its
``log.txt`` that says why (its one-line error, a traceback's last line, ``Killed``).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NoReturn

from fl_lightning import launchers
from fl_lightning.cellfiles import (  # noqa: F401  (re-exported: the grid's own API)
    _newest_checkpoint,
    _versions,
    joined_rows,
    read_curve,
    resume_checkpoint,
)
from fl_lightning.gridreport import (  # noqa: F401  (re-exported: the grid's own API)
    BASELINE,
    plot_curves,
    summarize,
    write_tables,
)

__all__ = ["Cell", "Setting", "main", "parse_setting", "summarize"]

PARTITION_OPTION = {"lda": "--data.alpha", "shard": "--data.shards_per_client"}
#: checkpoints kept per cell (per logger version): an unreadable newest one falls back to the other
KEEP_CHECKPOINTS = 2
#: the repository's ``configs/`` folder, beside the installed ``fl_lightning`` package
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass(frozen=True)
class Setting:
    """One data setting of the grid: dataset, partition and its parameter."""

    dataset: str
    partition: str
    value: str | None = None
    stragglers: str | None = None

    @property
    def slug(self) -> str:
        value = self.value.replace(":", "_") if self.value else None
        level = f"s{self.stragglers}" if self.stragglers is not None else None
        return "_".join(p for p in (self.dataset, self.partition, value, level) if p)

    @property
    def label(self) -> str:
        name = {"lda": "LDA alpha", "shard": "shard s"}.get(self.partition)
        if self.dataset == "synthetic":
            text = f"Synthetic({self.value.replace(':', ',')})"
        elif self.dataset == "synthetic_iid":
            text = "Synthetic IID"
        else:
            text = (f"{self.dataset} {name}={self.value}" if name
                    else f"{self.dataset} {self.partition}")
        if self.stragglers is not None:
            text += f", {100 * float(self.stragglers):g}% stragglers"
        return text

    def options(self) -> list[str]:
        opts = ["--data.dataset", self.dataset, "--data.partition", self.partition]
        if self.dataset == "synthetic":
            a, b = self.value.split(":")
            opts += ["--data.synthetic_alpha", a, "--data.synthetic_beta", b]
        elif self.value is not None:
            opts += [PARTITION_OPTION[self.partition], self.value]
        if self.stragglers is not None:
            opts += ["--model.participation.straggler_ratio", self.stragglers]
        return opts


def parse_setting(text: str) -> Setting:
    """``mnist:lda:0.1`` -> ``Setting("mnist", "lda", "0.1")``; exits 2 on a bad spec."""
    parts = text.strip().split(":")
    if parts == ["synthetic_iid"]:
        return Setting("synthetic_iid", "natural")
    if len(parts) == 3 and parts[0] == "synthetic":
        try:
            numbers = [float(p) for p in parts[1:]]
        except ValueError:
            numbers = [math.nan]
        if all(math.isfinite(v) and v >= 0 for v in numbers):
            return Setting("synthetic", "natural", f"{parts[1]}:{parts[2]}")
    if len(parts) == 2 and parts[1] == "powerlaw":
        return Setting(parts[0], "powerlaw")
    if len(parts) == 3 and parts[1] in PARTITION_OPTION:
        try:
            number = float(parts[2])
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number > 0:
            return Setting(parts[0], parts[1], parts[2])
    if len(parts) == 2 and parts[1] == "iid":
        return Setting(parts[0], "iid")
    _fail(
        f"--settings entry {text!r} is invalid: use DATASET:lda:ALPHA, DATASET:shard:S, "
        "DATASET:iid, mnist:powerlaw, synthetic:ALPHA:BETA (both >= 0) or synthetic_iid "
        "(e.g. pneumoniamnist:lda:0.1)"
    )


def check_datasets(settings: Sequence[Setting]) -> None:
    """Exit 2 with one line, before any cell starts, on a dataset name no cell could load.

    The names that need no import are checked first: listing the MedMNIST flags imports
    medmnist and PyTorch (~2 s of CPU), which the grid process otherwise never does."""
    from fl_lightning.data.datasets import NATURAL, RGB32
    from fl_lightning.suggest import did_you_mean

    cheap = {"digits", "mnist", *RGB32, *NATURAL}
    unknown = [s for s in settings if s.dataset not in cheap]
    if not unknown:
        return
    from fl_lightning.data.datasets import available_datasets

    known = available_datasets()
    for s in unknown:
        if s.dataset not in known:
            _fail(f"--settings dataset {s.dataset!r} is unknown"
                  f"{did_you_mean(s.dataset, known)}: use one of {', '.join(known[:7])} or "
                  "a MedMNIST 2D flag such as pneumoniamnist")


@contextlib.contextmanager
def grid_lock(runs: str, enabled: bool = True) -> Iterator[None]:
    """Hold ``<runs>/.grid.lock`` (the grid's pid) while cells run, so that a second grid on
    the same folder stops with one line instead of running the same cells twice. A lock whose
    process is gone (a killed grid) is taken over."""
    if not enabled:
        yield
        return
    os.makedirs(runs, exist_ok=True)
    path = os.path.join(runs, ".grid.lock")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(open(path).read().strip() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError):
                os.remove(path)  # left by a grid that died: take it over
                continue
            except PermissionError:
                pass  # alive, another user's
            _fail(f"another fl-lightning-grid (pid {pid}) is running on --runs {runs}: wait "
                  f"for it to end or give another --runs folder (remove {path} if it is not)")
    else:  # pragma: no cover - a third grid won the race
        _fail(f"--runs {runs} is locked by another grid ({path})")
    with os.fdopen(fd, "w") as fh:
        fh.write(str(os.getpid()))
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _fail(message: str) -> NoReturn:
    print(f"fl-lightning-grid: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_config(name: str, option: str, folder: str = "") -> str:
    """The absolute path of config ``name``: relative to the current folder, else in
    :data:`CONFIGS` (``<CONFIGS>/<folder>/<name>``, then ``<CONFIGS>/<name>``; a leading
    ``configs/`` is dropped there).

    Raises:
        SystemExit: (2) with one line naming ``option``, the value and every place searched.
    """
    inside = name[len("configs/"):] if name.startswith("configs/") else name
    places = [os.path.abspath(name)]
    if not os.path.isabs(name):
        places += [os.path.join(CONFIGS, folder, inside)] if folder else []
        places += [os.path.join(CONFIGS, inside)]
    for path in dict.fromkeys(places):
        if os.path.isfile(path):
            return path
    _fail(f"{option} {name!r} was not found in {', '.join(dict.fromkeys(places))}: give a "
          "path relative to the current folder or a config name such as quickstart.yaml")


def _algorithm_config(name: str) -> str:
    """The config of an ``--algorithms`` entry, ``fedsol`` or a YAML path (see
    :func:`resolve_config`)."""
    yaml_name = name if name.endswith((".yaml", ".yml")) else f"{name}.yaml"
    return resolve_config(yaml_name, f"--algorithms entry {name!r}:", "algorithms")


def _algorithm_name(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


@dataclass(frozen=True)
class Cell:
    """One run of the grid: algorithm x setting x seed."""

    algorithm: str
    setting: Setting
    seed: int

    def folder(self, runs: str) -> str:
        return os.path.join(runs, self.setting.slug, _algorithm_name(self.algorithm),
                            f"seed{self.seed}")

    @property
    def label(self) -> str:
        return f"{self.setting.slug} {_algorithm_name(self.algorithm)} seed {self.seed}"


def cell_command(cell: Cell, args: argparse.Namespace, folder: str | None = None) -> list[str]:
    """The ``fl-lightning fit`` command of ``cell`` (a resume adds ``--ckpt_path``), writing
    into ``folder`` (default: the cell's own)."""
    folder = cell.folder(args.runs) if folder is None else folder
    versions = _versions(folder)
    cmd = [
        sys.executable, "-m", "fl_lightning.cli", "fit",
        "--config", resolve_config(args.base, "--base"),
        "--config", _algorithm_config(cell.algorithm),
        *cell.setting.options(),
        "--data.data_dir", args.data_dir,
        "--data.seed", str(cell.seed), "--seed_everything", str(cell.seed),
        "--trainer.max_steps", str(args.rounds),
        "--trainer.val_check_interval", str(args.eval_every),
        "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", folder,
        "--trainer.logger.init_args.version", str(versions[-1] + 1 if versions else 0),
        "--checkpoint_every_n_rounds", str(args.checkpoint_every),
        "--keep_last_checkpoints", str(KEEP_CHECKPOINTS),
        *shlex.split(args.extra),
    ]
    ckpt = resume_checkpoint(folder, cell.label)
    if ckpt is not None:
        cmd += ["--ckpt_path", ckpt]
    return cmd


def cell_label(cell: Cell) -> str:
    return cell.label


def run_cell(cell: Cell, args: argparse.Namespace,
             started: Callable[[subprocess.Popen], None] | None = None) -> dict:
    """Run ``cell`` unless it has finished; returns its ``result.json`` content.
    ``started``: called with the run's process once it has started (a submitit job stops it
    on preemption, :class:`fl_lightning.launchers.CellJob`)."""
    folder = cell.folder(args.runs)
    done = os.path.join(folder, "result.json")
    if os.path.isfile(done):
        return json.load(open(done))
    if args.report_only:
        return {"rc": None}
    os.makedirs(folder, exist_ok=True)
    cmd = cell_command(cell, args)
    rc, seconds = run_logged(cmd, folder, started)
    final = sorted(glob.glob(os.path.join(folder, "fl", "version_*", "final_metrics.json")))
    result: dict = {"rc": rc, "seconds": seconds, "cmd": cmd}
    if rc == 0 and final:
        result["final"] = json.load(open(final[-1]))
        json.dump(result, open(done, "w"), indent=2)
    label = cell.label
    acc = result.get("final", {}).get("test_acc")
    print(f"fl-lightning-grid: {label}: rc={rc} {seconds:.0f}s test_acc={acc}"
          + ("" if rc == 0 else f" (see {os.path.join(folder, 'log.txt')})"), flush=True)
    if rc != 0:
        print(f"fl-lightning-grid: {label}: {last_error_line(os.path.join(folder, 'log.txt'))}",
              flush=True)
    return result


def run_logged(cmd: list[str], folder: str,
               started: Callable[[subprocess.Popen], None] | None = None) -> tuple[int, float]:
    """Run ``cmd`` with its output appended to ``<folder>/log.txt`` after the command line;
    its exit status and wall seconds (``started``: as for :func:`run_cell`)."""
    start = time.time()
    with open(os.path.join(folder, "log.txt"), "a") as log:
        log.write("$ " + shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        if started is not None:
            started(proc)
        rc = proc.wait()
    return rc, time.time() - start


def last_error_line(log_path: str) -> str:
    """The line of a failed cell's ``log.txt`` that says why: the last ``error:`` line of the
    run (its one-line ``ConfigError``, or the last line of a traceback), else its last line."""
    try:
        with open(log_path, errors="replace") as fh:
            lines = [ln.rstrip() for ln in fh if ln.strip() and not ln.startswith("$ ")]
    except OSError:
        return f"no log at {log_path}"
    if not lines:
        return "the run printed nothing"
    for line in reversed(lines):
        if "error:" in line.lower() or line.startswith(("Traceback", "Killed")):
            return line.strip()
    return lines[-1].strip()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fl-lightning-grid",
        description="Run algorithm configs x settings x seeds and write the results table.",
    )
    p.add_argument("--algorithms", required=True,
                   help="comma-separated names in configs/algorithms or YAML paths")
    p.add_argument("--settings", required=True,
                   help="comma-separated DATASET:lda:ALPHA | DATASET:shard:S | DATASET:iid | "
                   "mnist:powerlaw | synthetic:ALPHA:BETA | synthetic_iid")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated integer seeds")
    p.add_argument("--stragglers", default=None,
                   help="comma-separated straggler shares, each a setting of its own "
                   "(--model.participation.straggler_ratio; e.g. 0,0.5,0.9)")
    p.add_argument("--base", default="mnist/fedavg_lda.yaml",
                   help="base config with the learning setup (the algorithm config goes on "
                   "top): a path, or a name in the repository's configs/ folder")
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--eval-every", type=int, default=1, help="rounds between test evaluations")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--runs", default="runs/grid", help="folder of the cells (resumable)")
    p.add_argument("--out", default=None,
                   help="prefix of the outputs: <out>.md, <out>.csv, <out>_<setting>.png "
                   "(default: <runs>/table)")
    launchers.add_arguments(p)
    p.add_argument("--extra", default="", help="more fl-lightning options for every cell")
    p.add_argument("--vectorize", default="none", choices=("none", "seeds", "numeric"),
                   help="train the cells that differ only in seed (seeds), or only in seed, "
                   "partition value, straggler share and numbers of their algorithm configs "
                   "(numeric), as replicas of one process (--replicas.*; docs/sweeps.md)")
    p.add_argument("--report-only", action="store_true",
                   help="write the tables from the finished cells, run nothing")
    return p


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    algorithms = [a for a in args.algorithms.split(",") if a]
    for a in algorithms:
        _algorithm_config(a)
    resolve_config(args.base, "--base")
    settings = [parse_setting(s) for s in args.settings.split(",") if s]
    check_datasets(settings)
    if args.stragglers is not None:
        levels = [v for v in args.stragglers.split(",") if v]
        for v in levels:
            try:
                ok = 0.0 <= float(v) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                _fail(f"--stragglers entry {v!r} is invalid: use shares in [0, 1], e.g. 0,0.5,0.9")
        settings = [Setting(s.dataset, s.partition, s.value, v) for s in settings for v in levels]
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        _fail(f"--seeds {args.seeds!r} is invalid: use comma-separated integers, e.g. 0,1,2")
    for name in ("rounds", "eval_every", "checkpoint_every"):
        if getattr(args, name) < 1:
            _fail(f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: use >= 1")
    problem = launchers.check_arguments(args)
    if problem is not None:
        _fail(problem)
    out = args.out or os.path.join(args.runs, "table")
    # seed-major order: every algorithm and setting gets its first seed before any second one
    cells = [Cell(a, s, seed) for seed in seeds for s in settings for a in algorithms]
    with grid_lock(args.runs, enabled=not args.report_only):
        results = launchers.run_cells(cells, args)
    names = [_algorithm_name(a) for a in algorithms]
    curves, finals = {}, {}
    for cell, result in zip(cells, results, strict=True):
        key = (_algorithm_name(cell.algorithm), cell.setting.slug, cell.seed)
        curve = read_curve(cell.folder(args.runs))
        if "final" in result:
            curves[key] = curve
            finals[key] = result["final"]["test_acc"]
        elif curve and args.report_only:  # unfinished: drawn, not tabulated
            curves[key] = curve
    rows = summarize({k: v for k, v in curves.items() if k in finals}, finals)
    write_tables(rows, names, settings, out, args.rounds, seeds)
    figures = plot_curves(curves, names, settings, out)
    print(f"fl-lightning-grid: wrote {out}.md, {out}.csv" +
          "".join(f", {f}" for f in figures))
    failed = [r for r in results if r.get("rc") not in (0, None)]
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
