"""Cross-device scale: seconds per round, peak RSS, checkpoint size and time, resume start-up.

Runs ``fl-lightning fit`` on MNIST with the 2NN (``configs/mnist/systems_2nn.yaml``, IID,
``E = 1``, ``B = 10``, no augmentation: the issue #27 setting) in a child process under an
address-space cap (``prlimit --as``), with a probe callback that records every round's wall
time, every checkpoint save's wall time and the start-up time (process start to the first
round). The parent reads the child's peak RSS (``wait4``'s ``ru_maxrss``), the checkpoint
sizes and the run folder's size. ``--resume`` then resumes from the last checkpoint for one
more round and reports the resumed process's start-up time and peak RSS.

``--code`` picks the checkout to run (e.g. the main branch's, for a before/after table); the
store's RAM budget (``--client_state_ram_mb``) is passed only when ``--ram-mb`` is given (the
option does not exist before the store moved to disk).

Example (one run at a time, one thread; the cap keeps a run from taking the machine):
    OMP_NUM_THREADS=1 python benchmarks/scale.py --data-dir ../shared/data \\
        --algorithm SCAFFOLD --clients 20000 --sample-ratio 0.05 --rounds 3 --resume \\
        --out runs/bench/scale_scaffold_20k.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl

REPO = Path(__file__).resolve().parents[1]
CAP = 12_000_000_000  # bytes of address space per run


class Probe(pl.Callback):
    """Writes ``{"startup_s", "rounds_s", "saves_s"}`` to ``<out>/probe.json`` at the end."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.rounds: list[float] = []
        self.saves: list[float] = []
        self.startup: float | None = None
        self._start = 0.0

    def setup(self, trainer, pl_module, stage) -> None:
        save = trainer.save_checkpoint

        def timed(*args, **kwargs):
            start = time.perf_counter()
            save(*args, **kwargs)
            self.saves.append(time.perf_counter() - start)

        trainer.save_checkpoint = timed

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.startup is None:
            self.startup = time.time() - float(os.environ["SCALE_T0"])
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rounds.append(time.perf_counter() - self._start)

    def teardown(self, trainer, pl_module, stage) -> None:  # after the last checkpoint
        Path(self.out, "probe.json").write_text(json.dumps(
            {"startup_s": self.startup, "rounds_s": self.rounds, "saves_s": self.saves}))


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fit(args, work: Path, extra: list[str], tag: str) -> dict:
    probe = work / tag
    probe.mkdir()
    cmd = ["prlimit", f"--as={args.cap}", sys.executable, "-m", "fl_lightning.cli", "fit",
           "--config", str(REPO / "configs/mnist/systems_2nn.yaml"),
           "--model.algorithm", args.algorithm, "--data.num_clients", str(args.clients),
           "--model.sample_ratio", str(args.sample_ratio), "--data.partition", "iid",
           "--model.local_epochs", "1", "--model.batch_size", "10", "--data.augment", "none",
           "--data.data_dir", str(Path(args.data_dir).resolve()),
           "--trainer.enable_progress_bar", "false", "--trainer.val_check_interval", "1000",
           "--trainer.callbacks+=scale.Probe", f"--trainer.callbacks.out={probe}", *extra]
    if args.ram_mb is not None:
        cmd += ["--client_state_ram_mb", str(args.ram_mb)]
    code = str(Path(args.code).resolve())
    env = {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{Path(__file__).parent}",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "SCALE_T0": repr(time.time())}
    with open(work / f"{tag}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    out = {"exit": os.waitstatus_to_exitcode(status), "peak_rss_mib": usage.ru_maxrss / 1024}
    if out["exit"] != 0:
        out["log_tail"] = (work / f"{tag}.log").read_text()[-1500:]
        return out
    out.update(json.loads((probe / "probe.json").read_text()))
    return out


WRITE = """
import sys, torch
torch.save({"state_dict": {"w": torch.zeros(199_210)}, "fl_config": "model: {}",
            "fl_algorithm_state": {"clients": {"clients": {
                c: {"c_i": {"w": torch.ones(199_210)}} for c in range(int(sys.argv[2]))}}}},
           sys.argv[1])
"""
CHECK = """
import sys, time, torch
start = time.perf_counter()
ckpt = torch.load(sys.argv[1], weights_only=True, map_location="cpu", mmap=sys.argv[2] == "mmap")
shapes = {k: tuple(v.shape) for k, v in ckpt["state_dict"].items()}
config = ckpt["fl_config"]
print(time.perf_counter() - start)
"""


def resume_check(work: Path, mib: int) -> dict:
    """The CLI's resume check on a checkpoint of ``mib`` MiB of client state (the layout of a
    checkpoint that copied the store): a full ``torch.load`` (as before) against
    ``torch.load(mmap=True)`` (now), each in a fresh process: seconds and peak RSS."""
    path = work / "big.ckpt"
    rows = mib * 2**20 // (4 * 199_210)
    # written by a child: a forked child's ru_maxrss starts at its parent's RSS
    subprocess.run([sys.executable, "-c", WRITE, str(path), str(rows)], check=True)
    out = {"checkpoint_mib": path.stat().st_size / 2**20}
    for how in ("full", "mmap"):
        proc = subprocess.Popen([sys.executable, "-c", CHECK, str(path), how],
                                stdout=subprocess.PIPE, text=True)
        text = proc.stdout.read()
        _, _, usage = os.wait4(proc.pid, 0)
        out[how] = {"seconds": float(text), "peak_rss_mib": usage.ru_maxrss / 1024}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared/data"))
    parser.add_argument("--algorithm", default="SCAFFOLD")
    parser.add_argument("--clients", type=int, default=20000)
    parser.add_argument("--sample-ratio", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ram-mb", type=float, default=None)
    parser.add_argument("--code", default=str(REPO), help="checkout whose fl_lightning runs")
    parser.add_argument("--cap", type=int, default=CAP, help="address-space cap (bytes)")
    parser.add_argument("--resume", action="store_true", help="then resume for one round")
    parser.add_argument("--resume-check-mib", type=int, default=0,
                        help="only time the resume check on a checkpoint of this size")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.resume_check_mib:
        with tempfile.TemporaryDirectory(prefix="scale_") as tmp:
            result = {"resume_check": resume_check(Path(tmp), args.resume_check_mib),
                      "load_avg": os.getloadavg()}
        print(json.dumps(result, indent=2))
        return
    if "." not in args.algorithm:
        args.algorithm = f"fl_lightning.algorithms.{args.algorithm}"
    result: dict = {"config": {k: v for k, v in vars(args).items() if k != "out"},
                    "load_avg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="scale_") as tmp:
        work = Path(tmp)
        result["fit"] = fit = _fit(args, work, ["--trainer.max_steps", str(args.rounds)], "fit")
        run = work / "lightning_logs/fl/version_0"
        ckpts = sorted((run / "checkpoints").glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if fit["exit"] == 0 and ckpts:
            fit["checkpoint_mib"] = ckpts[-1].stat().st_size / 2**20
            fit["run_folder_mib"] = _size(run) / 2**20
            if (run / "client_state").is_dir():
                fit["client_state_mib"] = _size(run / "client_state") / 2**20
            if args.resume:
                result["resume"] = _fit(args, work, [
                    "--trainer.max_steps", str(args.rounds + 1), "--ckpt_path", str(ckpts[-1])
                ], "resume")
    result["load_avg_after"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
