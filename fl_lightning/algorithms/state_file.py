"""Client state on disk: fixed-size records in a file, read and written with ``preadv`` /
``pwritev``, never memory-mapped.

Why not ``numpy.memmap`` or ``torch.from_file(shared=True)``: pages of a mapped file count in
the process's resident set while they stay mapped, so a store of 20,000 SCAFFOLD clients
(15 GB for the 2NN) would show up as RSS once every client has been visited. With explicit
reads and writes the file's pages live in the kernel's page cache (reclaimable, not RSS) and
the process holds only what a round asks for: one buffer per tensor for the round's clients.
The page cache also makes a second read of a recently written client a memory copy, so no
cache of our own is kept. tensordict's memory-mapped tensors would map the file too (and pin
their own PyTorch).

A :class:`StateFile` is a 4,096-byte header (magic, a random id, the record size) followed by
records; record ``s`` holds one client's state, every tensor's bytes back to back in the
:class:`Layout` order. :class:`FileRows` is the store over such files: file 0 is this run's own
(written), the others are earlier runs' files that a loaded checkpoint refers to (only read).
A record that a kept checkpoint refers to is never written again (copy on write: the client's
next state goes to a free record); records are reused once no kept checkpoint and no client
refers to them, so the file stays at (clients + records held by kept checkpoints) records.
Every record has a CRC-32 in the index, checked on every read.
"""

from __future__ import annotations

import os
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fl_lightning.errors import ConfigError

__all__ = ["FileRows", "Layout", "StateFile", "StateFileError"]

State = dict[str, dict[str, Tensor]]
HEADER = 4096
MAGIC = b"FLSTATE1"


class StateFileError(ConfigError):
    """A client-state file that a checkpoint refers to is missing, truncated or damaged."""


def _bytes(t: Tensor) -> Any:
    """The bytes of a contiguous CPU tensor, as a writable buffer (no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a client-state layout")
    return dtype


@dataclass(frozen=True)
class Layout:
    """What one record holds: ``(entry, name, shape, dtype)`` per tensor, in record order."""

    fields: tuple[tuple[str, str, tuple[int, ...], torch.dtype], ...]

    @classmethod
    def of(cls, state: Mapping[str, Mapping[str, Tensor]], batched: bool = False) -> Layout:
        """The layout of one client's ``state`` (``batched``: of row 0 of stacked tensors)."""
        return cls(tuple(
            (e, k, tuple(v.shape[1:] if batched else v.shape), v.dtype)
            for e, tensors in state.items() for k, v in tensors.items()
        ))

    @property
    def nbytes(self) -> int:
        return sum(_numel(s) * torch.empty((), dtype=d).element_size()
                   for _, _, s, d in self.fields)

    def plain(self) -> list[list[Any]]:
        return [[e, k, list(s), str(d)] for e, k, s, d in self.fields]

    @classmethod
    def from_plain(cls, fields: Sequence[Sequence[Any]]) -> Layout:
        return cls(tuple((str(e), str(k), tuple(int(n) for n in s), _dtype(str(d)))
                         for e, k, s, d in fields))

    def check(self, state: Mapping[str, Mapping[str, Tensor]], batched: bool = False) -> None:
        other = Layout.of(state, batched)
        if other != self:
            mine = {(e, k): (s, d) for e, k, s, d in self.fields}
            theirs = {(e, k): (s, d) for e, k, s, d in other.fields}
            if mine.keys() != theirs.keys():
                raise ValueError(
                    f"a client's state has entries {sorted({e for e, _ in theirs})} but the "
                    f"store holds {sorted({e for e, _ in mine})}: every client must store the "
                    "same entries"
                )
            (e, k), (s, d) = next((key, v) for key, v in theirs.items() if mine[key] != v)
            raise ValueError(
                f"a client's state {e}/{k} is {list(s)} {d} but the store holds "
                f"{list(mine[(e, k)][0])} {mine[(e, k)][1]}: every client must store the same "
                "shapes and dtypes"
            )

    def empty(self, rows: int) -> State:
        out: State = {}
        for e, k, s, d in self.fields:
            out.setdefault(e, {})[k] = torch.empty((rows, *s), dtype=d)
        return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class StateFile:
    """One file of fixed-size records after a header (magic, id, record size)."""

    def __init__(self, path: str, uid: str, record: int, fd: int, writable: bool) -> None:
        self.path, self.uid, self.record, self.fd, self.writable = path, uid, record, fd, writable

    @classmethod
    def create(cls, path: str, record: int) -> StateFile:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        uid = uuid.uuid4()
        header = MAGIC + uid.bytes + record.to_bytes(8, "little")
        os.pwrite(fd, header.ljust(HEADER, b"\0"), 0)
        return cls(path, uid.hex, record, fd, writable=True)

    @classmethod
    def open(cls, path: str, uid: str, record: int, records: int) -> StateFile:
        """Open an earlier run's file for reading; it must hold ``records`` records."""
        what = ("a checkpoint's client state is kept in its run folder's client_state/, not "
                "in the .ckpt, so a checkpoint copied without that folder cannot resume; resume "
                "from a checkpoint whose run folder is complete, or copy that folder back")
        if not os.path.isfile(path):
            raise StateFileError(f"client-state file {path} does not exist ({what})")
        fd = os.open(path, os.O_RDONLY)
        header = os.pread(fd, HEADER, 0)
        size = os.fstat(fd).st_size
        if header[:8] != MAGIC or header[8:24] != bytes.fromhex(uid) or int.from_bytes(
            header[24:32], "little"
        ) != record:
            os.close(fd)
            raise StateFileError(
                f"client-state file {path} is not the one the checkpoint was written with "
                f"(another run's or a damaged file; {what})"
            )
        if size < HEADER + records * record:
            os.close(fd)
            raise StateFileError(
                f"client-state file {path} is truncated ({size} bytes, the checkpoint needs "
                f"{HEADER + records * record}; {what})"
            )
        return cls(path, uid, record, fd, writable=False)

    def write(self, slot: int, buffers: Sequence[Any]) -> int:
        """Write one record; return its CRC-32."""
        n = os.pwritev(self.fd, buffers, HEADER + slot * self.record)
        if n != self.record:
            raise OSError(f"short write to {self.path}: {n} of {self.record} bytes")
        crc = 0
        for b in buffers:
            crc = zlib.crc32(b, crc)
        return crc

    def read(self, slot: int, buffers: Sequence[Any], crc: int, client: int) -> None:
        n = os.preadv(self.fd, buffers, HEADER + slot * self.record)
        got = 0
        for b in buffers:
            got = zlib.crc32(b, got)
        if n != self.record or got != crc:
            raise StateFileError(
                f"client-state file {self.path}: client {client}'s record {slot} "
                + ("is cut short" if n != self.record else "fails its checksum")
                + " (the file was changed or damaged after it was written; nothing was written "
                "to it): resume from an older checkpoint, or restore the file"
            )

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __getstate__(self) -> None:
        # a copy would share the descriptor and close it twice
        raise TypeError(f"the client-state file {self.path} is open: a store on disk cannot be "
                        "copied or pickled; copy its state_dict() instead")


class FileRows:
    """Every client's state in :class:`StateFile` records (see the module docstring).

    Args:
        path: this store's own file (created on the first write).
        layout: what one record holds.
    """

    def __init__(self, path: str, layout: Layout) -> None:
        self.path = os.path.abspath(path)
        self.layout = layout
        self.files: list[StateFile | None] = [None]  # 0: own file, created on first write
        self.where: dict[int, tuple[int, int, int]] = {}  # client -> (file, record, crc)
        self.used = 0  # records allocated in the own file
        self.free: list[int] = []
        self.pins: dict[str, frozenset[int]] = {}  # checkpoint path -> own records it uses
        self.pending: frozenset[int] = frozenset()  # the last snapshot, not yet saved
        self.frozen: set[int] = set()

    # ------------------------------------------------------------------ reading
    def _buffers(self, out: State, row: int) -> list[Any]:
        return [_bytes(out[e][k][row]) for e, k, _, _ in self.layout.fields]

    def gather(self, clients: Sequence[int]) -> State:
        """Stacked CPU tensors, row ``i`` = client ``clients[i]``."""
        out = self.layout.empty(len(clients))
        for i, c in enumerate(clients):
            f, slot, crc = self.where[int(c)]
            file = self.files[f]
            assert file is not None
            file.read(slot, self._buffers(out, i), crc, int(c))
        return out

    # ------------------------------------------------------------------ writing
    def _own(self) -> StateFile:
        own = self.files[0]
        if own is None:
            own = self.files[0] = StateFile.create(self.path, self.layout.nbytes)
        return own

    def _slot(self, client: int) -> int:
        f, slot, _ = self.where.get(client, (-1, -1, 0))
        if f == 0 and slot not in self.frozen:
            return slot  # no kept checkpoint refers to it: write in place
        if self.free:
            return self.free.pop()
        self.used += 1
        return self.used - 1

    def scatter(self, clients: Sequence[int], stacked: State) -> None:
        """Write row ``i`` of the stacked CPU tensors as client ``clients[i]``'s state."""
        own = self._own()
        for i, c in enumerate(clients):
            slot = self._slot(int(c))
            self.where[int(c)] = (0, slot, own.write(slot, self._buffers(stacked, i)))

    # ------------------------------------------------------------------ checkpoints
    def snapshot(self) -> dict[str, Any]:
        """The index as a checkpoint entry (a few tensors: 32 bytes per client). Its own
        records are frozen until :meth:`pin` names the checkpoint file and that file is
        removed, or the next snapshot replaces this one unsaved."""
        ids = sorted(self.where)
        files = sorted({self.where[c][0] for c in ids})
        number = {f: i for i, f in enumerate(files)}
        rows = [self.where[c] for c in ids]
        self.pending = frozenset(s for f, s, _ in rows if f == 0)
        self._collect()
        kept = [self._own() if f == 0 else self.files[f] for f in files]
        return {"store": {
            "format": 1,
            "layout": self.layout.plain(),
            "files": [k.path for k in kept if k is not None],
            "uids": [k.uid for k in kept if k is not None],
            "clients": torch.tensor(ids, dtype=torch.int64),
            "file": torch.tensor([number[f] for f, _, _ in rows], dtype=torch.int64),
            "record": torch.tensor([s for _, s, _ in rows], dtype=torch.int64),
            "crc": torch.tensor([c for _, _, c in rows], dtype=torch.int64),
        }}

    def load(self, ref: Mapping[str, Any]) -> None:
        """Refer to a snapshot's records (read lazily, never written)."""
        ids, fno, slot, crc = (ref[k].tolist() for k in ("clients", "file", "record", "crc"))
        record = self.layout.nbytes
        own = self.files[0]
        numbers = []
        for i, (path, uid) in enumerate(zip(ref["files"], ref["uids"], strict=True)):
            if own is not None and uid == own.uid:
                numbers.append(0)
                continue
            need = 1 + max((s for f, s in zip(fno, slot, strict=True) if f == i), default=-1)
            self.files.append(StateFile.open(str(path), str(uid), record, need))
            numbers.append(len(self.files) - 1)
        self.where = {int(c): (numbers[f], int(s), int(r))
                      for c, f, s, r in zip(ids, fno, slot, crc, strict=True)}
        # records of the own file that the loaded snapshot uses stay as they are
        self.pins["<loaded>"] = frozenset(s for f, s, _ in self.where.values() if f == 0)
        self._collect()

    def pin(self, path: str, collect: bool = True) -> None:
        """The last snapshot is being saved as ``path``: keep its records while it exists
        (``collect``: forget the pins of checkpoint files that no longer exist)."""
        if collect:
            self.pins = {p: s for p, s in self.pins.items()
                         if p == "<loaded>" or os.path.exists(p)}
        self.pins[os.path.abspath(path)] = self.pending
        self.pending = frozenset()
        self._collect()

    def unpin(self, path: str) -> None:
        if self.pins.pop(os.path.abspath(path), None) is not None:
            self._collect()

    def _collect(self) -> None:
        """Recompute the frozen and the free records of the own file."""
        frozen: set[int] = set(self.pending)
        for slots in self.pins.values():
            frozen |= slots
        live = {s for f, s, _ in self.where.values() if f == 0}
        self.frozen = frozen
        self.free = sorted((set(range(self.used)) - frozen - live), reverse=True)

    def sync(self) -> None:
        """Flush the own file to disk (before a checkpoint that refers to it is written)."""
        own = self.files[0]
        if own is not None:
            os.fsync(own.fd)

    def close(self) -> None:
        for f in self.files:
            if f is not None:
                f.close()

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order
        try:
            self.close()
        except Exception:  # noqa: BLE001
            pass

