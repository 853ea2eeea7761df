"""Memory sizes: byte options, what is available, what a model and its clients take.

- :func:`parse_bytes` reads a byte option (``2GiB``, ``500MB``, ``1e9``);
- :func:`available_memory` is what a run may still use: on a GPU the free device memory
  (``torch.cuda.mem_get_info``), on the CPU ``MemAvailable`` of ``/proc/meminfo``, bounded by
  the cgroup's memory limit and the address-space limit (``ulimit -v``, ``prlimit --as``);
- :func:`tensor_bytes`, :func:`activation_bytes` size a model's weights and the activations
  one sample leaves for the backward pass.

The batched engine sizes its chunks with them (``--model.engine.memory_budget``) and the
start-up pre-flight (:mod:`fl_lightning.preflight`) compares its estimate with them.
"""

from __future__ import annotations

import math
import re
import resource
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fl_lightning.validate import invalid

__all__ = ["activation_bytes", "available_memory", "format_bytes", "parse_bytes",
           "tensor_bytes"]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(value: Any, option: str) -> int:
    """A byte count from an int or a string such as ``2GiB``, ``500MB`` or ``1e9``.

    Raises:
        ConfigError: one line naming ``option`` for anything else, or a count <= 0.

    Example:
        >>> parse_bytes("2GiB", "--model.engine.memory_budget")
        2147483648
        >>> parse_bytes(1000, "--x")
        1000
    """
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in _UNITS:
            try:
                number = float(m.group(1)) * _UNITS[m.group(2).lower()]
            except ValueError:
                number = None
    if number is None or not math.isfinite(number) or number < 1:
        raise invalid(option, value, "a byte count >= 1", "e.g. 2GiB, 500MB or 1000000000")
    return int(number)


def format_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit below it, e.g. ``1.5 GiB``."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_room() -> int | None:
    """What the cgroup (v2, then v1) still allows: its limit minus its current usage."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
         "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max" or int(raw) >= 2**60:
                return None
            return max(int(raw) - int(Path(usage_file).read_text().strip()), 0)
        except (OSError, ValueError):
            continue
    return None


def _address_space_room() -> int | None:
    """What the address-space limit (``ulimit -v``) leaves above the current virtual size."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
        used = pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        used = 0
    return max(soft - used, 0)


def available_memory(device: torch.device | str = "cpu") -> tuple[int | None, str]:
    """Bytes a run may still allocate on ``device`` and where that number comes from
    (``None``: unknown). CPU: the smallest of ``MemAvailable``, the cgroup's room and the
    address-space limit's room."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    found = [(v, what) for v, what in (
        (_meminfo_available(), "MemAvailable"), (_cgroup_room(), "the cgroup memory limit"),
        (_address_space_room(), "the address-space limit (ulimit -v)"),
    ) if v is not None]
    if not found:
        return None, "unknown"
    return min(found)


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of ``tensors``."""
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def activation_bytes(net: nn.Module, x: Tensor) -> int:
    """Bytes of every leaf module's output for the batch ``x``: about what a training step
    keeps for its backward pass (an estimate; the forward runs once, in eval mode, without
    gradients)."""
    total = 0

    def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
        nonlocal total
        if isinstance(output, Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in net.modules()
               if not list(m.children())]
    was_training = net.training
    try:
        net.eval()
        net(x)
    finally:
        net.train(was_training)
        for h in handles:
            h.remove()
    return total
