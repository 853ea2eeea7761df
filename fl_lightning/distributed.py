"""Multi-process rounds (Lightning's DDP strategy): clients split across ranks.

Under ``--trainer.strategy ddp`` every rank holds the same global model and computes the same
round plan (a pure function of the seed and the round). Then either:

- **reduce** (a server rule written as sums, :attr:`Algorithm.streamed`, no systems mechanism,
  no callback with ``needs_client_results``): each rank trains its share, commits its clients'
  state and folds their results into the round's sums as the streamed round of one process does;
  one all-reduce of the flattened sums (:func:`allreduce_sums`) gives every rank the totals and
  every rank runs ``finish``. With client state, each client is trained by the rank that holds
  its state (:func:`owner`, :func:`owner_shares`): every client's state lives on one rank only
  (:mod:`fl_lightning.sharding`); without, shares are balanced by longest processing time
  first (:func:`lpt_partition`);
- **gather** (robust aggregators, secure aggregation, DP, compression, attacks, participation,
  ``needs_client_results``, a list-only server rule): every rank receives every client's full
  result (:func:`allgather_results`) and finishes the round exactly as one process would.

Client training uses
``torch.func`` on the bare network, never the DDP wrapper's forward/backward, so no DDP
gradient hook fires (and manual optimization keeps Lightning from syncing anything).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from fl_lightning.algorithms.sums import RoundSums
from fl_lightning.protocol import ClientResult, GatherCost, RoundPlan
from fl_lightning.tensors import flatten

__all__ = [
    "GatherCost",
    "allgather_results",
    "allreduce_sums",
    "local_plan",
    "lpt_partition",
    "merge_skeletons",
    "owner",
    "owner_shares",
    "pack_sums",
    "rank_shares",
    "reduce_round",
    "unpack_sums",
]


def lpt_partition(costs: Sequence[int], world_size: int) -> list[list[int]]:
    """Indices of ``costs`` per rank, balanced by longest processing time first.

    Items are taken in order of decreasing cost (ties: lower index first) and each goes to the
    rank with the least total cost so far (ties: lower rank). Each rank's list is sorted, so
    its clients train in the plan's order. Deterministic: every rank computes the same split.

    Example:
        >>> lpt_partition([5, 3, 3, 2, 1], 2)
        [[0, 4], [1, 2, 3]]
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(costs)), key=lambda i: (-int(costs[i]), i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        loads[rank] += int(costs[i])
        shares[rank].append(i)
    return [sorted(s) for s in shares]


def rank_shares(plan: RoundPlan, world_size: int) -> list[list[int]]:
    """Positions in ``plan.clients`` that each rank trains (cost of a client: its local steps)."""
    return lpt_partition([len(c.batches) for c in plan.clients], world_size)


def local_plan(plan: RoundPlan, rank: int, world_size: int,
               shares: Sequence[Sequence[int]] | None = None) -> RoundPlan:
    """The part of ``plan`` that rank ``rank`` trains (its share in ``shares``, by default
    :func:`rank_shares`)."""
    if world_size == 1:
        return plan
    share = (rank_shares(plan, world_size) if shares is None else shares)[rank]
    return RoundPlan(
        round=plan.round, clients=[plan.clients[i] for i in share], transform=plan.transform,
        num_clients=plan.num_clients, total_samples=plan.total_samples,
    )


def owner(client_id: int, world_size: int) -> int:
    """The rank that holds client ``client_id``'s state and trains it: ``client_id % world_size``
    (a pure function of the id: every rank computes it from the plan alone, a resume with the
    same world size finds every client where it was, and a resume with another one
    redistributes by the same rule; ``docs/scale.md`` says why not a balanced sticky owner)."""
    return int(client_id) % int(world_size)


def owner_shares(plan: RoundPlan, world_size: int) -> list[list[int]]:
    """Positions in ``plan.clients`` that each rank trains when each client is trained by the
    rank that holds its state (:func:`owner`), in plan order."""
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for i, c in enumerate(plan.clients):
        shares[owner(c.client_id, world_size)].append(i)
    return shares


# ---------------------------------------------------------------------- all-reduce of sums
#: the counters every rank adds to the all-reduce beside the sums' own
_COUNTERS = ("kept", "kept_samples", "loss", "finite", "diverged")


def _skeleton(sums: RoundSums) -> dict[str, Any]:
    """What a rank's sums hold: the accumulators' names, shapes and dtypes, the counts and the
    plain-number scalars (a number is summed, a bool or-ed, anything else must be the same on
    every rank, like FedNova's global weights, and is not sent)."""
    return {
        "values": {key: {k: (tuple(v.shape), str(v.dtype)) for k, v in acc.items()}
                   for key, acc in sums.values.items()},
        "counts": sorted(sums.counts),
        "scalars": {k: type(v).__name__ for k, v in sums.scalars.items()
                    if isinstance(v, (bool, int, float))},
    }


def merge_skeletons(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The union of every rank's :func:`_skeleton` (a rank without clients has none of them),
    in one order that every rank computes alike."""
    values: dict[str, dict[str, tuple[tuple[int, ...], str]]] = {}
    scalars: dict[str, str] = {}
    counts: set[str] = set()
    for part in parts:
        for key, acc in part["values"].items():
            values.setdefault(key, {}).update(acc)
        counts.update(part["counts"])
        for name, kind in part["scalars"].items():
            scalars[name] = "float" if scalars.get(name, kind) != kind else kind
    return {
        "values": {key: dict(sorted(values[key].items())) for key in sorted(values)},
        "counts": sorted(counts),
        "scalars": dict(sorted(scalars.items())),
    }


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _counter_dtype(skeleton: Mapping[str, Any]) -> torch.dtype:
    """The dtype that carries the counters: float64 if a sum has it, else float32 (the dtype of
    a float32 model's sums, so that everything travels in one all-reduce; counts are exact up to
    2^24; a half-precision model's sums get a float32 buffer of their own)."""
    dtypes = {_dtype(d) for acc in skeleton["values"].values() for _, d in acc.values()}
    return torch.float64 if torch.float64 in dtypes or not dtypes else torch.float32


def pack_sums(sums: RoundSums, skeleton: Mapping[str, Any], counters: Mapping[str, float],
              device: torch.device) -> dict[torch.dtype, Tensor]:
    """This rank's sums as one flat buffer per dtype, in the ``skeleton``'s order (zeros for
    what this rank has none of), then the sums' client and sample counts, ``counters``
    (``loss``, ``finite``, ``diverged``), the per-key counts and the scalars at the end of the
    counter dtype's."""
    parts: dict[torch.dtype, list[Tensor]] = {}
    for key, acc in skeleton["values"].items():
        mine = sums.values.get(key, {})
        for k, (shape, dt) in acc.items():
            t = mine.get(k)
            dtype = _dtype(dt)
            parts.setdefault(dtype, []).append(
                t.detach().reshape(-1).to(device) if t is not None
                else torch.zeros(int(torch.Size(shape).numel()), dtype=dtype, device=device)
            )
    tail = [float(sums.kept), float(sums.kept_samples)]
    tail += [float(counters.get(c, 0)) for c in _COUNTERS[2:]]
    tail += [float(sums.counts.get(key, 0)) for key in skeleton["counts"]]
    tail += [float(sums.scalars.get(name, 0)) for name in skeleton["scalars"]]
    cdt = _counter_dtype(skeleton)
    parts.setdefault(cdt, []).append(torch.tensor(tail, dtype=cdt, device=device))
    return {dt: torch.cat(ts) for dt, ts in parts.items()}


def unpack_sums(flats: Mapping[torch.dtype, Tensor], skeleton: Mapping[str, Any],
                like: RoundSums) -> tuple[RoundSums, dict[str, float]]:
    """The round's sums from the reduced buffers (names, population and the scalars that are not
    numbers from ``like``, this rank's own sums), and the reduced counters."""
    offsets = dict.fromkeys(flats, 0)
    out = RoundSums(list(like.names), num_clients=like.num_clients,
                    total_samples=like.total_samples)
    for key, acc in skeleton["values"].items():
        out.values[key] = {}
        for k, (shape, dt) in acc.items():
            dtype, n = _dtype(dt), int(torch.Size(shape).numel())
            out.values[key][k] = flats[dtype][offsets[dtype]:offsets[dtype] + n].view(shape)
            offsets[dtype] += n
    cdt = _counter_dtype(skeleton)
    tail = flats[cdt][offsets[cdt]:].tolist()
    counters = dict(zip(_COUNTERS, tail[:len(_COUNTERS)], strict=True))
    tail = tail[len(_COUNTERS):]
    out.kept, out.kept_samples = int(counters["kept"]), int(counters["kept_samples"])
    for key in skeleton["counts"]:
        out.counts[key] = int(tail.pop(0))
    out.scalars = {k: v for k, v in like.scalars.items() if not isinstance(v, (bool, int, float))}
    for name, kind in skeleton["scalars"].items():
        value = tail.pop(0)
        out.scalars[name] = value > 0 if kind == "bool" else int(value) if kind == "int" else value
    return out, counters


def allreduce_sums(
    sums: RoundSums, kept: int, loss: float, num_diverged: int, device: torch.device,
) -> tuple[RoundSums, Tensor, int, int, int]:
    """Every rank's round sums added together: each rank folded its own kept clients into
    ``sums`` (:meth:`~fl_lightning.algorithms.base.Algorithm.fold`, as the streamed round of one
    process does); one small ``all_gather_object`` of what the sums hold (names, shapes, a few
    hundred bytes: a rank without clients holds nothing) and one sum all-reduce per dtype of
    the flat buffer ``[sums..., kept, kept samples, loss sum, clients, diverged, counts,
    scalars]`` (one all-reduce: every built-in rule keeps its sums in the model's dtype) give
    every rank the same totals; ``finish`` then runs on every rank.

    Args:
        sums: this rank's sums (of its kept clients, in plan order).
        kept: this rank's kept (finite) clients.
        loss: the sum of the training losses of this rank's kept clients.
        num_diverged: this rank's non-finite clients (left out of ``sums``).
        device: where the buffers live (the model's device: NCCL reduces GPU tensors).

    Returns:
        ``(sums over every rank, mean loss of every kept client, diverged clients, all
        clients, bytes this rank contributed to the all-reduce)``.
    """
    world = dist.get_world_size()
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, _skeleton(sums))
    skeleton = merge_skeletons(everyone)
    counters = {"loss": loss, "finite": kept, "diverged": num_diverged}
    flats = pack_sums(sums, skeleton, counters, device)
    for dt in sorted(flats, key=str):
        dist.all_reduce(flats[dt], op=dist.ReduceOp.SUM)
    total, counters = unpack_sums(flats, skeleton, sums)
    nbytes = sum(f.numel() * f.element_size() for f in flats.values())
    finite, diverged = int(counters["finite"]), int(counters["diverged"])
    mean_loss = torch.tensor(counters["loss"] / max(finite, 1))
    return total, mean_loss, diverged, finite + diverged, nbytes


def reduce_round(algorithm: Any, sink: Any, global_params: Mapping[str, Tensor],
                 device: torch.device, screen: Any) -> tuple[Any, Tensor, GatherCost]:
    """A reduced DDP round's combine: :func:`allreduce_sums` of this rank's
    :class:`~fl_lightning.stream.ResultSink`, the ``on_nonfinite`` policy on every rank's
    counts (``screen``: :func:`fl_lightning.round.screen_nonfinite` with the round's policy; it
    raises to stop every rank alike), then the server rule's ``finish`` on every rank.

    Returns:
        ``(aggregate or None when no rank kept a client, mean training loss, cost)``.
    """
    sums, loss, num_bad, num_all, nbytes = allreduce_sums(
        sink.sums, len(sink.kept), sum(float(r.loss) for r in sink.kept), len(sink.skipped),
        device,
    )
    if num_bad:  # this rank's first non-finite client, if it had one, names the failure
        bad = [sink.first_bad] if sink.first_bad is not None else []
        screen(bad, finite=[False] * len(bad), num_bad=num_bad, num_all=num_all)
    aggregate = algorithm.finish(sums, global_params) if num_all > num_bad else None
    return aggregate, loss, GatherCost(reduce_bytes=nbytes)


# ---------------------------------------------------------------------- all-gather of results
class _Leaf(NamedTuple):
    """Where a tensor of a packed client result lies in its rank's flat buffer of its dtype."""

    dtype: torch.dtype
    offset: int
    shape: tuple[int, ...]
    on_cpu: bool  # kept on the CPU by its owner (e.g. a ``state_device: cpu`` store)


def _pack(value: Any, leaves: dict[torch.dtype, list[Tensor]], sizes: dict[torch.dtype, int]):
    """``value`` with every tensor replaced by a :class:`_Leaf` (the tensor goes to ``leaves``)."""
    if isinstance(value, Tensor):
        t = value.detach()
        offset = sizes.get(t.dtype, 0)
        leaves.setdefault(t.dtype, []).append(t)
        sizes[t.dtype] = offset + t.numel()
        return _Leaf(t.dtype, offset, tuple(t.shape), t.device.type == "cpu")
    if isinstance(value, Mapping):
        return {k: _pack(v, leaves, sizes) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_pack(v, leaves, sizes) for v in value)
    return value  # plain Python (float, int, str, None): travels in the pickled skeleton


def _unpack(skeleton: Any, buffers: Mapping[torch.dtype, Tensor], device: torch.device) -> Any:
    if isinstance(skeleton, _Leaf):
        n = 1
        for d in skeleton.shape:
            n *= d
        t = buffers[skeleton.dtype][skeleton.offset:skeleton.offset + n].view(skeleton.shape)
        return t.to("cpu") if skeleton.on_cpu and device.type != "cpu" else t
    if isinstance(skeleton, Mapping):
        return {k: _unpack(v, buffers, device) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_unpack(v, buffers, device) for v in skeleton)
    return skeleton


def allgather_results(
    results: Sequence[ClientResult], shares: Sequence[Sequence[int]], device: torch.device,
) -> tuple[list[ClientResult], GatherCost]:
    """Every rank's client results, on every rank, in the order of the round plan.

    ``shares[r]`` are the plan positions that rank ``r`` trained (:func:`rank_shares`) and
    ``results`` this rank's results for its share, in that order. Each result is split into a
    small skeleton (ids, sizes, step counts, the names, shapes and dtypes of its tensors, and
    any plain-Python value such as FedNova's effective step count) and its tensors (weights,
    ``state``, ``extras``, the loss). The skeletons travel in one ``all_gather_object``; the
    tensors of a rank go into one flat buffer per dtype, padded to the longest rank's, and one
    ``all_gather`` per dtype copies them bit for bit. So every rank then holds exactly the
    results one process would have, and the round continues as in one process: the same
    divergence check, state commits, server rule and systems mechanisms, in the same order.

    Cost per round and rank: ``world_size * max_r(sum over rank r's clients of their tensor
    bytes)`` received (see :class:`GatherCost`), i.e. about ``K * (1 + state + extras) * P``
    values for ``K`` sampled clients and a model of ``P`` values, versus ``P`` for the one
    all-reduce of the weighted mean (:func:`allreduce_average`).
    """
    world = dist.get_world_size()
    rank = dist.get_rank()
    leaves: dict[torch.dtype, list[Tensor]] = {}
    sizes: dict[torch.dtype, int] = {}
    skeletons = [
        _pack({f.name: getattr(r, f.name) for f in dataclasses.fields(r)}, leaves, sizes)
        for r in results
    ]
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, (skeletons, sizes))
    if [len(s) for s, _ in everyone] != [len(s) for s in shares]:
        raise RuntimeError(
            f"ranks returned {[len(s) for s, _ in everyone]} client results for shares of "
            f"{[len(s) for s in shares]} clients"
        )
    dtypes = sorted({dt for _, sz in everyone for dt in sz}, key=str)
    cost = GatherCost()
    gathered: list[dict[torch.dtype, Tensor]] = [{} for _ in range(world)]
    for dt in dtypes:
        longest = max(sz.get(dt, 0) for _, sz in everyone)
        buf = torch.zeros(longest, dtype=dt, device=device)
        if dt in leaves:
            buf[:sizes[dt]] = flatten(t.to(device) for t in leaves[dt])
        parts = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf)
        itemsize = buf.element_size()
        cost.tensor_bytes += world * longest * itemsize
        cost.payload_bytes += sum(sz.get(dt, 0) for _, sz in everyone) * itemsize
        for r in range(world):
            gathered[r][dt] = parts[r]
    ordered: list[ClientResult | None] = [None] * sum(len(s) for s in shares)
    for r, (skels, _) in enumerate(everyone):
        for pos, skel, mine in zip(shares[r], skels, results if r == rank else skels,
                                   strict=True):
            ordered[pos] = mine if r == rank else ClientResult(
                **_unpack(skel, gathered[r], device)
            )
    return [r for r in ordered if r is not None], cost
