"""DDP faults: a lost rank ends the run with one line; a stop request ends every rank in time.

Under ``--trainer.strategy ddp`` this process is rank 0 and Lightning starts the other ranks as
its child processes; they meet in gloo collectives (the round's all-reduce or all-gather, the
per-round stop decision, validation's metric sync). What can go wrong, and what happens here:

- **A rank dies** (SIGKILL, the OOM killer, a crash). The other ranks' next collective fails
  (gloo: "Connection reset by peer"); Lightning would print an 84-line traceback naming neither
  the dead rank nor a checkpoint, and its child observer SIGKILLs rank 0 five seconds after a
  child died, so a rank 0 busy training its share said nothing at all. Here every surviving
  rank stops with one line (exit status 1): which rank was lost and how (rank 0 sees its
  children's exit status), after how many rounds, and the newest checkpoint with the resume
  command. Rank 0 stops at its next collective, or :data:`LOST_GRACE` seconds after the child
  died if it is still busy; a rank > 0 stops at its next collective (at most one round later).
- **A rank hangs** (stopped, deadlocked, unreachable machine): the others wait in a collective
  until gloo's timeout, ``--ddp_timeout`` seconds (default 1800, PyTorch's default for gloo),
  then stop with the same line ("did not answer"). Rank 0 SIGKILLs its hung children.
- **SIGTERM reaches one rank only.** Lightning's SIGTERM handler broadcasts from rank 0 inside
  the handler, a collective the other ranks never join: both hung until the timeout. Here the
  handler only records the signal, and the ranks agree on the stop in the per-round all-reduce
  (:func:`agreed_stop`, one small all-reduce as before): every rank stops after the same round
  and rank 0 writes ``preempted-round=<r>.ckpt``.
- **A rank stuck in a collective** never runs a Python signal handler (the main thread waits in
  gloo's C++ code). The signal is also written to a wake-up socket (``signal.set_wakeup_fd``)
  read by a thread: when the run has not stopped ``--ddp_stop_timeout`` seconds (default 120)
  after SIGTERM or Ctrl-C reached this rank (or after the ranks agreed to stop), the thread
  prints one line, SIGKILLs rank 0's children and ends the process (exit 143, or 130 for
  Ctrl-C). Any other rank then stops as a survivor of a lost rank.

In one process only the SIGTERM flag applies: Lightning's own flag made its loop end the run
after an evaluation with exit status 0, no checkpoint and no message when the SIGTERM came
during the evaluation; now the run stops at the next round boundary with its checkpoint.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from fl_lightning import validate

__all__ = [
    "LOST_GRACE",
    "RankLost",
    "add_arguments",
    "agreed_stop",
    "check_options",
    "newest_checkpoint",
    "with_timeout",
    "watch_ranks",
]

#: seconds rank 0 leaves its main thread to report a child that died before it reports itself
LOST_GRACE = 10.0
_POLL = 0.25
#: what a collective whose peer is gone or silent raises (gloo's transport errors)
_PEER_FAILURE = re.compile(
    r"gloo|[Cc]onnection (reset|closed|refused)|[Bb]roken pipe|[Tt]imed out|[Ss]ocket [Tt]imeout"
)
_TIMED_OUT = re.compile(r"[Tt]imed out|[Ss]ocket [Tt]imeout")
_ROUND = re.compile(r"round=(\d+)")


class RankLost(RuntimeError):
    """A DDP rank was lost or did not answer; the message is the one line to print."""


def add_arguments(parser: Any) -> None:
    """``--ddp_timeout`` and ``--ddp_stop_timeout`` (the command line's options)."""
    parser.add_argument("--ddp_timeout", type=float, default=1800.0,
                        help="DDP wait limit, s.")
    parser.add_argument("--ddp_stop_timeout", type=float, default=120.0,
                        help="DDP stop deadline, s.")


def check_options(config: Any) -> None:
    """``--ddp_timeout`` and ``--ddp_stop_timeout`` are positive numbers of seconds."""
    validate.positive(config.get("ddp_timeout"), "--ddp_timeout",
                      "seconds a collective waits for the other ranks; PyTorch's default is 1800")
    validate.positive(config.get("ddp_stop_timeout"), "--ddp_stop_timeout",
                      "seconds from SIGTERM/Ctrl-C to a forced stop; e.g. 120")


def with_timeout(strategy: Any, seconds: float) -> Any:
    """A registered DDP strategy name (``ddp``, ``ddp_spawn``, ...) as that strategy with
    gloo's timeout ``seconds``; anything else unchanged (a strategy object keeps its own)."""
    from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

    if not isinstance(strategy, str) or strategy not in StrategyRegistry:
        return strategy
    entry = StrategyRegistry[strategy]
    if not issubclass(entry["strategy"], DDPStrategy):
        return strategy
    return entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=seconds))


def newest_checkpoint(trainer: Any) -> str | None:
    """The newest ``.ckpt`` in the trainer's checkpoint folders (highest ``round=<r>``, then
    the newest file), as an absolute path; ``None`` if there is none. Reads no collective."""
    found: list[tuple[int, float, str]] = []
    for callback in getattr(trainer, "checkpoint_callbacks", []):
        folder = getattr(callback, "dirpath", None)
        if not folder or not os.path.isdir(folder):
            continue
        for path in Path(folder).glob("*.ckpt"):
            match = _ROUND.search(path.name)
            try:
                found.append((int(match.group(1)) if match else -1, path.stat().st_mtime,
                              str(path.resolve())))
            except OSError:  # removed meanwhile (keep_last)
                continue
    return max(found)[2] if found else None


def _resume_hint(trainer: Any) -> str:
    path = newest_checkpoint(trainer)
    if path is not None:
        return f"newest checkpoint {path}: resume with the same command plus --ckpt_path {path}"
    if not getattr(trainer, "checkpoint_callbacks", []):
        return "checkpointing is off, so there is no checkpoint: rerun the same command"
    return "no checkpoint yet: rerun the same command"


def _ended(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def agreed_stop(trainer: Any, sigterm: bool, sigint: bool) -> tuple[str, tuple[int, ...]] | None:
    """Whether to stop at this round boundary, the same answer on every rank.

    ``sigterm``/``sigint``: whether this rank received SIGTERM (Lightning's flag; under
    :func:`watch_ranks` its own, which Lightning's loops do not see) / a first Ctrl-C. Under
    DDP one all-reduce of a per-rank code tells every rank which ranks got which signal (it
    replaces the boolean all-reduce that was there before: no extra collective). Returns
    ``None`` (go on) or ``(signal, ranks)``: ``"SIGINT"`` if only Ctrl-C was received, else
    ``"SIGTERM"``, and the ranks that received it when not all did (``()`` in one process).
    """
    world = trainer.world_size
    sigterm = sigterm or (_current is not None and _current.sigterm)
    code = 2 if sigint else 1 if sigterm else 0
    if world == 1:
        return None if code == 0 else ("SIGINT" if sigint else "SIGTERM", ())
    codes = torch.zeros(world, dtype=torch.int32, device=trainer.strategy.root_device)
    codes[trainer.global_rank] = code
    codes = trainer.strategy.reduce(codes, reduce_op="sum").tolist()
    if not any(codes):
        return None
    name = "SIGTERM" if 1 in codes else "SIGINT"
    got = tuple(r for r, c in enumerate(codes) if c)
    if _current is not None:
        _current.stopping()
    return name, got if len(got) < world else ()


# ---------------------------------------------------------------------------- the watch
class _Watch:
    """One DDP fit of this process: its children (rank 0), the signal and child watchers."""

    def __init__(self, trainer: Any, stop_timeout: float, timeout: float) -> None:
        self.trainer = trainer
        self.rank = int(trainer.global_rank)
        self.world = int(trainer.world_size)
        self.stop_timeout = float(stop_timeout)
        self.timeout = float(timeout)
        self.ppid = os.getppid()
        self.procs: Sequence[Any] = []  # rank 0: Lightning's child processes, rank i + 1
        self.finished = threading.Event()
        self.signal_at: float | None = None
        self.signal_name = "SIGTERM"
        self.sigterm = False  # this rank received SIGTERM (see _quiet_sigterm)
        self._claim_lock = threading.Lock()
        self._claimed = False

    # -- who says it: once per process
    def claim(self) -> bool:
        with self._claim_lock:
            first, self._claimed = not self._claimed, True
            return first

    def stopping(self) -> None:
        """The ranks agreed to stop: the stop must now end within ``stop_timeout``."""
        if self.signal_at is None:
            self.signal_at = time.monotonic()

    def kill_children(self, grace: float = 0.0) -> None:
        """SIGKILL rank 0's children that have not ended within ``grace`` seconds."""
        deadline = time.monotonic() + grace
        for proc in self.procs:
            try:
                proc.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _end(self, message: str, status: int) -> None:
        """From a watcher thread: print ``message``, SIGKILL the children, end the process."""
        if not self.claim():
            return
        print(f"fl-lightning: error: {message}", file=sys.stderr, flush=True)
        self.kill_children()
        sys.stdout.flush()
        os._exit(status)

    # -- the lost rank
    def lost(self, wait: float = 2.0) -> tuple[int | None, str]:
        """The lost rank and how it ended (``None``: not known) as far as this rank can see
        within ``wait`` seconds (a dying process takes a moment to be reaped): rank 0 its
        children's exit status, another rank that its parent (rank 0, the launcher) is gone;
        with two ranks, the other one."""
        deadline = time.monotonic() + wait
        while True:
            for i, proc in enumerate(self.procs):
                if proc.poll() is not None and proc.returncode != 0:
                    return i + 1, f"pid {proc.pid}, {_ended(proc.returncode)}"
            if self.rank > 0 and os.getppid() != self.ppid:
                return 0, "its process is gone"
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        return (1 - self.rank, "") if self.world == 2 else (None, "")

    def lost_message(self, error: str = "", wait: float = 2.0) -> str:
        """The one line of a survivor; ``error``: the collective's error, if any; ``wait``:
        how long to look for the lost rank's end (see :meth:`lost`)."""
        timed_out = bool(_TIMED_OUT.search(error))
        rank, how = self.lost(0.0 if timed_out else wait)
        who = f"DDP rank {rank}" if rank is not None else "another DDP rank"
        if "clients joined" in error:  # the process group's start
            what = f"{who} did not start within --ddp_timeout={self.timeout:g} s"
        elif timed_out:
            what = (f"{who} did not answer a collective within --ddp_timeout={self.timeout:g} s "
                    "(hung or unreachable)")
        else:
            what = f"{who} was lost" + (f" ({how})" if how else "")
        rounds = int(getattr(self.trainer, "global_step", 0))
        return f"{what} after round {rounds}; the run stopped; {_resume_hint(self.trainer)}"

    # -- the watcher threads
    def observe(self, procs: Sequence[Any]) -> None:
        """Rank 0 (in place of Lightning's child observer): report a child that died."""
        self.procs = procs
        threading.Thread(target=self._observe, name="fl-ddp-observer", daemon=True).start()

    def _observe(self) -> None:
        while not self.finished.wait(_POLL):
            codes = [proc.poll() for proc in self.procs]
            if all(code == 0 for code in codes):
                return
            if any(code not in (None, 0) for code in codes) and self.signal_at is None:
                # the main thread reports it at its next collective; if it is busy, we do
                if not self.finished.wait(LOST_GRACE):
                    self._end(self.lost_message(), 1)
                return

    def watch_signals(self) -> socket.socket | None:
        """Have SIGTERM/SIGINT written to a socket that a thread reads (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            return None
        read, write = socket.socketpair()
        read.setblocking(False)
        write.setblocking(False)
        self._previous_fd = signal.set_wakeup_fd(write.fileno(), warn_on_full_buffer=False)
        self._sockets = (read, write)
        threading.Thread(target=self._watch_signals, args=(read,), name="fl-ddp-stop",
                         daemon=True).start()
        return read

    def _watch_signals(self, read: socket.socket) -> None:
        while not self.finished.is_set():
            ready, _, _ = select.select([read], [], [], _POLL)
            if ready:
                try:
                    data = read.recv(64)
                except OSError:
                    data = b""
                for signum in data:
                    if signum in (signal.SIGTERM, signal.SIGINT) and self.signal_at is None:
                        self.signal_at = time.monotonic()
                        self.signal_name = signal.Signals(signum).name
            if self.signal_at is not None and not self.finished.is_set() and (
                time.monotonic() - self.signal_at > self.stop_timeout
            ):
                by = "Ctrl-C (SIGINT)" if self.signal_name == "SIGINT" else self.signal_name
                self._end(
                    f"{by}: the run did not reach a round boundary within --ddp_stop_timeout="
                    f"{self.stop_timeout:g} s (a rank is stuck in a collective, or a round "
                    f"takes longer); stopped after round {int(self.trainer.global_step)} "
                    f"without a checkpoint of the round in flight; {_resume_hint(self.trainer)}",
                    130 if self.signal_name == "SIGINT" else 143,
                )
                return

    def close(self) -> None:
        self.finished.set()
        sockets = getattr(self, "_sockets", None)
        if sockets is not None:
            signal.set_wakeup_fd(self._previous_fd)
            for s in sockets:
                s.close()


_current: _Watch | None = None


def _quiet_sigterm(watch: _Watch) -> Any:
    def notify(signum: int, frame: Any) -> None:
        # No collective inside a signal handler, and not Lightning's ``received_sigterm``: its
        # loops act on it on this rank alone (a SIGTERMException after validation) while the
        # other ranks go on into the next collective. :func:`agreed_stop` reads this flag.
        watch.sigterm = True

    return notify


@contextmanager
def watch_ranks(trainer: Any, stop_timeout: float = 120.0,
                timeout: float = 1800.0) -> Iterator[None]:
    """Run a trainer call (``fit``, ``validate``, ``test``) with the DDP fault handling of this
    module. A collective's failure leaves the block as :class:`RankLost` with the one line to
    print (rank 0's children SIGKILLed first). In one process only SIGTERM is changed: it sets
    the flag :func:`agreed_stop` reads instead of Lightning's ``received_sigterm``, on which
    Lightning's loop ends the run after an evaluation with a bare ``SIGTERMException``: exit
    status 0, no checkpoint, no message (a SIGTERM during evaluation, e.g. a preempted grid
    job)."""
    global _current
    watch = _Watch(trainer, stop_timeout, timeout)
    connector = getattr(trainer, "_signal_connector", None)
    if connector is not None:
        connector._sigterm_notifier_fn = _quiet_sigterm(watch)
    _current = watch
    if watch.world <= 1:  # one process: only the SIGTERM flag (a SIGTERM during evaluation)
        try:
            yield
        finally:
            _current = None
        return
    from lightning.pytorch.strategies.launchers import subprocess_script as launchers

    observer = getattr(launchers, "_launch_process_observer", None)
    if observer is not None:
        launchers._launch_process_observer = watch.observe
    watch.watch_signals()
    try:
        yield
    except BaseException as err:
        if isinstance(err, RuntimeError) and not isinstance(err, RankLost) and (
            _PEER_FAILURE.search(str(err))
        ):
            if not watch.claim():  # a watcher thread is ending the process with its own line
                time.sleep(LOST_GRACE)
            message = watch.lost_message(str(err))
            watch.kill_children()
            raise RankLost(message) from None
        watch.kill_children(LOST_GRACE)  # a stop or an error: no rank outlives rank 0
        raise
    finally:
        watch.close()
        _current = None
        if observer is not None:
            launchers._launch_process_observer = observer
