"""fl-lightning: federated optimization under data heterogeneity, on PyTorch Lightning."""

import importlib.abc as _abc
import importlib.machinery as _machinery
import importlib.util as _util
import os as _os
import sys as _sys
import tempfile as _tempfile

__version__ = "0.1.0"

# One import mechanism for the callbacks folder. ``fl_lightning.callbacks`` is the repository's
# top-level ``callbacks/`` folder: an installed wheel holds it as ``fl_lightning/callbacks/``
# (``package-dir`` in pyproject.toml, a build-time mapping); from a source checkout or an
# editable install (this file beside ``callbacks/``) the finder below serves it from that folder.
# The same finder serves the deprecated top-level name ``callbacks`` (``class_path: callbacks.X``
# in old configs) as an alias of ``fl_lightning.callbacks`` with a DeprecationWarning, unless a
# ``callbacks`` of your own is on ``sys.path`` (yours wins). It is first on ``sys.meta_path`` so
# that a checkout on ``PYTHONPATH`` wins over another copy installed in editable mode.
_HERE = _os.path.dirname(_os.path.abspath(__file__))
_CALLBACKS = _os.path.join(_os.path.dirname(_HERE), "callbacks")


class _CallbacksFinder(_abc.MetaPathFinder, _abc.Loader):
    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname == "fl_lightning.callbacks":
            if _os.path.isdir(_os.path.join(_HERE, "callbacks")):  # an installed wheel
                return None
            return _util.spec_from_file_location(
                fullname, _os.path.join(_CALLBACKS, "__init__.py"),
                submodule_search_locations=[_CALLBACKS],
            )
        if fullname == "callbacks":
            mine = _machinery.PathFinder.find_spec(fullname)
            if mine is not None and _os.path.realpath(
                _os.path.dirname(mine.origin or "")
            ) != _os.path.realpath(_CALLBACKS):
                return None  # a ``callbacks`` of the user's own project
        elif not fullname.startswith("callbacks.") or _sys.modules.get("callbacks") is not (
            _sys.modules.get("fl_lightning.callbacks")
        ):
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
        module = importlib.import_module("fl_lightning." + spec.name)
        spec.loader_state = module.__spec__  # the import system overwrites it: put it back
        return module

    def exec_module(self, module):  # noqa: D102
        module.__spec__ = module.__spec__.loader_state


_sys.meta_path.insert(0, _CallbacksFinder())


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
