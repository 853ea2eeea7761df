"""The ``fl-lightning`` command: a ``LightningCLI`` for federated runs (fit, validate, test)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
from collections.abc import Iterator
from typing import Any, NoReturn

from jsonargparse import Namespace, class_from_function
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, _get_short_description

from fl_lightning import ddpfault, registry
from fl_lightning.cli_help import CompactHelpFormatter
from fl_lightning.cli_resume import (
    CheckpointCheck,
    check_ckpt_path,
    check_fits,
    prepare_resume,
    resolved_config,
)
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.errors import ConfigError
from fl_lightning.interrupt import interrupt_at_round_boundary
from fl_lightning.module import FederatedModule, Preempted
from fl_lightning.quiet import quiet_expected_messages
from fl_lightning.replicas import ReplicaAxes, build_replicas, extract_axes
from fl_lightning.resume import RunRecord
from fl_lightning.round import DivergenceError
from fl_lightning.rundir import check_run_dir
from fl_lightning.statefiles import DEFAULT_RAM_MB, ClientStateFiles
from fl_lightning.trainer_options import check_trainer_options
from fl_lightning.validate import (
    check_config_files,
    choice,
    explain_parser_error,
    finite_spellings,
    integer,
    invalid,
    nonnegative,
)

__all__ = ["FederatedCLI", "main"]

TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "fl_lightning.loggers.RoundCSVLogger",
        "init_args": {"save_dir": "lightning_logs", "name": "fl"},
    },
    "log_every_n_steps": 1,
    "num_sanity_val_steps": 0,
    "val_check_interval": 1,
}
CHECKPOINT_CLASS = "fl_lightning.checkpoint.RoundCheckpoint"
PROGRESS_BAR_CLASS = "fl_lightning.progress.RoundProgressBar"
#: optional dependencies: module -> the extra that installs it
OPTIONAL_EXTRAS = {"tensorboard": "tensorboard", "tensorboardX": "tensorboard", "rich": "rich"}


def one_line(message: str) -> str:
    """A parser message on one line, with jsonargparse's ``Parser key "a.b"`` as ``--a.b``."""
    pattern = r'Parser key "?([\w.]+)"?:?'
    keys = re.findall(pattern, message)
    if keys:  # nested keys (a class's init arg) name one option: --model.algorithm.rho
        message = f"--{'.'.join(keys)}: " + re.sub(pattern, "", message)
    parts = [re.sub(r"^\s*-\s+", "", p).strip() for p in message.splitlines()]
    return "; ".join(p for p in parts if p).replace(":;", ":")


class FederatedArgumentParser(LightningArgumentParser):
    """Prints a bad option as one line (and where to look), not the whole usage text."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        prog = self.prog.replace(" [options]", "")
        options = list(self._option_string_actions)
        sub = self._subcommands_action
        for parser in (sub._name_parser_map.values() if sub is not None else ()):
            options.extend(parser._option_string_actions)
        explained = explain_parser_error(message, options, getattr(self, "fl_config_files", ()))
        sys.stderr.write(f"{prog}: error: {explained or one_line(message)} (see {prog} --help)\n")
        self.exit(2)


class FederatedCLI(LightningCLI):
    """``LightningCLI`` wired for ``FederatedModule`` and ``FederatedDataModule``.

    - the model's ``num_classes`` and ``input_shape`` are linked from the data module;
    - the default logger is a ``CSVLogger`` under ``lightning_logs/fl``; the global model is
      evaluated on the test split every ``--trainer.val_check_interval`` rounds; seed 0;
    - unless the config has its own ``ModelCheckpoint``, one is added that writes a checkpoint
      every ``--checkpoint_every_n_rounds`` rounds and at the end, keeping the last
      ``--keep_last_checkpoints``;
    - ``fit --ckpt_path`` resumes with the model and data settings given on the command line;
      where they differ from those stored in the checkpoint, it stops with a message unless
      ``--resume_changes apply`` (Lightning itself would silently restore the stored ones).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", FederatedModule)
        kwargs.setdefault("datamodule_class", FederatedDataModule)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("trainer_defaults", TRAINER_DEFAULTS)
        kwargs.setdefault("parser_kwargs", {"prog": "fl-lightning"})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_class", FederatedArgumentParser)
        raw = sys.argv[1:] if kwargs.get("args") is None else kwargs["args"]
        #: ``--replicas.*`` (taken off the command line; :mod:`fl_lightning.replicas`)
        self._axes_text: dict[str, str] = {}
        self._axes: ReplicaAxes | None = None
        if isinstance(raw, (list, tuple)):
            self._axes_text, rest = extract_axes(raw)
            if self._axes_text:
                kwargs["args"] = raw = rest
        #: the subcommand named first on the command line; only its parser is built
        self._invoked: str | None = (
            raw[0] if isinstance(raw, (list, tuple)) and raw and raw[0] in self.subcommands()
            else None
        )
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ parser, subcommands
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (a federated run has no ``predict`` step)."""
        commands = dict(LightningCLI.subcommands())
        commands.pop("predict", None)
        return commands

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Like Lightning's, but for ``fl-lightning fit ...`` only the ``fit`` parser is built:
        each subcommand parser introspects the Trainer, module and data module signatures again
        (about a second of every start). Without a leading subcommand (``--help``, a typo) all
        are built, so help and error messages list every subcommand."""
        if self._invoked is None:
            super()._add_subcommands(parser, **kwargs)
            return
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        name = self._invoked
        trainer_class = (self.trainer_class if isinstance(self.trainer_class, type)
                         else class_from_function(self.trainer_class))
        description = _get_short_description(getattr(trainer_class, name))
        sub_kwargs = kwargs.get(name, {})
        sub_kwargs.setdefault("description", description)
        sub = self._prepare_subcommand_parser(trainer_class, name, **sub_kwargs)
        self._subcommand_parsers[name] = sub
        parser.add_subcommands().add_subcommand(name, sub, help=description)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Every (sub)command parser gets the compact help; project classes get short names."""
        registry.import_all()
        kwargs.setdefault("formatter_class", CompactHelpFormatter)
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")
        parser.add_argument(
            "--checkpoint_every_n_rounds", type=int, default=10,
            help="Write a checkpoint every n rounds (and at the end of the run).",
        )
        parser.add_argument(
            "--keep_last_checkpoints", type=int, default=3,
            help="Newest periodic checkpoints kept.",
        )
        parser.add_argument(
            "--client_state_ram_mb", type=float, default=DEFAULT_RAM_MB,
            help="Client state in RAM, MiB per store.",
        )
        parser.add_argument(
            "--resume_changes", type=str, default="error",
            help="Resume with other settings: error or apply.",
        )
        ddpfault.add_arguments(parser)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Check the ``--config`` files and spell ``nan``/``inf`` so options' own checks see
        them (:mod:`fl_lightning.validate`), parse, then apply the output defaults
        (:meth:`_apply_output_defaults`)."""
        if args is None or isinstance(args, (list, tuple)):
            raw = [str(a) for a in (sys.argv[1:] if args is None else args)]
            files = check_config_files(raw)
            for p in (parser, *getattr(self, "_subcommand_parsers", {}).values()):
                p.fl_config_files = files
            fixed = finite_spellings(raw)
            if fixed != raw:
                if args is None:
                    sys.argv[1:] = fixed
                else:
                    args = fixed
        super().parse_arguments(parser, args)
        # the output defaults, before Lightning seeds and logs anything
        command = self.config.get("subcommand")
        config = self.config[command] if command else self.config
        if self._axes_text:  # this process's own run is replica 0 (its seed, its values)
            if command != "fit":
                raise ConfigError(f"--replicas.* train several runs: use them with fit, not "
                                  f"{command}")
            self._axes = ReplicaAxes.parse(self._axes_text, config)
            config = self.config[command] = self._axes.config(config, 0)
        if config.get("trainer") is not None:
            self._apply_output_defaults(config)

    # ------------------------------------------------------------------ checks before building
    def _sub(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        """Reject settings that Lightning would silently change or that break manual rounds."""
        config = self._sub()
        trainer = config.trainer
        precision = str(trainer.get("precision"))
        if precision in ("16-mixed", "16", "16-true"):
            raise invalid(
                "--trainer.precision", precision, "32-true, 64-true or bf16-mixed",
                "fp16 with per-client optimizers gives NaN clients and silently skipped server "
                "steps",
            )
        check_trainer_options(trainer)
        rounds, every = trainer.get("max_steps"), trainer.get("val_check_interval")
        if isinstance(every, int) and isinstance(rounds, int) and 0 < rounds < every:
            # Evaluate at least once, at the last round, instead of failing in Lightning.
            trainer["val_check_interval"] = rounds
        for option in ("checkpoint_every_n_rounds", "keep_last_checkpoints"):
            integer(config.get(option), f"--{option}", 1)
        nonnegative(config.get("client_state_ram_mb"), "--client_state_ram_mb")
        choice(config.get("resume_changes"), "--resume_changes", ("error", "apply"))
        ddpfault.check_options(config)
        self._add_default_checkpointing(config)

    def _add_default_checkpointing(self, config: Namespace) -> None:
        trainer = config.trainer
        if trainer.get("enable_checkpointing") is False:
            return
        callbacks = list(trainer.get("callbacks") or [])
        names = ("ModelCheckpoint", "RoundCheckpoint")
        if any(
            isinstance(c, Namespace) and str(c.get("class_path", "")).endswith(names)
            for c in callbacks
        ):
            return
        callbacks.append(
            Namespace(
                class_path=CHECKPOINT_CLASS,
                init_args=Namespace(
                    every_n_rounds=config.checkpoint_every_n_rounds,
                    keep_last=config.keep_last_checkpoints,
                ),
            )
        )
        trainer["callbacks"] = callbacks

    # ------------------------------------------------------------------ outputs
    def _apply_output_defaults(self, config: Namespace) -> None:
        """Outputs under ``--trainer.default_root_dir``; the round progress bar by default.

        - a relative ``save_dir`` of the logger(s) is taken under ``default_root_dir`` (as
          Lightning's own default logger does), so the run folder, its checkpoints and figures
          all move with it;
        - a logger that needs an optional package that is missing stops with one line;
        - unless the config has its own progress bar (or ``enable_progress_bar false``), the
          :class:`~fl_lightning.progress.RoundProgressBar` is added.
        """
        trainer = config.trainer
        root = trainer.get("default_root_dir")
        loggers = trainer.get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            if not isinstance(logger, Namespace):
                continue
            _check_optional_logger(str(logger.get("class_path", "")))
            args = logger.get("init_args")
            save_dir = args.get("save_dir") if isinstance(args, Namespace) else None
            if root and isinstance(save_dir, str) and not os.path.isabs(save_dir):
                args["save_dir"] = os.path.join(str(root), save_dir)
        callbacks = list(trainer.get("callbacks") or [])
        for c in callbacks:
            if isinstance(c, Namespace) and str(c.get("class_path", "")).endswith("Rich"
                                                                                 "RoundProgressBar"):
                _require("rich", "--trainer.callbacks RichRoundProgressBar")
        if trainer.get("enable_progress_bar") is False:
            return
        if any(isinstance(c, Namespace) and "ProgressBar" in str(c.get("class_path", ""))
               for c in callbacks):
            return
        callbacks.append(Namespace(class_path=PROGRESS_BAR_CLASS, init_args=Namespace()))
        trainer["callbacks"] = callbacks

    # ------------------------------------------------------------------ resume
    def _parse_ckpt_path(self) -> None:
        """Resume with the command line's settings; never restore stored ones silently.

        Replaces LightningCLI's version, which re-applies the hyper-parameters stored in the
        checkpoint over the command line. See :mod:`fl_lightning.cli_resume`.
        """
        self._ckpt = CheckpointCheck()
        sub = self.config.get("subcommand")
        if sub:
            given = resolved_config(self.parser, self.config, sub)
            self._ckpt = check_ckpt_path(self.config[sub], sub, given)

    def _check_checkpoint_fits(self) -> None:
        check_fits(self._ckpt, self.model, self._sub().get("ckpt_path"))

    def instantiate_classes(self) -> None:
        """Lightning's, then the replicas 1.. of ``--replicas.*`` (each from its own config,
        seeded as its run alone would be: :func:`build_replicas`)."""
        super().instantiate_classes()
        if self._axes is not None:
            self.model.replicas = build_replicas(self, self._axes)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        if self.subcommand == "fit":
            resume = self._ckpt.resume
            history = resume.history if resume is not None else []
            callbacks = [*callbacks, RunRecord(self._ckpt.run_config, history)]
        ram = self._sub().get("client_state_ram_mb", DEFAULT_RAM_MB)
        callbacks = [*callbacks, ClientStateFiles(ram)]
        config["strategy"] = ddpfault.with_timeout(config.get("strategy"), self._sub().ddp_timeout)
        return super()._instantiate_trainer(config, callbacks)

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's, inside :func:`fl_lightning.ddpfault.watch_ranks` (DDP faults)."""
        config = self._sub()
        with ddpfault.watch_ranks(self.trainer, config.ddp_stop_timeout, config.ddp_timeout):
            super()._run_subcommand(subcommand)

    def before_fit(self) -> None:
        check_run_dir(self.trainer)
        self._check_checkpoint_fits()
        prepare_resume(self._ckpt.resume, self.trainer, self.model)

    def before_validate(self) -> None:
        self._check_checkpoint_fits()

    def before_test(self) -> None:
        self._check_checkpoint_fits()


def _require(module: str, what: str) -> None:
    """Stop with one line if the optional ``module`` is not installed."""
    if importlib.util.find_spec(module) is None:
        extra = OPTIONAL_EXTRAS.get(module, module)
        raise ConfigError(
            f"{what} needs {module}, which is not installed: pip install "
            f"'fl-lightning[{extra}]' (or pip install {module})"
        )


def _check_optional_logger(class_path: str) -> None:
    if class_path.rsplit(".", 1)[-1] == "TensorBoardLogger" and all(
        importlib.util.find_spec(m) is None for m in ("tensorboard", "tensorboardX")
    ):
        _require("tensorboard", f"--trainer.logger {class_path}")


@contextlib.contextmanager
def current_folder_importable() -> Iterator[None]:
    """Make modules of the current folder importable, as ``python -m fl_lightning.cli`` does.

    ``python -m`` puts the current folder first on ``sys.path``; a console script puts its own
    folder there instead, so ``--model.algorithm my_algorithms.MyAlg`` would not import. The
    folder is added for the duration of the block (unless already there) and removed after.
    """
    cwd = os.getcwd()
    present = any(os.path.realpath(p or os.curdir) == os.path.realpath(cwd) for p in sys.path)
    if not present:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if not present and cwd in sys.path:
            sys.path.remove(cwd)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``fl-lightning`` console script.

    Modules of the current folder are importable (see :func:`current_folder_importable`).
    """
    quiet_expected_messages()
    with current_folder_importable():
        _main(args)


def _main(args: list[str] | None) -> None:
    """Run the CLI; a known failure becomes one line on stderr and an exit status."""
    try:
        with interrupt_at_round_boundary():
            FederatedCLI(args=args)
    except (ConfigError, DivergenceError) as err:
        if rank_zero_only.rank == 0:  # under DDP every rank stops; one of them says why
            print(f"fl-lightning: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except ModuleNotFoundError as err:  # an optional package a chosen component needs
        name = (err.name or "").split(".")[0]
        if name not in OPTIONAL_EXTRAS:
            raise
        print(
            f"fl-lightning: error: {name} is not installed: pip install "
            f"'fl-lightning[{OPTIONAL_EXTRAS[name]}]' (or pip install {name})",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except ValueError as err:
        # jsonargparse wraps an error raised while building an optional component
        # (``--model.privacy``: ``DPFedAvg | None``) in a multi-line "Union subtypes" message
        if not isinstance(err.__cause__, ConfigError):
            raise
        print(f"fl-lightning: error: {err.__cause__}", file=sys.stderr)
        raise SystemExit(2) from None
    except ddpfault.RankLost as err:  # said by every surviving rank
        print(f"fl-lightning: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Preempted as stop:
        by = "Ctrl-C (SIGINT)" if stop.signal == "SIGINT" else "SIGTERM"
        if stop.ranks:  # under DDP, when not every rank received it
            by += f" on rank{'s' if len(stop.ranks) > 1 else ''} {', '.join(map(str, stop.ranks))}"
        if rank_zero_only.rank == 0:  # under DDP every rank stops after the same round
            print(
                f"fl-lightning: stopped by {by} after round {stop.rounds}; checkpoint "
                f"{os.path.abspath(stop.path)}; resume with the same command plus --ckpt_path "
                f"{stop.path}",
                file=sys.stderr,
            )
        raise SystemExit(130 if stop.signal == "SIGINT" else 143) from None


if __name__ == "__main__":  # pragma: no cover
    main()
