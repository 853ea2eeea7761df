"""Client state sharded across DDP ranks: each client's state is held by one rank only.

When a DDP round reduces the sums of its server rule (:meth:`FederatedRound.owns_state
<fl_lightning.round.FederatedRound.owns_state>`), client ``c`` is trained by rank
:func:`~fl_lightning.distributed.owner` ``(c) = c % world_size`` and only that rank commits its
state. :func:`shard_stores` tells every :class:`~fl_lightning.algorithms.state.ClientStateStore`
of the algorithm its rank: the store drops the clients another rank owns (a checkpoint loaded
on every rank holds all of them) and its :meth:`~ClientStateStore.state_dict` becomes a
collective that gives every rank (rank 0 writes the checkpoint) the state of every rank's
clients (:func:`gather_store_state`):

- a store kept on disk contributes its index (32 bytes per client; the records stay in the
  rank's own ``<store>.rank<r>.bin``), and the merged index refers to every rank's file;
- a store in RAM (under ``--client_state_ram_mb``, or library use without a run folder)
  contributes its clients' state itself: nothing else would survive the rank.

So a checkpoint written under DDP has the layout of one process's and resumes anywhere: in one
process, under the same world size (every rank keeps its own clients again) or under another
(every rank keeps the clients the new rule gives it, reading the other ranks' files, which all
ranks of one machine can read).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["gather_store_state", "merge_store_states", "shard_stores"]


def shard_stores(algorithm: Any, rank: int, world_size: int) -> None:
    """Every client store reachable from ``algorithm`` keeps only rank ``rank``'s clients."""
    from types import SimpleNamespace  # noqa: PLC0415

    from fl_lightning.statefiles import client_stores  # noqa: PLC0415 - imports Lightning

    for store in client_stores(SimpleNamespace(algorithm=algorithm)).values():
        store.shard(rank, world_size)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def gather_store_state(local: Mapping[str, Any]) -> dict[str, Any]:
    """Every rank's store state (``local``: this rank's :meth:`ClientStateStore.state_dict`
    of the clients it owns) merged, on every rank (one ``all_gather_object``)."""
    import torch.distributed as dist  # noqa: PLC0415

    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, _to_cpu(dict(local)))
    return merge_store_states(everyone)


def merge_store_states(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One store state from the states of disjoint shards: the clients kept in RAM as
    ``{"clients": {id: state}}``, those kept in files as one ``{"store": reference}`` whose
    index (sorted by client) refers to every shard's files; both when the shards differ."""
    clients: dict[int, Any] = {}
    refs = []
    for part in parts:
        clients.update(part.get("clients", {}))
        if part.get("store") is not None:
            refs.append(part["store"])
    out: dict[str, Any] = {}
    if refs:
        out["store"] = _merge_refs(refs)
    if clients or not refs:
        out["clients"] = {c: clients[c] for c in sorted(clients)}
    return out


def _merge_refs(refs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    files: list[str] = []
    uids: list[str] = []
    ids, fno, slot, crc = [], [], [], []
    for ref in refs:
        if ref["layout"] != refs[0]["layout"]:
            raise ValueError("DDP ranks hold client state of different layouts: every rank "
                             "must run the same algorithm")
        number = []
        for path, uid in zip(ref["files"], ref["uids"], strict=True):
            if uid not in uids:
                files.append(str(path))
                uids.append(str(uid))
            number.append(uids.index(uid))
        ids += ref["clients"].tolist()
        fno += [number[f] for f in ref["file"].tolist()]
        slot += ref["record"].tolist()
        crc += ref["crc"].tolist()
    order = sorted(range(len(ids)), key=ids.__getitem__)
    return {
        "format": refs[0]["format"], "layout": refs[0]["layout"], "files": files, "uids": uids,
        **{key: torch.tensor([col[i] for i in order], dtype=torch.int64)
           for key, col in (("clients", ids), ("file", fno), ("record", slot), ("crc", crc))},
    }
