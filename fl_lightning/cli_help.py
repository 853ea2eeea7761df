"""A compact ``--help`` for ``fl-lightning``: one usage line, one sentence per option.

``LightningCLI``'s help repeats every option in the usage block, prints the Trainer's whole
docstring per option and lists every known subclass by full class path (for ``--model.net``,
every ``torch.nn`` module). This formatter keeps what a user scans for: the option, its first
sentence, its type and default, and the project's choices by their short names (each of which
the command line accepts, e.g. ``--model.engine BatchedEngine``). Lightning's own options get
one short line in a federated run's terms instead (:data:`SHORT_HELP`: ``--trainer.max_steps``
is the number of rounds; the options the rounds refuse say what to use instead), so each fits
one line at 80 columns; Lightning's Trainer documentation has the rest.
"""

from __future__ import annotations

import re
import textwrap
from argparse import SUPPRESS, Action, _SubParsersAction

from jsonargparse import DefaultHelpFormatter
from jsonargparse._typehints import ActionTypeHint, get_all_subclass_paths

__all__ = ["SHORT_HELP", "CompactHelpFormatter", "first_sentence"]

_MAX_HELP = 110  # characters of an option's own description
#: base classes that are listed as a choice only when they are the only one
_BASES = ("Algorithm", "Attack", "Compressor", "RobustAggregator", "FederatedNet",
          "ClientEngine", "RoundCallback")
#: options left out of --help (still accepted): there is no predict subcommand
_HIDDEN = ("trainer.limit_predict_batches",)
#: one short line instead of the first sentence of Lightning's or jsonargparse's own help, in a
#: federated run's terms (a training step is a round; one epoch is the whole run); the Trainer
#: options the rounds refuse (:mod:`fl_lightning.trainer_options`) say what to use instead
SHORT_HELP = {
    "config": "A YAML or JSON config file.",
    "print_config": "Print the resolved config and exit.",
    "seed_everything": "Seed (true: random).",
    "ckpt_path": "Checkpoint to load.",
    "weights_only": "Load with weights_only.",
    "trainer.accelerator": "cpu, gpu, mps or auto.",
    "trainer.strategy": "auto, ddp or a Strategy.",
    "trainer.devices": "Devices: n, list, auto.",
    "trainer.num_nodes": "Machines (DDP nodes).",
    "trainer.precision": "32-true, 64-true or bf16-mixed.",
    "trainer.logger": "Logger(s).",
    "trainer.callbacks": "Callback(s).",
    "trainer.fast_dev_run": "Smoke test: n rounds.",
    "trainer.max_epochs": "One epoch is the run.",
    "trainer.min_epochs": "One epoch is the run.",
    "trainer.max_steps": "Communication rounds.",
    "trainer.min_steps": "Train at least n rounds.",
    "trainer.max_time": "Stop after DD:HH:MM:SS.",
    "trainer.limit_train_batches": "Refused: use max_steps.",
    "trainer.limit_val_batches": "Eval batches (0: none).",
    "trainer.limit_test_batches": "Test batches (0: none).",
    "trainer.overfit_batches": "Refused: use max_steps.",
    "trainer.val_check_interval": "Evaluate every n rounds.",
    "trainer.check_val_every_n_epoch": "Refused: use val_check_interval.",
    "trainer.num_sanity_val_steps": "Sanity eval batches.",
    "trainer.log_every_n_steps": "Log every n rounds.",
    "trainer.enable_checkpointing": "Write checkpoints.",
    "trainer.enable_progress_bar": "Show the progress bar.",
    "trainer.enable_model_summary": "Print the model summary.",
    "trainer.accumulate_grad_batches": "Refused: use local_epochs.",
    "trainer.gradient_clip_val": "Refused: cannot clip.",
    "trainer.gradient_clip_algorithm": "Refused: cannot clip.",
    "trainer.deterministic": "Deterministic torch ops.",
    "trainer.benchmark": "cudnn.benchmark.",
    "trainer.inference_mode": "Eval in inference_mode.",
    "trainer.use_distributed_sampler": "Wrap samplers for DDP.",
    "trainer.profiler": "Profiler, e.g. simple.",
    "trainer.detect_anomaly": "Autograd anomaly check.",
    "trainer.barebones": "No costly features.",
    "trainer.plugins": "Lightning plugins.",
    "trainer.sync_batchnorm": "DDP-synced BatchNorm.",
    "trainer.reload_dataloaders_every_n_epochs": "Reload data every n epochs.",
    "trainer.default_root_dir": "Folder of the outputs.",
    "trainer.enable_autolog_hparams": "Log the hyperparameters.",
    "trainer.model_registry": "Name on Model hub.",
}


def _default(value: object) -> str:
    """A default for the help text; a class default as ``ShortName(arg=value, ...)``."""
    if isinstance(value, dict) or hasattr(value, "class_path"):
        get = value.get if isinstance(value, dict) else lambda k, d=None: getattr(value, k, d)
        path = get("class_path")
        if isinstance(path, str):
            args = get("init_args") or {}
            items = dict(args).items() if not hasattr(args, "__dict__") else vars(args).items()
            inner = ", ".join(f"{k}={v}" for k, v in items)
            return f"{path.rsplit('.', 1)[-1]}({inner})"
    if value is None:
        return "null"
    return str(value)


def first_sentence(text: str) -> str:
    """The first sentence of ``text``, without reST markup, at most ~150 characters."""
    text = re.sub(r"``([^`]*)``", r"\1", text or "")
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
    text = " ".join(text.split())
    match = re.search(r"(?<![ .][a-z])(?<!e\.g)(?<!i\.e)\.(\s|$)", text)
    if match:
        text = text[: match.start() + 1]
    if len(text) > _MAX_HELP:
        text = text[:_MAX_HELP].rsplit(" ", 1)[0] + " ..."
    return text


class CompactHelpFormatter(DefaultHelpFormatter):
    """``DefaultHelpFormatter`` with a short usage, one-sentence helps and short-name choices."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 38,
                 width: int | None = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width)

    def _format_usage(self, usage, actions, groups, prefix) -> str:  # noqa: D102
        prog = self._prog.replace(" [options]", "")
        if prefix == "":  # argparse asks for the prog of a subcommand: "fl-lightning fit"
            return prog
        if any(isinstance(a, _SubParsersAction) for a in actions):
            return f"usage: {prog} [-h] {{fit,validate,test}} ...\n\n"
        note = textwrap.fill(
            "Options that take a class accept its short name (--model.algorithm FedSoL) and "
            "have --OPTION.help NAME for that class's own options (--model.algorithm.help "
            "FedSoL).", width=max(self._width, 40),
        )
        return f"usage: {prog} [-h] [-c CONFIG] [--print_config] [--OPTION VALUE ...]\n\n{note}\n\n"

    def _get_default_metavar_for_optional(self, action: Action) -> str:
        return "VALUE"

    def _get_help_string(self, action: Action) -> str:
        if getattr(action, "_jsonargparse_preexpanded_help", False) or action.help == SUPPRESS:
            return action.help or ""
        own = first_sentence(SHORT_HELP.get(action.dest, action.help) or "")
        if not isinstance(action, ActionTypeHint):
            if action.default in (None, SUPPRESS) or not action.option_strings:
                return own.replace("%", "%%")
            return (own + f" (default: {_default(action.default)})").replace("%", "%%")
        parts = []
        if action.required:
            parts.append("required")
        if action.default != SUPPRESS and not action.required:
            parts.append("default: " + _default(action.default).replace("%", "%%"))
        names, others = self._choices(action)
        if names:
            parts.append("choices: " + ", ".join(names) + (" or a class path" if others else ""))
        own = own.replace("%", "%%")
        return own + (" (" + "; ".join(parts) + ")" if parts else "")

    @staticmethod
    def _choices(action: ActionTypeHint) -> tuple[list[str], bool]:
        """The project's classes an option accepts (short names), and whether others exist."""
        try:
            paths = get_all_subclass_paths(action._typehint, closed_types=False)
        except Exception:  # noqa: BLE001 - a help text must never fail
            return [], False
        ours = [p for p in paths if p.startswith("fl_lightning.")]
        names = list(dict.fromkeys(p.rsplit(".", 1)[-1] for p in ours))
        if len(names) > 1:  # the option's own base class is no choice when it has subclasses
            names = [n for n in names if n not in _BASES]
        return names, len(ours) < len(paths)

    def _format_action(self, action: Action) -> str:
        if action.dest.endswith(".help") or action.dest in _HIDDEN:
            return ""  # --OPTION.help is described once, in the usage text
        if isinstance(action, ActionTypeHint) or action.help not in (None, SUPPRESS):
            saved = action.help
            action.help = self._get_help_string(action)
            action._jsonargparse_preexpanded_help = True  # type: ignore[attr-defined]
            try:
                return super(DefaultHelpFormatter, self)._format_action(action)
            finally:
                del action._jsonargparse_preexpanded_help  # type: ignore[attr-defined]
                action.help = saved
        return super()._format_action(action)
