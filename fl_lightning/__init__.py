"""fl-lightning: federated optimization under data heterogeneity, on PyTorch Lightning."""

import os as _os
import tempfile as _tempfile

__version__ = "0.1.0"


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
