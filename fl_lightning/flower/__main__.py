"""``python -m fl_lightning.flower``: run the Flower app on a local SuperLink + SuperNodes.

Example::

    python -m fl_lightning.flower --supernodes 3 --rounds 5
    python -m fl_lightning.flower --supernodes 3 --rounds 5 --tls   # TLS + node authentication

Before it starts any process, the launcher builds the run as the ServerApp will (the same
parser, the same checks: :func:`check_launch`): a bad option, a setting the apps refuse, a
``--data.num_clients`` other than ``--supernodes`` or a dataset the nodes cannot read stops it
with one line and exit status 2. A run that fails (e.g. every client of a round failed on its
node) ends with exit status 1 and the ServerApp's one line naming the first node's error.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from fl_lightning.errors import ConfigError

try:
    import tomllib
except ImportError:  # Python 3.10: flwr's own dependency
    import tomli as tomllib

DEFAULT_APP = Path(__file__).resolve().parents[2] / "flower_app"
PROG = "python -m fl_lightning.flower"


class _Parsed(Exception):
    """The config parser already printed its one line."""


def app_config(app: str | os.PathLike) -> str:
    """The fl-lightning config file the app runs by default (``config`` of its
    ``[tool.flwr.app.config]``), as an absolute path."""
    with open(Path(app) / "pyproject.toml", "rb") as fh:
        table = tomllib.load(fh).get("tool", {}).get("flwr", {}).get("app", {})
    config = str(table.get("config", {}).get("config", "") or "")
    if not config:
        raise ConfigError(f"--app={app} names no config in [tool.flwr.app.config]: pass "
                          "--config my.yaml")
    return str(Path(app, config).resolve()) if not os.path.isabs(config) else config


def check_launch(config: str, args: str, rounds: int, supernodes: int,
                 data_dir: str | None) -> None:
    """Build the run exactly as the ServerApp will (:func:`~fl_lightning.flower.server.
    build_run`: the CLI's parser and checks, then the apps' own) and check what only the
    deployment knows: one SuperNode per partition, and a dataset the nodes can read from
    ``data_dir`` (or the config's ``--data.data_dir``). Raises a one-line
    :class:`~fl_lightning.errors.ConfigError` (or :class:`_Parsed` where the parser printed
    its line)."""
    import lightning.pytorch  # noqa: F401 - sets its loggers' levels, lowered here

    from fl_lightning.flower.client import partition_size
    from fl_lightning.flower.server import FederationError, build_run
    from fl_lightning.quiet import quiet_expected_messages
    from fl_lightning.validate import conflict

    quiet_expected_messages()
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # the trainer's banners are the ServerApp's to print, not ours
        logger.setLevel(logging.WARNING)
    try:
        _, dm, recipe = build_run(config, args, rounds)
    except SystemExit as err:  # the parser's one line is on stderr
        raise _Parsed(str(err.code)) from None
    except FederationError as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:
        if isinstance(err.__cause__, ConfigError):  # jsonargparse wraps a component's check
            raise err.__cause__ from None
        raise
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
    if dm.num_clients != supernodes:
        raise conflict(
            f"--supernodes={supernodes}", f"--data.num_clients={dm.num_clients}",
            "each SuperNode holds one partition",
            f"pass --supernodes {dm.num_clients}, or --args \"--data.num_clients {supernodes}\"",
        )
    partition_size(recipe["data"], 0, data_dir)  # what a node reads first: its labels


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Start a SuperLink and N SuperNodes on 127.0.0.1 (one partition each), "
        "run the Flower app with `flwr run`, print the final accuracy, stop every process.",
    )
    parser.add_argument("--supernodes", type=int, default=3,
                        help="SuperNodes to start; must equal the config's --data.num_clients")
    parser.add_argument("--app", default=str(DEFAULT_APP), help="the Flower app folder")
    parser.add_argument("--rounds", type=int, default=5, help="communication rounds")
    parser.add_argument("--config", default=None,
                        help="an fl-lightning config (default: the app's fedsol_digits.yaml)")
    parser.add_argument("--args", default="", help="more fl-lightning options, one string")
    parser.add_argument("--data-dir", default=None, help="each SuperNode's dataset folder")
    parser.add_argument("--save-dir", default=None,
                        help="where final.pt and summary.json go (default: a new temp folder)")
    parser.add_argument("--workdir", default=None, help="Flower homes and logs")
    parser.add_argument("--threads", type=int, default=1,
                        help="PyTorch threads per process (as OMP_NUM_THREADS); the weights "
                        "equal a simulation's bit for bit with the same thread count")
    parser.add_argument("--tls", action="store_true",
                        help="TLS and SuperNode authentication: a CA, a server certificate "
                        "for 127.0.0.1/localhost and a key pair per SuperNode are generated "
                        "into <save-dir>/tls (or the given certificates are used)")
    parser.add_argument("--ca-cert", default=None, help="with --tls: a given CA certificate")
    parser.add_argument("--server-cert", default=None,
                        help="with --tls: a given SuperLink certificate (for 127.0.0.1)")
    parser.add_argument("--server-key", default=None,
                        help="with --tls: the given SuperLink certificate's private key")
    return parser


def _check_options(parser: argparse.ArgumentParser, opts: argparse.Namespace) -> None:
    for name in ("supernodes", "threads", "rounds"):
        if getattr(opts, name) < 1:
            parser.error(f"--{name}={getattr(opts, name)} is invalid: use an integer >= 1")
    if not (Path(opts.app) / "pyproject.toml").is_file():
        parser.error(f"--app={opts.app} has no pyproject.toml: pass the flower_app folder")
    if opts.data_dir is not None and not os.path.isdir(opts.data_dir):
        parser.error(f"--data-dir={opts.data_dir!r} is invalid: it must be an existing folder "
                     "(the dataset's folder on every SuperNode)")
    given = [n for n in ("ca_cert", "server_cert", "server_key") if getattr(opts, n)]
    if given and not opts.tls:
        parser.error(f"--{given[0].replace('_', '-')} needs --tls: add --tls")
    if given and len(given) < 3:
        parser.error("--ca-cert, --server-cert and --server-key go together: give all three "
                     "(or none, and they are generated)")


def _report(save_dir: str, workdir: Path, supernodes: int, exited: list[int] = ()) -> int:
    """Print the run's outcome; the exit status (0: it finished, 1: it failed). ``exited``:
    the SuperNodes that ended during the run (named where the run failed)."""
    from fl_lightning.flower.server import ERROR_FILE

    summary = os.path.join(save_dir, "summary.json")
    if os.path.isfile(summary):
        with open(summary) as fh:
            result = json.load(fh)
        print(f"fl-lightning: final global test accuracy {result['test_acc']:.4f} after "
              f"{result['rounds']} rounds over {supernodes} SuperNodes; saved {save_dir}")
        return 0
    where = f"logs in {workdir}"
    if exited:
        where = (f"SuperNode(s) {', '.join(map(str, exited))} exited during the run: see "
                 f"{workdir}/supernode-{exited[0]}.log")
    error = os.path.join(save_dir, ERROR_FILE)
    if os.path.isfile(error):
        with open(error) as fh:
            line = fh.read().strip()
        print(f"fl-lightning: error: the run failed: {line} ({where})", file=sys.stderr)
    else:
        print(f"fl-lightning: error: the run did not finish (no {summary}; {where})",
              file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    from fl_lightning.flower.federation import LocalFederation, TLSFiles

    parser = _parser()
    opts = parser.parse_args(argv)
    _check_options(parser, opts)
    save_dir = os.path.abspath(opts.save_dir or tempfile.mkdtemp(prefix="fl-flower-result-"))
    if os.path.exists(os.path.join(save_dir, "summary.json")):
        parser.error(f"--save-dir={save_dir} already holds a summary.json: pick a new folder")
    try:
        if opts.ca_cert:  # the given files first: cheap to check
            from fl_lightning.flower.tls import check_given, check_pem

            check_given(*[check_pem(getattr(opts, option), f"--{option.replace('_', '-')}",
                                    kind)
                          for option, kind in (("ca_cert", "certificate"),
                                               ("server_cert", "certificate"),
                                               ("server_key", "private key"))])
        config = os.path.abspath(opts.config) if opts.config else app_config(opts.app)
        check_launch(config, opts.args, opts.rounds, opts.supernodes, opts.data_dir)
        tls = (TLSFiles.create(os.path.join(save_dir, "tls"), opts.supernodes,
                               (opts.ca_cert, opts.server_cert, opts.server_key))
               if opts.tls else None)
    except _Parsed:
        return 2
    except ConfigError as err:
        print(f"fl-lightning: error: {err}", file=sys.stderr)
        return 2
    run_config = {"rounds": opts.rounds, "args": opts.args, "save-dir": save_dir,
                  "config": config}
    fed = LocalFederation(opts.supernodes, opts.workdir, data_dir=opts.data_dir,
                          threads=opts.threads, tls=tls)
    try:
        with fed:
            security = "TLS, SuperNode authentication" if tls else "insecure"
            print(f"fl-lightning: SuperLink on 127.0.0.1:{fed.port} ({security}), "
                  f"{opts.supernodes} SuperNodes; logs in {fed.workdir}", flush=True)
            fed.run(opts.app, run_config)
            exited = fed.exited()
    except (RuntimeError, OSError) as err:  # a process that did not start (its log named)
        print(f"fl-lightning: error: {err}", file=sys.stderr)
        return 1
    return _report(save_dir, fed.workdir, opts.supernodes, exited)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
