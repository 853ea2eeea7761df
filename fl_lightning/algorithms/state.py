"""State that survives between rounds: the clients' store (SCAFFOLD's ``c_i``, FedDyn's
``h_i``, ...) and the stateful algorithm base that owns it beside its server state."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from fl_lightning.algorithms.base import Algorithm, ClientResult, LocalContext, Params
from fl_lightning.algorithms.state_file import FileRows, Layout
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
    """Every client's state ``{entry: {name: tensor}}``: in RAM, stacked (one
    ``(rows, *shape)`` tensor per entry and name, one row per client that has state), or, past a
    RAM budget, in a file of the run (:mod:`fl_lightning.algorithms.state_file`).

    In RAM, a client's first :meth:`put` gives it a row (the tensors grow by doubling); later
    puts copy into that row. :meth:`get` returns a copy of the client's rows (on ``device``);
    :meth:`gather` / :meth:`scatter` read and write the rows of many clients
    in one indexed copy per tensor.
    With ``device`` the store lives there (e.g. ``cpu``
    to keep a thousand clients' control variates off the accelerator; on a machine with CUDA the
    CPU tensors are pinned, so reading them to the GPU is an asynchronous copy); without it, it
    lives where the first stored state was computed. The store round-trips through
    :meth:`state_dict` / :meth:`load_state_dict` (one ``{entry: {name: tensor}}`` per client id,
    independent of the row layout), which the module puts into Lightning checkpoints.

    After :meth:`spill_to` (the CLI does it for every fit, under ``<log_dir>/client_state/``),
    a store whose rows would outgrow ``ram_bytes`` moves them to a file and from then on holds
    in RAM only what a call returns: the clients of a round. Its :meth:`state_dict` is then a
    reference to the file's records (an index of 32 bytes per client), not a copy; what it
    refers to is never overwritten while a checkpoint that holds it exists.

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
        self._file: FileRows | None = None
        self._spill: tuple[str, int] | None = None
        self._home: torch.device | None = None  # where the first stored state was computed
        self._shard: tuple[int, int] | None = None  # (rank, world size) under DDP ownership

    def shard(self, rank: int, world_size: int) -> None:
        """Under DDP, hold only the clients rank ``rank`` owns
        (:func:`fl_lightning.distributed.owner`): the others are dropped now (a loaded
        checkpoint holds every client), and :meth:`state_dict` becomes a collective that
        merges every rank's part (:mod:`fl_lightning.sharding`)."""
        from fl_lightning.distributed import owner  # noqa: PLC0415 - distributed imports us

        self._shard = (int(rank), int(world_size)) if world_size > 1 else None
        if self._shard is None:
            return
        keep = [c for c in self.client_ids() if owner(c, world_size) == rank]
        if len(keep) == len(self):
            return
        if self._file is not None:
            self._file.where = {c: self._file.where[c] for c in keep}
            self._file._collect()
            return
        rows = self.gather(keep) if keep else {}
        self._rows, self._data = {}, {}
        if keep:
            self.scatter(keep, rows)

    def client_ids(self) -> list[int]:
        """The ids of the clients with stored state (here), sorted."""
        return sorted(self._file.where if self._file is not None else self._rows)

    def spill_to(self, path: str, ram_bytes: int) -> None:
        """Keep at most ``ram_bytes`` of rows in RAM; beyond, keep every client's state in
        the file ``path`` (created when needed)."""
        self._spill = (os.path.abspath(path), int(ram_bytes))

    @property
    def file(self) -> str | None:
        """The store's own file once its state is kept on disk, else ``None``."""
        return self._file.path if self._file is not None else None

    def __contains__(self, client_id: int) -> bool:
        if self._file is not None:
            return int(client_id) in self._file.where
        return int(client_id) in self._rows

    def __len__(self) -> int:
        return len(self._file.where) if self._file is not None else len(self._rows)

    def stacked(self) -> dict[str, dict[str, Tensor]]:
        """The stacked tensors (``entry -> name -> (capacity, *shape)``); rows of clients that
        never stored state are unused. A store kept on disk reads every client (sorted ids)."""
        if self._file is not None:
            return self.gather(sorted(self._file.where))
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

    def _over_budget(self, state: Mapping[str, Mapping[str, Tensor]], rows: int) -> bool:
        if self._spill is None:
            return False
        return rows * Layout.of(state).nbytes > self._spill[1]

    def _to_file(self, state: Mapping[str, Mapping[str, Tensor]]) -> None:
        """Move every row to the spill file; RAM holds none from now on."""
        assert self._spill is not None
        self._file = FileRows(self._spill[0], Layout.of(state))
        if self._rows:
            ids = list(self._rows)
            rows = torch.tensor([self._rows[c] for c in ids])
            self._file.scatter(ids, {e: {k: v.index_select(0, rows.to(v.device)).cpu()
                                         for k, v in t.items()} for e, t in self._data.items()})
        self._rows, self._data = {}, {}

    def _row(self, client_id: int, state: Mapping[str, Mapping[str, Tensor]]) -> int | None:
        """The client's row, allocated if new; ``None`` when the store just moved to disk."""
        row = self._rows.get(client_id)
        if row is not None:
            return row
        if not self._data:
            if self._over_budget(state, 8):
                self._to_file(state)
                return None
            self._allocate(state, 8)
        capacity = next(iter(next(iter(self._data.values())).values())).shape[0]
        row = len(self._rows)
        if row >= capacity:  # grow by doubling
            if self._over_budget(state, 2 * capacity):
                self._to_file(state)
                return None
            old = self._data
            self._allocate({e: {k: v[0] for k, v in t.items()} for e, t in old.items()},
                           2 * capacity)
            for e, tensors in old.items():
                for k, v in tensors.items():
                    self._data[e][k][:capacity] = v
        self._rows[client_id] = row
        return row

    def _check(self, state: Mapping[str, Mapping[str, Tensor]], batched: bool = False) -> None:
        if self._file is not None:
            self._file.layout.check(state, batched)
            return
        if self._data and (
            set(state) != set(self._data)
            or any(set(state[e]) != set(self._data[e]) for e in state)
        ):
            raise ValueError(
                f"a client's state has entries {sorted(state)} but the store holds "
                f"{sorted(self._data)}: every client must store the same entries"
            )

    def _out(self, t: Tensor, device: torch.device | None) -> Tensor:
        """A tensor read from the file, on ``device`` (else where the store would keep it)."""
        where = device or self.device or self._home
        return t.to(where, non_blocking=True) if where is not None else t

    def get(
        self, client_id: int, default: Callable[[], State], device: torch.device | None = None
    ) -> State:
        """The client's state on ``device`` (a fresh ``default()`` if it has none yet)."""
        if self._file is not None:
            if int(client_id) not in self._file.where:
                return default()
            one = self._file.gather([int(client_id)])
            return {e: {k: self._out(v[0], device) for k, v in t.items()}
                    for e, t in one.items()}
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
        if self._home is None:
            self._home = next(iter(next(iter(state.values())).values())).device
        row = None if self._file is not None else self._row(int(client_id), state)
        if row is None:  # on disk
            self.scatter([client_id], {e: {k: v.unsqueeze(0) for k, v in t.items()}
                                       for e, t in state.items()})
            return
        for entry, tensors in state.items():
            for k, v in tensors.items():
                self._data[entry][k][row].copy_(v.detach())

    def gather(self, client_ids: Sequence[int], device: torch.device | None = None) -> State:
        """The stored state of ``client_ids`` (all must have one), stacked along dimension 0,
        on ``device``: one indexed copy per tensor."""
        missing = [c for c in client_ids if int(c) not in self]
        if missing:
            raise KeyError(f"clients {missing} have no stored state")
        if self._file is not None:
            got = self._file.gather([int(c) for c in client_ids])
            return {e: {k: self._out(v, device) for k, v in t.items()} for e, t in got.items()}
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
        self._check(stacked, batched=True)
        if self._home is None:
            self._home = next(iter(next(iter(stacked.values())).values())).device
        if self._file is None:
            first = {e: {k: v[0] for k, v in t.items()} for e, t in stacked.items()}
            rows = []
            for c in client_ids:
                row = self._row(int(c), first)
                if row is None:
                    break
                rows.append(row)
            if self._file is None:
                for entry, tensors in stacked.items():
                    for k, v in tensors.items():
                        dest = self._data[entry][k]
                        dest.index_copy_(0, torch.tensor(rows, device=dest.device),
                                         v.detach().to(dest.device))
                return
            # moved to disk part way: the rows given so far were moved too; write them all
        self._file.scatter([int(c) for c in client_ids],
                           {e: {k: v.detach().cpu().contiguous() for k, v in t.items()}
                            for e, t in stacked.items()})

    def state_dict(self) -> dict[str, Any]:
        """``{"clients": {id: state}}`` in RAM; on disk, ``{"store": reference}`` (see
        :meth:`~fl_lightning.algorithms.state_file.FileRows.snapshot`). Sharded under DDP
        (:meth:`shard`): a collective, every rank's clients merged
        (:func:`fl_lightning.sharding.gather_store_state`; both keys if ranks differ)."""
        if self._shard is not None:
            from fl_lightning.sharding import gather_store_state  # noqa: PLC0415

            return gather_store_state(self._local_state_dict())
        return self._local_state_dict()

    def _local_state_dict(self) -> dict[str, Any]:
        if self._file is not None:
            return self._file.snapshot()
        return {
            "clients": {
                cid: {e: {k: v[row].clone() for k, v in t.items()} for e, t in self._data.items()}
                for cid, row in self._rows.items()
            }
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ref = state.get("store")
        if ref is not None:
            self._load_reference(ref)
            for k, v in dict(state.get("clients", {})).items():  # a merged DDP state: the
                self.put(int(k), v)                              # ranks that kept RAM rows
            if self._shard is not None:
                self.shard(*self._shard)
            return
        self._rows, self._data = {}, {}
        if self._file is not None:
            self._file.where = {}
            self._file.pins.pop("<loaded>", None)
            self._file._collect()
        for k, v in dict(state.get("clients", {})).items():
            self.put(int(k), v)
        if self._shard is not None:
            self.shard(*self._shard)

    def _load_reference(self, ref: Mapping[str, Any]) -> None:
        layout = Layout.from_plain(ref["layout"])
        self._rows, self._data = {}, {}
        if self._spill is not None:  # keep referring to the files: nothing is read now
            if self._file is None or self._file.layout != layout:
                self._file = FileRows(self._spill[0], layout)
            self._file.load(ref)
            return
        # no file of our own (library use): read every client into RAM
        reader = FileRows(os.devnull, layout)
        reader.load(ref)
        ids = sorted(reader.where)
        if ids:
            self._file = None
            self.scatter(ids, {e: {k: v.to(self.device) if self.device is not None else v
                                   for k, v in t.items()}
                               for e, t in reader.gather(ids).items()})
        reader.close()

    def pin(self, path: str, collect: bool = True) -> None:
        """The checkpoint file ``path`` is being written with the last :meth:`state_dict`:
        what it refers to is kept while the file exists (a no-op in RAM). ``collect``: also
        release the checkpoints whose file is gone (``False`` on a DDP rank that does not
        write the files: it learns of removals from :meth:`unpin` only)."""
        if self._file is not None:
            self._file.sync()
            self._file.pin(path, collect)

    def unpin(self, path: str) -> None:
        """The checkpoint file ``path`` was removed."""
        if self._file is not None:
            self._file.unpin(path)


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
