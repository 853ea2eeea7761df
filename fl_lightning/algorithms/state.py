"""State that survives between rounds: the clients' store (SCAFFOLD's ``c_i``, FedDyn's
``h_i``, ...) and the stateful algorithm base that owns it beside its server state."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext, Params
from fl_lightning.errors import ConfigError

__all__ = ["ClientStateStore", "StatefulAlgorithm", "check_state_device"]

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


def _copy_to(t: Tensor, device: torch.device | None) -> Tensor:
    """A copy of ``t`` on ``device`` (a later write to the store never changes it)."""
    if device is not None and t.device != device:
        return t.to(device, non_blocking=True)
    return t.clone()


class ClientStateStore:
    """Every client's state ``{entry: {name: tensor}}``, stacked: one ``(rows, *shape)`` tensor
    per entry and name, one row per client that has state.

    A client's first :meth:`put` gives it a row (the tensors grow by doubling); later puts copy
    into that row. :meth:`get` returns a copy of the client's rows (on ``device``);
    :meth:`gather` / :meth:`scatter` read and write the rows of many clients
    in one indexed copy per tensor.
    With ``device`` the store lives there (e.g. ``cpu``
    to keep a thousand clients' control variates off the accelerator; on a machine with CUDA the
    CPU tensors are pinned, so reading them to the GPU is an asynchronous copy); without it, it
    lives where the first stored state was computed. The store round-trips through
    :meth:`state_dict` / :meth:`load_state_dict` (one ``{entry: {name: tensor}}`` per client id,
    independent of the row layout), which the module puts into Lightning checkpoints.

    Args:
        device: where stored tensors live; ``None`` keeps them where they were computed.

    Example:
        >>> store = ClientStateStore(torch.device("cpu"))
        >>> store.put(3, {"c_i": {"w": torch.ones(2)}})
        >>> store.get(3, lambda: {"c_i": {"w": torch.zeros(2)}})["c_i"]["w"].tolist()
        [1.0, 1.0]
        >>> sorted(store.state_dict()["clients"])
        [3]
        >>> store.stacked()["c_i"]["w"].shape  # room for more clients, one row used
        torch.Size([8, 2])
    """

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._rows: dict[int, int] = {}
        self._data: dict[str, dict[str, Tensor]] = {}

    def __contains__(self, client_id: int) -> bool:
        return int(client_id) in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def stacked(self) -> dict[str, dict[str, Tensor]]:
        """The stacked tensors (``entry -> name -> (capacity, *shape)``); rows of clients that
        never stored state are unused."""
        return self._data

    def _allocate(self, state: Mapping[str, Mapping[str, Tensor]], rows: int) -> None:
        pin = (self.device is not None and self.device.type == "cpu"
               and torch.cuda.is_available())
        self._data = {
            entry: {
                k: torch.zeros((rows, *v.shape), dtype=v.dtype,
                               device=self.device if self.device is not None else v.device,
                               pin_memory=pin)
                for k, v in tensors.items()
            }
            for entry, tensors in state.items()
        }

    def _row(self, client_id: int, state: Mapping[str, Mapping[str, Tensor]]) -> int:
        row = self._rows.get(client_id)
        if row is not None:
            return row
        if not self._data:
            self._allocate(state, 8)
        capacity = next(iter(next(iter(self._data.values())).values())).shape[0]
        row = len(self._rows)
        if row >= capacity:  # grow by doubling
            old = self._data
            self._allocate({e: {k: v[0] for k, v in t.items()} for e, t in old.items()},
                           2 * capacity)
            for e, tensors in old.items():
                for k, v in tensors.items():
                    self._data[e][k][:capacity] = v
        self._rows[client_id] = row
        return row

    def _check(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        if self._data and (
            set(state) != set(self._data)
            or any(set(state[e]) != set(self._data[e]) for e in state)
        ):
            raise ValueError(
                f"a client's state has entries {sorted(state)} but the store holds "
                f"{sorted(self._data)}: every client must store the same entries"
            )

    def get(
        self, client_id: int, default: Callable[[], State], device: torch.device | None = None
    ) -> State:
        """The client's state on ``device`` (a fresh ``default()`` if it has none yet)."""
        row = self._rows.get(int(client_id))
        if row is None:
            return default()
        return {
            entry: {k: _copy_to(v[row], device) for k, v in tensors.items()}
            for entry, tensors in self._data.items()
        }

    @torch.no_grad()
    def put(self, client_id: int, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Store (a copy of) the client's state in its row on the storage device."""
        self._check(state)
        row = self._row(int(client_id), state)
        for entry, tensors in state.items():
            for k, v in tensors.items():
                self._data[entry][k][row].copy_(v.detach())

    def gather(self, client_ids: Sequence[int], device: torch.device | None = None) -> State:
        """The stored state of ``client_ids`` (all must have one), stacked along dimension 0,
        on ``device``: one indexed copy per tensor."""
        missing = [c for c in client_ids if int(c) not in self._rows]
        if missing:
            raise KeyError(f"clients {missing} have no stored state")
        first = next(iter(next(iter(self._data.values())).values()))
        rows = torch.tensor([self._rows[int(c)] for c in client_ids], device=first.device)
        return {
            entry: {
                k: (v.index_select(0, rows).to(device, non_blocking=True) if device is not None
                    else v.index_select(0, rows))
                for k, v in tensors.items()
            }
            for entry, tensors in self._data.items()
        }

    @torch.no_grad()
    def scatter(self, client_ids: Sequence[int], stacked: Mapping[str, Mapping[str, Tensor]]):
        """Store row ``i`` of every ``stacked`` tensor as client ``client_ids[i]``'s state."""
        self._check(stacked)
        rows = [self._row(int(c), {e: {k: v[0] for k, v in t.items()}
                                   for e, t in stacked.items()}) for c in client_ids]
        for entry, tensors in stacked.items():
            for k, v in tensors.items():
                dest = self._data[entry][k]
                dest.index_copy_(0, torch.tensor(rows, device=dest.device),
                                 v.detach().to(dest.device))

    def state_dict(self) -> dict[str, Any]:
        return {
            "clients": {
                cid: {e: {k: v[row].clone() for k, v in t.items()} for e, t in self._data.items()}
                for cid, row in self._rows.items()
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._rows, self._data = {}, {}
        for k, v in dict(state.get("clients", {})).items():
            self.put(int(k), v)


class StatefulAlgorithm(Algorithm):
    """An algorithm with state between rounds: it owns the clients' store and its server state.

    The store (:attr:`clients`, a :class:`ClientStateStore`) holds every client's entries named
    in :attr:`~fl_lightning.algorithms.base.Algorithm.client_state`; :meth:`commit_client`
    writes a kept client's ``result.state`` into it and :meth:`stored` reads a client's state in
    :meth:`~fl_lightning.algorithms.base.Algorithm.client_begin`. The server state is declared
    like torchmetrics' ``add_state``: :attr:`server_state` names the attributes that hold it
    (each ``None`` until :meth:`~fl_lightning.algorithms.base.Algorithm.init_server` creates
    it, then a ``{param: tensor}`` dict), read with :meth:`server`. Nothing creates server
    state anywhere else.

    :meth:`state_dict` keeps the two apart: ``{"server": {name: value}, "clients":
    store.state_dict()}``; :meth:`load_state_dict` also reads the layout of checkpoints written
    before (server entries at the top level beside ``"clients"``).

    Attributes:
        server_state: names of the attributes that hold server state (SCAFFOLD: ``("c",)``).
        clients: the client state store.

    Args:
        state_device: where the clients' state is kept between rounds (e.g. ``cpu``); unset
            keeps it with the model.
    """

    server_state: ClassVar[tuple[str, ...]] = ()

    def __init__(self, state_device: str | None = None) -> None:
        self.clients = ClientStateStore(check_state_device(state_device))
        for name in self.server_state:
            setattr(self, name, None)

    def server(self, name: str, global_params: Params) -> Params:
        """The server state ``name``. The round creates it with :meth:`init_server` before the
        first round; code that drives an engine without the round (a unit test, a benchmark)
        gets that same call here, with the global weights it trains from, if nothing made
        the state yet.

        Raises:
            RuntimeError: if :meth:`init_server` does not create it.
        """
        if getattr(self, name) is None:
            self.init_server(global_params)
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(
                f"{type(self).__name__}.init_server did not create its declared server state "
                f"{name!r}: set self.{name} to a dict of tensors there"
            )
        return value

    def stored(self, ctx: LocalContext, default: Callable[[], State]) -> State:
        """The client ``ctx.client_id``'s stored state (``default()`` if it has none yet) on
        the device of the global weights."""
        device = next(iter(ctx.global_params.values())).device
        return self.clients.get(ctx.client_id, default, device)

    def commit_client(self, result: ClientResult) -> None:
        """Store ``result.state`` (if any) as the client's state."""
        if result.state:
            self.clients.put(result.client_id, result.state)

    def server_state_dict(self) -> dict[str, Any]:
        return {n: getattr(self, n) for n in self.server_state if getattr(self, n) is not None}

    def state_dict(self) -> dict[str, Any]:
        return {
            "server": {n: getattr(self, n) for n in self.server_state},
            "clients": self.clients.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, or the older flat layout
        ``{name: value, ..., "clients": ...}``; a server entry that is absent becomes
        ``None`` (:meth:`init_server` then creates it)."""
        if "server" in state:
            server = state["server"]
        else:
            server = {k: v for k, v in state.items() if k != "clients"}
        for name in self.server_state:
            setattr(self, name, server.get(name))
        self.clients.load_state_dict(state.get("clients", {}))
