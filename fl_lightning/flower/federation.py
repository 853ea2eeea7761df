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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fl_lightning.errors import ConfigError
from fl_lightning.flower.processes import ProcessGuard, _signal_tree, terminate

__all__ = ["LocalFederation", "TLSFiles", "free_port", "terminate"]

HOST = "127.0.0.1"
CONNECTION = "fl-lightning-local"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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


@dataclass(frozen=True)
class TLSFiles:
    """What a federation with TLS and SuperNode authentication runs with (absolute paths).

    Attributes:
        ca_cert: the CA certificate every client checks the SuperLink's certificate against
            (``flower-supernode --root-certificates``, the connection's ``root-certificates``).
        server_cert, server_key: the SuperLink's certificate (for 127.0.0.1 and localhost) and
            its private key.
        node_keys: each SuperNode's authentication private key (OpenSSH format); its public
            key is the same path plus ``.pub``, registered with the SuperLink.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    node_keys: tuple[Path, ...]

    @classmethod
    def create(
        cls, folder: str | os.PathLike, num_supernodes: int,
        given: tuple[str | None, str | None, str | None] = (None, None, None),
    ) -> TLSFiles:
        """Certificates and keys in ``folder``: a new CA and server certificate, or the
        ``given`` ``(ca_cert, server_cert, server_key)`` (all three, checked); a new key pair
        per SuperNode (``node-K``)."""
        from fl_lightning.flower import tls

        folder = Path(folder).absolute()
        if any(given):
            names = ("--ca-cert", "--server-cert", "--server-key")
            missing = [n for n, v in zip(names, given, strict=True) if not v]
            if missing:
                raise ConfigError(f"{', '.join(missing)} missing: give --ca-cert, --server-cert "
                                 "and --server-key together, or none of them (then they are "
                                 "generated)")
            ca = tls.check_pem(given[0], names[0], "certificate")
            crt = tls.check_pem(given[1], names[1], "certificate")
            key = tls.check_pem(given[2], names[2], "private key")
            tls.check_given(ca, crt, key, HOST)
        else:
            ca, ca_key = tls.make_ca(folder)
            crt, key = tls.make_server_cert(folder, ca, ca_key)
        nodes = tuple(tls.make_node_keys(folder / "nodes", f"node-{k}")[0]
                      for k in range(num_supernodes))
        return cls(ca, crt, key, nodes)


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
        tls: :class:`TLSFiles` to run with TLS and SuperNode authentication (the SuperLink
            with the server certificate and ``--enable-supernode-auth``, each node's public
            key registered with ``flwr supernode register`` before the node starts, the nodes
            and ``flwr run`` checking the CA); ``None``: ``--insecure``, no authentication.

    Every SuperNode keeps its clients' state in a file under its home
    (``--node-config state-dir=...``), so a node that is restarted goes on with it.
    Every process it starts is stopped by :meth:`stop`, and none outlives this process
    (:mod:`fl_lightning.flower.processes`).

    Example (not run here: it starts processes)::

        with LocalFederation(3) as fed:
            fed.run("flower_app", {"rounds": 5})
    """

    def __init__(
        self, num_supernodes: int, workdir: str | os.PathLike | None = None,
        data_dir: str | None = None, start_timeout: float = 60.0, threads: int | None = 1,
        tls: TLSFiles | None = None,
    ) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes={num_supernodes} must be >= 1")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                    or threads < 1):
            raise ValueError(f"threads={threads!r} must be an integer >= 1 or None")
        if tls is not None and len(tls.node_keys) < num_supernodes:
            raise ValueError(f"tls has {len(tls.node_keys)} node keys for {num_supernodes} "
                             "SuperNodes")
        self.threads = threads
        self.num_supernodes = num_supernodes
        # absolute: every process runs in it, and FLWR_HOME is read relative to a process's cwd
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="fl-lightning-flower-")).absolute()
        self.data_dir = data_dir
        self.start_timeout = start_timeout
        self.tls = tls
        self.port: int | None = None
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen | None] = []
        self.guard = ProcessGuard()
        self._extra: list[subprocess.Popen] = []
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
        return self.guard.spawn(args, self._env(home), log, cwd=self.workdir)

    def _transport(self) -> list[str]:
        if self.tls is None:
            return ["--insecure"]
        return ["--ssl-certfile", str(self.tls.server_cert), "--ssl-keyfile",
                str(self.tls.server_key), "--ssl-ca-certfile", str(self.tls.ca_cert),
                "--enable-supernode-auth"]

    def start(self) -> LocalFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.superlink = self._spawn(
            [_executable("flower-superlink"), *self._transport(),
             "--disable-runtime-dependency-installation", "--host", HOST,
             "--port", str(self.port)],
            self.workdir / "home-superlink", "superlink.log",
        )
        self._wait_for_superlink()
        self._write_connection()
        if self.tls is not None:
            self.register([Path(f"{key}.pub") for key in self.tls.node_keys])
        for k in range(self.num_supernodes):
            self.supernodes.append(self.start_supernode(k))
        return self

    def _wait_for_superlink(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while True:
            if self.superlink.poll() is not None:
                raise RuntimeError(f"flower-superlink exited: see {self.workdir}/superlink.log")
            try:
                socket.create_connection((HOST, self.port), timeout=1.0).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the SuperLink did not listen on {HOST}:{self.port} within "
                        f"{self.start_timeout:g} s; see {self.workdir}/superlink.log"
                    ) from None
                time.sleep(0.2)

    def register(self, public_keys: list[Path]) -> None:
        """Register SuperNode public keys with the SuperLink (``flwr supernode register``,
        all at once); a refused key is an error naming ``flwr``'s last line."""
        env = self._env(self.workdir / "home-cli")
        procs = [self.guard.spawn([_executable("flwr"), "supernode", "register", str(pub),
                                   CONNECTION], env, subprocess.PIPE, cwd=self.workdir)
                 for pub in public_keys]
        for pub, proc in zip(public_keys, procs, strict=True):
            out = proc.communicate(timeout=self.start_timeout)[0].decode(errors="replace")
            if proc.returncode != 0:
                last = [line for line in out.splitlines() if line.strip()][-1:] or ["no output"]
                raise RuntimeError(f"flwr supernode register {pub} failed: {last[0].strip()}")

    def supernode_command(
        self, k: int, private_key: str | os.PathLike | None = None,
        root_cert: str | os.PathLike | None = None,
    ) -> list[str]:
        """The ``flower-supernode`` command of node ``k`` (with TLS: its own key and the CA,
        unless others are given)."""
        node_config = f"partition-id={k} num-partitions={self.num_supernodes}"
        if self.data_dir:
            node_config += f' data-dir="{self.data_dir}"'
        if self.threads is not None:
            node_config += f" threads={self.threads}"
        node_config += f' state-dir="{self.workdir / f"home-supernode-{k}" / "client-state"}"'
        args = [_executable("flower-supernode"), "--superlink", f"{HOST}:{self.port}",
                "--host", HOST, "--port", str(free_port()), "--node-config", node_config]
        if self.tls is None:
            return [*args, "--insecure"]
        key = private_key or self.tls.node_keys[k]
        return [*args, "--root-certificates", str(root_cert or self.tls.ca_cert),
                "--auth-supernode-private-key", str(key)]

    def start_supernode(
        self, k: int, log_name: str | None = None, private_key: str | os.PathLike | None = None,
        root_cert: str | os.PathLike | None = None, runs_apps: bool = True,
    ) -> subprocess.Popen:
        """Start SuperNode ``k`` (another key or CA than its own: a node the SuperLink must
        refuse, with a home and log of its own); stopped by :meth:`stop`. ``runs_apps=False``
        starts no ``flower-superexec`` beside it (``--isolation process``): a node that is only
        to connect, or to be refused."""
        name = log_name or f"supernode-{k}"
        args = self.supernode_command(k, private_key, root_cert)
        if not runs_apps:
            args += ["--isolation", "process"]
        proc = self._spawn(args, self.workdir / f"home-{name}", f"{name}.log")
        if log_name is not None:
            self._extra.append(proc)
        return proc

    def _write_connection(self) -> None:
        home = self.workdir / "home-cli"
        home.mkdir(parents=True, exist_ok=True)
        security = ("insecure = true" if self.tls is None
                    else f"root-certificates = {_toml_value(str(self.tls.ca_cert))}")
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{HOST}:{self.port}"\n{security}\n'
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

    def exited(self) -> list[int]:
        """The SuperNodes that ended on their own (refused by the SuperLink, a bad option),
        not those :meth:`kill` stopped."""
        return [k for k, p in enumerate(self.supernodes) if p is not None and p.poll() is not None]

    def stop(self) -> None:
        """Stop every process this federation started, the runs it submitted and the
        processes those started (SIGTERM, then SIGKILL after 15 s), then any other process
        they left behind (:class:`~fl_lightning.flower.processes.ProcessGuard`)."""
        self.guard.stop([*self._runs, *self._extra, *self.supernodes, self.superlink])
        self._runs, self._extra = [], []
        self.supernodes = [None] * len(self.supernodes)
        self.superlink = None
        for log in self._logs:
            log.close()
        self._logs = []

    def __enter__(self) -> LocalFederation:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

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
        proc = self.guard.spawn(self.run_command(app, run_config),
                                self._env(self.workdir / "home-cli"), log, cwd=self.workdir)
        self._runs.append(proc)
        return proc

    def run(self, app: str | os.PathLike, run_config: dict[str, Any],
            timeout: float = 1800.0) -> int:
        """Run ``app`` to the end, streaming Flower's log to this process's stdout; returns
        ``flwr run``'s exit status."""
        proc = self.guard.spawn(self.run_command(app, run_config),
                                self._env(self.workdir / "home-cli"), None, cwd=self.workdir)
        self._runs.append(proc)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return -1
