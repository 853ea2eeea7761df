"""Per-client state that survives between rounds (SCAFFOLD's ``c_i``, FedDyn's ``h_i``, ...)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from fl_lightning.errors import ConfigError

__all__ = ["ClientStateStore", "check_state_device"]

Tensors = dict[str, Tensor]
#: One client's state: ``{entry: {parameter name: tensor}}`` (SCAFFOLD ``{"c_i": {...}}``).
State = dict[str, Tensors]


def check_state_device(value: str | None) -> torch.device | None:
    """Parse the ``state_device`` option: ``None`` keeps state where the model lives."""
    if value is None or value == "" or value == "auto":
        return None
    try:
        return torch.device(value)
    except (RuntimeError, TypeError):
        raise ConfigError(
            f"--model.algorithm.state_device={value!r} is not a device: use 'cpu' to keep the "
            "client state off the accelerator, or leave it unset to keep it with the model"
        ) from None


class ClientStateStore:
    """A dictionary ``client_id -> {entry: {name: tensor}}`` with an optional storage device.

    Tensors are moved to ``device`` when stored (e.g. ``cpu`` to keep hundreds of clients'
    control variates off the accelerator) and to the compute device when read. The store
    round-trips through :meth:`state_dict` / :meth:`load_state_dict`, which the module puts into
    Lightning checkpoints.

    Args:
        device: where stored tensors live; ``None`` keeps them where they were computed.

    Example:
        >>> store = ClientStateStore(torch.device("cpu"))
        >>> store.put(3, {"c_i": {"w": torch.ones(2)}})
        >>> store.get(3, lambda: {"c_i": {"w": torch.zeros(2)}})["c_i"]["w"].tolist()
        [1.0, 1.0]
        >>> sorted(store.state_dict()["clients"])
        [3]
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._clients: dict[int, State] = {}

    def __contains__(self, client_id: int) -> bool:
        return int(client_id) in self._clients

    def __len__(self) -> int:
        return len(self._clients)

    def get(
        self, client_id: int, default: Callable[[], State], device: torch.device | None = None
    ) -> State:
        """The client's state on ``device`` (a fresh ``default()`` if it has none yet)."""
        stored = self._clients.get(int(client_id))
        if stored is None:
            return default()
        return {
            entry: {k: v.to(device) if device is not None else v for k, v in tensors.items()}
            for entry, tensors in stored.items()
        }

    def put(self, client_id: int, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Store (a detached copy of) the client's state on the storage device."""
        self._clients[int(client_id)] = {
            entry: {
                k: (v.detach().to(self.device, copy=True) if self.device is not None
                    else v.detach().clone())
                for k, v in tensors.items()
            }
            for entry, tensors in state.items()
        }

    def state_dict(self) -> dict[str, Any]:
        return {"clients": {k: dict(v) for k, v in self._clients.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._clients = {}
        for k, v in dict(state.get("clients", {})).items():
            self.put(int(k), v)
