"""Multi-process rounds (Lightning's DDP strategy): clients split across ranks, one all-reduce.

Under ``--trainer.strategy ddp`` every rank holds the same global model and computes the same
round plan (a pure function of the seed and the round). Each rank trains a share of the
sampled clients chosen by longest-processing-time-first balancing (:func:`lpt_partition`),
adds up its clients' data-size weighted weights, and a single all-reduce of one flat buffer
gives every rank the same sum, hence the same aggregate and the same server update. Client
training uses ``torch.func`` on the bare network, never the DDP wrapper's forward/backward, so
no DDP gradient hook fires (and manual optimization keeps Lightning from syncing anything).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from fl_lightning.algorithms.base import Algorithm, ClientResult, Params
from fl_lightning.engine import RoundPlan
from fl_lightning.errors import ConfigError

__all__ = ["allreduce_average", "check_distributed", "local_plan", "lpt_partition"]


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


def local_plan(plan: RoundPlan, rank: int, world_size: int) -> RoundPlan:
    """The part of ``plan`` that rank ``rank`` trains (cost of a client: its local steps)."""
    if world_size == 1:
        return plan
    share = lpt_partition([len(c.batches) for c in plan.clients], world_size)[rank]
    return RoundPlan(
        round=plan.round, clients=[plan.clients[i] for i in share], transform=plan.transform,
        num_clients=plan.num_clients, total_samples=plan.total_samples,
    )


def check_distributed(algorithm: Algorithm, world_size: int) -> None:
    """One-line ``ConfigError`` for algorithms that cannot split their clients across ranks.

    Per-client state would live on whichever rank trained the client, and a server rule other
    than the weighted average needs every client's result on one rank.
    """
    if world_size <= 1:
        return
    name = type(algorithm).__name__
    if algorithm.client_state:
        why = "it keeps per-client state, which would be split across ranks"
    elif algorithm.server_rule != "mean":
        why = "its server rule is not the weighted average that one all-reduce computes"
    else:
        return
    raise ConfigError(
        f"--model.algorithm={name} cannot run with --trainer.devices={world_size} under DDP: "
        f"{why}; use --trainer.devices 1"
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
        flat[:numel].add_(torch.cat([r.params[k].reshape(-1) for k in names]),
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
