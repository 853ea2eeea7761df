"""A real Flower federation on this machine: one SuperLink and N SuperNodes on 127.0.0.1.

:class:`LocalFederation` starts Flower's own executables (``flower-superlink``,
``flower-supernode``) as separate processes on free local ports, each SuperNode with its own
``FLWR_HOME`` and ``--node-config "partition-id=K num-partitions=N"``, and submits runs with
Flower's ``flwr run``. Every process it starts is stopped by :meth:`stop` (also on exit of a
``with`` block). ``python -m fl_lightning.flower`` is its command line.
"""

from __future__ import annotations

import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["LocalFederation", "free_port", "terminate"]

HOST = "127.0.0.1"
CONNECTION = "fl-lightning-local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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
    none). Flower's SuperLink and SuperNodes start their ``flower-superexec`` in a session of
    its own, so a signal to their process group does not reach it or the apps it starts."""
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


def _source_root() -> str | None:
    """The folder holding the ``fl_lightning`` package this process imported, where a fresh
    interpreter would not find that same package on its own (a source checkout run from its
    folder or through ``PYTHONPATH``, or an editable install of another checkout); ``None``
    for an installed package (its site-packages folder is on every interpreter's path)."""
    import fl_lightning

    root = str(Path(fl_lightning.__file__).resolve().parents[1])
    installed = {str(Path(p).resolve()) for p in site.getsitepackages()}
    if hasattr(site, "getusersitepackages"):
        installed.add(str(Path(site.getusersitepackages()).resolve()))
    return None if root in installed else root


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _executable(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(
            f"{name} was not found next to {sys.executable} or on PATH: install the extra "
            "with pip install -e \".[flower]\""
        )
    return found


class LocalFederation:
    """A SuperLink and ``num_supernodes`` SuperNodes on 127.0.0.1.

    Args:
        num_supernodes: how many SuperNodes; node ``K`` holds partition ``K``.
        workdir: where the Flower homes and the logs go (a new temporary folder if ``None``).
        data_dir: passed to every SuperNode as ``--node-config data-dir=...`` (optional).
        start_timeout: seconds to wait for the SuperLink's port.
        threads: PyTorch's intra-op thread count in every process it starts (their
            ``OMP_NUM_THREADS``, and each SuperNode's ``--node-config threads=...``); ``None``
            leaves both to the environment. The weights equal a simulation's bit for bit only
            when the simulation runs with the same count (``torch.set_num_threads``): CPU
            kernels split their reductions by thread.

    Example (not run here: it starts processes)::

        with LocalFederation(3) as fed:
            fed.run("flower_app", {"rounds": 5})
    """

    def __init__(
        self, num_supernodes: int, workdir: str | os.PathLike | None = None,
        data_dir: str | None = None, start_timeout: float = 60.0, threads: int | None = 1,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes={num_supernodes} must be >= 1")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"threads={threads!r} must be an integer >= 1 or None")
        self.threads = threads
        self.num_supernodes = num_supernodes
        # absolute: every process runs in it, and FLWR_HOME is read relative to a process's cwd
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fl-lightning-flower-")).absolute()
        self.data_dir = data_dir
        self.start_timeout = start_timeout
        self.port: int | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []
        self._logs: list[Any] = []
        self._runs: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ processes
    def _env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(home)
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        source = _source_root()
        if source is not None:  # the apps run the fl_lightning this process runs
            env["PYTHONPATH"] = os.pathsep.join(
                [source, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
            )
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = str(self.threads)
        # a federation on 127.0.0.1 talks to nothing else: no telemetry, no update check
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
        env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
        return env

    def _spawn(self, args: list[str], home: Path, log_name: str) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / log_name, "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        return subprocess.Popen(
            args, env=self._env(home), stdout=log, stderr=subprocess.STDOUT,
            cwd=self.workdir, start_new_session=True,
        )

    def start(self) -> LocalFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.superlink = self._spawn(
            [_executable("flower-superlink"), "--insecure",
             "--disable-runtime-dependency-installation", "--host", HOST,
             "--port", str(self.port)],
            self.workdir / "home-superlink", "superlink.log",
        )
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: see {self.workdir}/superlink.log")
            try:
                socket.create_connection((HOST, self.port), timeout=1.0).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the SuperLink did not listen on {HOST}:{self.port} within "
                        f"{self.start_timeout:g} s; see {self.workdir}/superlink.log"
                    ) from None
                time.sleep(0.2)
        for k in range(self.num_supernodes):
            node_config = f"partition-id={k} num-partitions={self.num_supernodes}"
            if self.data_dir:
                node_config += f' data-dir="{self.data_dir}"'
            if self.threads is not None:
                node_config += f" threads={self.threads}"
            self.supernodes.append(self._spawn(
                [_executable("flower-supernode"), "--insecure", "--superlink",
                 f"{HOST}:{self.port}", "--host", HOST, "--port", str(free_port()),
                 "--node-config", node_config],
                self.workdir / f"home-supernode-{k}", f"supernode-{k}.log",
            ))
        self._write_connection()
        return self

    def _write_connection(self) -> None:
        home = self.workdir / "home-cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\ninsecure = true\n'
        )

    def kill(self, k: int, sig: int = signal.SIGTERM) -> None:
        """Stop SuperNode ``k`` and every process it started, as a lost machine
        (``SIGTERM``: it leaves the federation at once; ``SIGKILL``: the SuperLink notices after
        Flower's heartbeat patience)."""
        proc = self.supernodes[k]
        if proc is not None and proc.poll() is None:
            _signal_tree(proc.pid, sig)
            proc.wait(timeout=30)
        self.supernodes[k] = None

    def stop(self) -> None:
        """Stop every process this federation started, the runs it submitted and the
        processes those started (SIGTERM, then SIGKILL after 15 s)."""
        terminate([*self._runs, *self.supernodes, self.superlink])
        self._runs = []
        self.supernodes = [None] * len(self.supernodes)
        self.superlink = None
        for log in self._logs:
            log.close()
        self._logs = []

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ runs
    def run_command(self, app: str | os.PathLike, run_config: dict[str, Any]) -> list[str]:
        """The ``flwr run`` command line for ``app`` with ``run_config`` overrides (written to
        a TOML file, so values may contain spaces)."""
        overrides = self.workdir / f"run-config-{time.monotonic_ns()}.toml"
        overrides.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in run_config.items()))
        return [_executable("flwr"), "run", str(Path(app).resolve()), CONNECTION, "--stream",
                "--run-config", str(overrides)]

    def submit(
        self, app: str | os.PathLike, run_config: dict[str, Any], log_name: str = "run.log"
    ) -> subprocess.Popen:
        """Start ``flwr run ... --stream`` for ``app``; its output goes to ``log_name``."""
        log = open(self.workdir / log_name, "w")  # noqa: SIM115 - closed in stop()
        self._logs.append(log)
        proc = subprocess.Popen(
            self.run_command(app, run_config), env=self._env(self.workdir / "home-cli"),
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir, start_new_session=True,
        )
        self._runs.append(proc)
        return proc

    def run(self, app: str | os.PathLike, run_config: dict[str, Any],
            timeout: float = 1800.0) -> subprocess.CompletedProcess:
        """Run ``app`` to the end, streaming Flower's log to this process's stdout."""
        return subprocess.run(
            self.run_command(app, run_config), env=self._env(self.workdir / "home-cli"),
            cwd=self.workdir, timeout=timeout, check=False,
        )
