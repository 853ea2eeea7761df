"""fl-lightning: federated optimization under data heterogeneity, on PyTorch Lightning."""

import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys
import tempfile as _tempfile

__version__ = "0.1.0"

# ``fl_lightning.callbacks`` lives in the repository's top-level ``callbacks/`` folder. An
# installed wheel holds it as ``fl_lightning/callbacks/`` (setuptools ``package-dir``) and an
# editable install maps it; a source checkout used without installing (``PYTHONPATH=.``) needs
# this finder, which serves only that one name, from the folder beside this package.
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CALLBACKS = _os.path.join(_os.path.dirname(_HERE), "callbacks")


class _CallbacksFinder(_abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname != "fl_lightning.callbacks":
            return None
        return _util.spec_from_file_location(
            fullname, _os.path.join(_CALLBACKS, "__init__.py"),
            submodule_search_locations=[_CALLBACKS],
        )


if not _os.path.isdir(_os.path.join(_HERE, "callbacks")) and _os.path.isfile(
    _os.path.join(_CALLBACKS, "__init__.py")
):
    _sys.meta_path.insert(0, _CallbacksFinder())


class _LegacyCallbacksFinder(_abc.MetaPathFinder, _abc.Loader):
    """The deprecated top-level name ``callbacks`` (``class_path: callbacks.X`` in old configs),
    served as an alias of ``fl_lightning.callbacks`` with a ``DeprecationWarning``. It is the last
    finder on ``sys.meta_path``: a ``callbacks`` module of your own project always wins."""

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname != "callbacks" and not fullname.startswith("callbacks."):
            return None
        return _util.spec_from_loader(fullname, self, is_package=fullname == "callbacks")

    def create_module(self, spec):  # noqa: D102
        import importlib
        import warnings

        if spec.name == "callbacks":
            warnings.warn(
                "the top-level package 'callbacks' is deprecated: use fl_lightning.callbacks "
                "(in configs: class_path: fl_lightning.callbacks.<Name>, or just <Name>)",
                DeprecationWarning,
                stacklevel=2,
            )
        return importlib.import_module("fl_lightning." + spec.name)

    def exec_module(self, module):  # noqa: D102
        return None


_sys.meta_path.append(_LegacyCallbacksFinder())


def _keep_home_untouched() -> None:
    """torchmetrics imports ``matplotlib.pyplot``, which writes its font cache and config
    folder under ``$HOME`` (``~/.cache/matplotlib``, ``~/.config/matplotlib``). Unless the user
    chose a folder (``MPLCONFIGDIR``), point it at one in the system's temporary directory."""
    if "MPLCONFIGDIR" in _os.environ:
        return
    user = str(_os.getuid()) if hasattr(_os, "getuid") else _os.environ.get("USERNAME", "user")
    _os.environ["MPLCONFIGDIR"] = _os.path.join(
        _tempfile.gettempdir(), f"fl-lightning-matplotlib-{user}"
    )


_keep_home_untouched()
