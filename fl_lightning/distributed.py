"""Multi-process rounds (Lightning's DDP strategy): clients split across ranks.

Under ``--trainer.strategy ddp`` every rank holds the same global model and computes the same
round plan (a pure function of the seed and the round). Each rank trains a share of the
sampled clients chosen by longest-processing-time-first balancing (:func:`lpt_partition`).
Then either a single all-reduce of one flat buffer of the data-size weighted weights gives
every rank the same mean (:func:`allreduce_average`; stateless algorithms with the weighted
mean as server rule, no systems mechanism), or every rank receives every client's full result
(:func:`allgather_results`) and finishes the round exactly as one process would (client state,
custom server rules, systems mechanisms; ``docs/scale.md``). Client training uses
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

from fl_lightning.protocol import ClientResult, GatherCost, Params, RoundPlan
from fl_lightning.tensors import flatten

__all__ = [
    "GatherCost",
    "allgather_results",
    "allreduce_average",
    "local_plan",
    "lpt_partition",
    "rank_shares",
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


def local_plan(plan: RoundPlan, rank: int, world_size: int) -> RoundPlan:
    """The part of ``plan`` that rank ``rank`` trains (its share in :func:`rank_shares`)."""
    if world_size == 1:
        return plan
    share = rank_shares(plan, world_size)[rank]
    return RoundPlan(
        round=plan.round, clients=[plan.clients[i] for i in share], transform=plan.transform,
        num_clients=plan.num_clients, total_samples=plan.total_samples,
    )


def allreduce_average(
    global_params: Params, results: Sequence[ClientResult], num_diverged: int = 0
) -> tuple[Params | None, Tensor, int, int]:
    """The weighted average ``sum_k n_k w_k / sum_k n_k`` over every rank's clients, from one
    all-reduce of one flat buffer; also the mean of their training losses, and the number of
    diverged clients and of all clients over every rank (so that all ranks apply the same
    ``on_nonfinite`` decision).

    The buffer is ``[sum_k n_k w_k (all tensors, flattened), sum_k n_k, sum_k loss_k,
    clients, diverged]`` over this rank's finite ``results`` (``num_diverged`` more were left
    out); after the sum-all-reduce every rank holds the same totals. The average is ``None``
    when no rank has a finite client.
    """
    names = list(global_params)
    ref = global_params[names[0]]
    numel = sum(global_params[k].numel() for k in names)
    flat = torch.zeros(numel + 4, dtype=ref.dtype, device=ref.device)
    for r in results:
        flat[:numel].add_(flatten(r.params[k] for k in names),
                          alpha=float(r.num_samples))
        flat[numel] += float(r.num_samples)
        flat[numel + 1] += r.loss.to(flat.dtype)
    flat[numel + 2] = float(len(results))
    flat[numel + 3] = float(num_diverged)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    total, finite = float(flat[numel]), int(flat[numel + 2])
    diverged = int(flat[numel + 3])
    loss = flat[numel + 1] / max(finite, 1)
    if finite == 0 or total <= 0.0:
        return None, loss, diverged, finite + diverged
    out: Params = {}
    offset = 0
    for k in names:
        n = global_params[k].numel()
        out[k] = (flat[offset:offset + n] / total).view_as(global_params[k])
        offset += n
    return out, loss, diverged, finite + diverged


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
