"""No process outlives the launcher: how :class:`~fl_lightning.flower.federation.LocalFederation`
starts and stops Flower's processes.

Flower's own processes start others the launcher never sees: a SuperLink starts a
``flower-superexec`` (in a session of its own), which starts one ``flwr-serverapp`` per run; a
SuperNode starts a ``flower-superexec``, which starts one ``flwr-clientapp`` per message. When
their parent dies they are handed to ``init``, so neither a process group nor the launcher's
process tree reaches them any more. Three mechanisms together stop every one of them:

1. **Process groups and the parent-death signal.** Each process the launcher starts leads a
   process group of its own (``start_new_session``) and, on Linux, gets
   ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` before it runs (``preexec_fn`` through ``ctypes``): the
   kernel kills it the moment the launcher dies, however it died (``SIGKILL`` included).
2. **A tag and a sweep.** Every process started gets ``FL_LIGHTNING_FEDERATION=<token>`` in its
   environment, which Flower's processes pass on to those they start. :meth:`ProcessGuard.sweep`
   finds every live process carrying the token in ``/proc/<pid>/environ`` (wherever it was
   re-parented) and stops it; :meth:`ProcessGuard.stop` runs it after stopping the process
   groups.
3. **A watchdog.** A tiny process (standard library only) holds the read end of a pipe whose
   write end only the launcher has; when the launcher exits, normally or killed, the pipe
   closes and the watchdog kills every process with the token, then exits.

Only processes of this user that carry this run's token are ever signalled.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

__all__ = ["TOKEN_ENV", "ProcessGuard", "tagged", "terminate"]

TOKEN_ENV = "FL_LIGHTNING_FEDERATION"
PR_SET_PDEATHSIG = 1  # linux/prctl.h

WATCHDOG = r"""
import os, signal, sys, time
needle = sys.argv[1].encode()  # TOKEN_ENV=token, as in /proc/<pid>/environ
sys.stdin.buffer.read()  # returns once the launcher's end of the pipe is closed
def tagged():
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                with open(f"/proc/{entry}/environ", "rb") as fh:
                    if needle in fh.read().split(b"\0"):
                        found.append(int(entry))
            except OSError:
                pass
    return found
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    pids = tagged()
    if not pids:
        break
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.2)
"""


def _stat(pid: int | str) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, ppid, ...), or
    ``None`` where the process is gone or ``/proc`` unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[int]:
    """The live descendants of process ``pid``, read from ``/proc`` (empty where there is
    none)."""
    children: dict[int, list[int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        fields = _stat(entry) if entry.isdigit() else None
        if fields is not None and len(fields) > 1 and fields[1].isdigit():
            children.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        (os.killpg if group else os.kill)(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_tree(pid: int, sig: int) -> list[int]:
    """Send ``sig`` to the process group led by ``pid`` and to every descendant of ``pid``
    (those in sessions of their own included); returns the descendants."""
    tree = _descendants(pid)
    _signal(pid, sig, group=True)
    for child in tree:
        _signal(child, sig, group=False)
    return tree


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    if fields is not None:
        return fields[0] != "Z"  # a zombie has exited
    try:  # no /proc entry to read: ask the kernel
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def tagged(token: str) -> list[int]:
    """The live processes (zombies excluded) whose environment holds ``TOKEN_ENV=token``."""
    needle = f"{TOKEN_ENV}={token}".encode()
    found = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return []
    for entry in entries:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                hit = needle in fh.read().split(b"\0")
        except OSError:
            continue
        if hit and _alive(int(entry)):
            found.append(int(entry))
    return found


def terminate(procs: list[subprocess.Popen], grace: float = 15.0) -> None:
    """Stop ``procs`` (each the leader of its own process group) and every process they
    started: SIGTERM to all of them, SIGKILL to what is left after ``grace`` seconds."""
    procs = [p for p in procs if p is not None]
    # an exited leader's children were handed to init: it has no descendants left to read
    tree = [d for p in procs if p.poll() is None for d in _signal_tree(p.pid, signal.SIGTERM)]
    late = [d for p in procs for d in _descendants(p.pid) if d not in tree]  # started meanwhile
    for pid in late:
        _signal(pid, signal.SIGTERM, group=False)
    tree += late
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(p.pid, signal.SIGKILL, group=True)
            p.wait(timeout=grace)
    while any(_alive(pid) for pid in tree) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in tree:
        if _alive(pid):
            _signal(pid, signal.SIGKILL, group=False)


def _die_with_parent(parent: int):
    """The ``preexec_fn`` of every child: the kernel sends it SIGKILL when the launcher dies
    (Linux ``prctl(PR_SET_PDEATHSIG)``; strictly, when the launcher's thread that started it
    ends: start a federation from a thread that outlives it, e.g. the main thread); a launcher
    that died before that exits it at once.
    ``None`` where the C library has no ``prctl`` (not Linux): then the watchdog alone
    stops the processes."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)

    return preexec


class ProcessGuard:
    """Starts processes that cannot outlive this one (see the module's text).

    Example (not run here: it starts processes)::

        guard = ProcessGuard()
        proc = guard.spawn(["flower-superlink", "--insecure"], dict(os.environ), "link.log")
        ...
        guard.stop([proc])
    """

    def __init__(self) -> None:
        self.token = uuid.uuid4().hex
        self._preexec = _die_with_parent(os.getpid())
        self._watchdog: subprocess.Popen | None = None

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """``base`` with this guard's token: every process started with it (and every process
        those start) is stopped with the guard."""
        return {**base, TOKEN_ENV: self.token}

    def _watch(self) -> None:
        if self._watchdog is None and sys.platform.startswith("linux"):
            env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
            self._watchdog = subprocess.Popen(
                [sys.executable, "-S", "-c", WATCHDOG, f"{TOKEN_ENV}={self.token}"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                env=env, start_new_session=True,
            )

    def spawn(self, args: list[str], env: dict[str, str], log: Any,
              cwd: str | os.PathLike | None = None) -> subprocess.Popen:
        """Start ``args`` as the leader of a new process group, tagged, with the parent-death
        signal; its output goes to ``log`` (an open file, or ``None``: this process's)."""
        self._watch()
        return subprocess.Popen(
            args, env=self.env(env), stdout=log, stderr=subprocess.STDOUT if log else None,
            cwd=cwd, start_new_session=True, preexec_fn=self._preexec,
        )

    def sweep(self, grace: float = 5.0) -> list[int]:
        """Stop every live process with the token (SIGTERM, SIGKILL after ``grace`` s);
        returns those it found."""
        found = tagged(self.token)
        for pid in found:
            _signal(pid, signal.SIGTERM, group=False)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(p) for p in found):
            time.sleep(0.1)
        for pid in tagged(self.token):
            _signal(pid, signal.SIGKILL, group=False)
        return found

    def stop(self, procs: list[subprocess.Popen | None], grace: float = 15.0) -> None:
        """Stop ``procs`` with their process groups and descendants, then every other process
        with the token, then the watchdog."""
        terminate([p for p in procs if p is not None], grace)
        self.sweep()
        if self._watchdog is not None:
            self._watchdog.stdin.close()
            try:
                self._watchdog.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                self._watchdog.wait()
            self._watchdog = None

