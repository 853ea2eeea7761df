"""How ``fl-lightning-grid`` runs its cells: local processes, or jobs through submitit.

- ``--launcher local`` (default): ``--jobs N`` cells at a time, each an ``fl-lightning fit``
  subprocess of the grid (:func:`run_local`).
- ``--launcher submitit``: every cell that has not finished (with ``--vectorize``: every
  group of unfinished cells trained as replicas of one process) becomes one job
  (:class:`CellJob`) submitted through `submitit <https://github.com/facebookincubator/submitit>`_
  (``pip install 'fl-lightning[cluster]'``): on SLURM (``--submitit-executor slurm``; ``auto``
  picks SLURM where ``sbatch`` exists, else local processes) or through submitit's
  LocalExecutor (``local``, jobs as local processes: how it is tested). The grid waits for
  every job, then writes the same tables and figures. Options: ``--slurm-partition``,
  ``--slurm-time`` (minutes per job), ``--slurm-gpus-per-job``, ``--slurm-cpus-per-job``,
  ``--submitit-folder`` (submitit's logs and pickles, default ``<runs>/.submitit``).

Resumable either way: a finished cell (``result.json``) is not run or submitted again, and an
interrupted one resumes from its newest checkpoint (the cell command adds ``--ckpt_path``).
A job runs the cell's command as a subprocess; when SLURM preempts it or its time limit is
near, submitit signals the job (USR2) and calls :meth:`CellJob.checkpoint`, which SIGTERMs the
run (it stops at the round boundary with ``preempted-round=<r>.ckpt``) and requeues the job,
which resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["CellJob", "add_arguments", "check_arguments", "run_cells", "run_local",
           "run_submitit"]

EXECUTORS = ("local", "slurm", "auto")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The launcher options of ``fl-lightning-grid``."""
    p.add_argument("--launcher", default="local", choices=("local", "submitit"),
                   help="local: --jobs cells at a time here; submitit: one job per cell, or "
                   "per vectorized group (SLURM, or submitit's local executor)")
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time (local)")
    p.add_argument("--submitit-executor", default="auto", choices=EXECUTORS,
                   help="submitit: slurm, local (processes here) or auto (slurm if sbatch "
                   "exists)")
    p.add_argument("--submitit-folder", default=None,
                   help="submitit's job folder (default: <runs>/.submitit)")
    p.add_argument("--slurm-partition", default=None, help="SLURM partition of the jobs")
    p.add_argument("--slurm-time", type=int, default=60, help="minutes per job (time limit)")
    p.add_argument("--slurm-gpus-per-job", type=int, default=0, help="GPUs per job")
    p.add_argument("--slurm-cpus-per-job", type=int, default=1, help="CPUs per job")


def submitit_installed() -> bool:
    return importlib.util.find_spec("submitit") is not None


def check_arguments(args: argparse.Namespace) -> str | None:
    """The one-line problem with the launcher options, or ``None``."""
    for name, low in (("jobs", 1), ("slurm_time", 1), ("slurm_gpus_per_job", 0),
                      ("slurm_cpus_per_job", 1)):
        if getattr(args, name) < low:
            return f"--{name.replace('_', '-')} {getattr(args, name)} is invalid: use >= {low}"
    if args.launcher == "submitit" and not submitit_installed():
        return ("--launcher submitit needs submitit, which is not installed: pip install "
                "'fl-lightning[cluster]' (or pip install submitit)")
    if args.launcher == "submitit" and args.submitit_executor == "slurm" and (
        shutil.which("sbatch") is None
    ):
        return ("--submitit-executor slurm needs SLURM's sbatch, which is not on PATH: run "
                "the grid on the cluster's login node, or use --submitit-executor local")
    return None


def run_cells(cells: Sequence[Any], args: argparse.Namespace) -> list[dict]:
    """Run ``cells`` with the chosen launcher; their results in the same order."""
    if args.launcher == "submitit":
        return run_submitit(cells, args)
    return run_local(cells, args)


def run_local(cells: Sequence[Any], args: argparse.Namespace) -> list[dict]:
    """``--jobs`` processes at a time, each a subprocess of this process: one per cell, or
    one per group of cells trained as replicas (``--vectorize``, :mod:`fl_lightning.vectorize`)."""
    from fl_lightning.vectorize import run_group, vector_groups

    groups = vector_groups(cells, getattr(args, "vectorize", "none"), args.extra)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        got = list(pool.map(lambda g: run_group(g, args), groups))
    by_cell: dict[Any, dict] = {}
    for group, results in zip(groups, got, strict=True):
        by_cell.update(zip(group, results, strict=True))
    return [by_cell[c] for c in cells]


class CellJob:
    """One submitit job: a grid cell, or a vectorized group of cells trained as the replicas
    of one process (``--vectorize``). ``job()`` runs them
    (:func:`fl_lightning.vectorize.run_group`) and returns their results, in order; on
    preemption or timeout submitit calls :meth:`checkpoint`."""

    def __init__(self, cells: Any, args: argparse.Namespace) -> None:
        self.cells = list(cells) if isinstance(cells, (list, tuple)) else [cells]
        self.args = args
        self._proc: subprocess.Popen | None = None

    def __call__(self) -> list[dict]:
        from fl_lightning.vectorize import run_group

        result: list[dict] = []

        def run() -> None:
            result.extend(run_group(self.cells, self.args, started=self._started))

        # the run waits in a thread: the main thread stays free for submitit's signal handler
        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        while worker.is_alive():
            worker.join(0.5)
        return result

    def _started(self, proc: subprocess.Popen) -> None:
        self._proc = proc

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Stop the run at its round boundary (SIGTERM: ``preempted-round=<r>.ckpt``, every
        replica of a group in it), then requeue the job; the requeued job resumes from the
        newest checkpoint (of the cell, or of the group's folder)."""
        from submitit.helpers import DelayedSubmission

        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait()
        return DelayedSubmission(CellJob(self.cells, self.args))

    def __getstate__(self) -> dict:
        return {"cells": self.cells, "args": self.args, "_proc": None}


def job_name(cells: Sequence[Any], runs: str) -> str:
    """The job's name in ``squeue``: ``fl-<setting>-<algorithm>-seed-<s>`` for a cell,
    ``fl-<group folder>`` for a vectorized group."""
    from fl_lightning.grid import cell_label
    from fl_lightning.vectorize import group_folder

    if len(cells) == 1:
        return f"fl-{cell_label(cells[0]).replace(' ', '-')}"
    return f"fl-{os.path.basename(group_folder(cells, runs))}"


def _executor(args: argparse.Namespace) -> Any:
    import submitit

    folder = args.submitit_folder or os.path.join(args.runs, ".submitit")
    cluster = None if args.submitit_executor == "auto" else args.submitit_executor
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    params: dict[str, Any] = {
        "timeout_min": args.slurm_time, "gpus_per_node": args.slurm_gpus_per_job,
        "cpus_per_task": args.slurm_cpus_per_job, "nodes": 1, "tasks_per_node": 1,
    }
    if executor.cluster == "slurm":
        if args.slurm_partition:
            params["slurm_partition"] = args.slurm_partition
        params["slurm_signal_delay_s"] = 120  # USR2 two minutes before the time limit
    executor.update_parameters(**params)
    return executor


def run_submitit(cells: Sequence[Any], args: argparse.Namespace) -> list[dict]:
    """One submitit job per unfinished cell, or per vectorized group of unfinished cells
    (``--vectorize``: :func:`fl_lightning.vectorize.vector_groups`; a partly finished group
    submits its unfinished cells only); waits for all of them."""
    from fl_lightning.grid import cell_label
    from fl_lightning.vectorize import pending_cells, run_group, vector_groups

    by_cell: dict[Any, dict] = {}
    todo = []
    for group in vector_groups(cells, getattr(args, "vectorize", "none"), args.extra):
        pending = [] if args.report_only else pending_cells(group, args)
        finished = [c for c in group if c not in pending]
        by_cell.update(zip(finished, run_group(finished, args), strict=True))  # reads only
        if pending:
            todo.append(pending)
    if todo:
        executor = _executor(args)
        jobs = []
        for group in todo:
            executor.update_parameters(name=job_name(group, args.runs))
            jobs.append((group, executor.submit(CellJob(group, args))))
        print(f"fl-lightning-grid: submitted {len(jobs)} job(s) through submitit "
              f"({executor.cluster}) for {sum(len(g) for g in todo)} cell(s); logs in "
              f"{executor.folder}", flush=True)
        for group, job in jobs:
            try:
                got = job.result()
            except Exception as err:  # noqa: BLE001 - a failed job is reported, not raised
                line = " ".join(str(err).split())[-300:]
                print(f"fl-lightning-grid: {', '.join(cell_label(c) for c in group)}: job "
                      f"{job.job_id} failed: {line}", flush=True)
                got = [{"rc": 1, "job": job.job_id} for _ in group]
            else:
                for cell, result in zip(group, got, strict=True):
                    acc = result.get("final", {}).get("test_acc")
                    print(f"fl-lightning-grid: {cell_label(cell)}: job {job.job_id} "
                          f"rc={result.get('rc')} test_acc={acc}", flush=True)
            by_cell.update(zip(group, got, strict=True))
    return [by_cell.get(c, {"rc": None}) for c in cells]
