"""The memory pre-flight: before the first round, will the run fit?

:func:`estimate` adds up what a run will still allocate, by where it lives (the host or a
GPU):

- the client-state store: ``model x state entries x expected visited clients``, with
  ``E[visited] = N (1 - (1 - K/N)^R)`` after ``R`` rounds of ``K`` of ``N`` clients
  (uniform sampling without replacement);
- one round: a streamed round holds ``O(model)`` sums; a round that holds every result (a
  systems mechanism that needs each update, a callback with ``needs_client_results``, an
  algorithm without sums, the DDP all-gather) ``K x (weights + state + extras)``; the
  batched engine's chunk (``BatchedEngine.client_bytes x chunk``).

:func:`check` compares it with :func:`~fl_lightning.memory.available_memory` and prints one
warning line, naming the option that makes it fit, before training. A round that must hold
every result and cannot fit even once stops with a one-line ``ConfigError`` instead: it would
fail in its first round.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fl_lightning.errors import ConfigError
from fl_lightning.memory import available_memory, format_bytes, tensor_bytes

__all__ = ["Estimate", "check", "estimate", "expected_visited"]


def expected_visited(num_clients: int, per_round: int, rounds: int | None) -> float:
    """Expected distinct clients after ``rounds`` rounds of ``per_round`` of ``num_clients``
    sampled uniformly without replacement (``rounds`` unknown: every client).

    Example:
        >>> round(expected_visited(10_000, 500, 2))
        975
    """
    if rounds is None:
        return float(num_clients)
    if num_clients <= 0 or rounds <= 0:
        return 0.0
    miss = 1.0 - min(per_round, num_clients) / num_clients
    return num_clients * (1.0 - miss ** rounds)


@dataclass
class Estimate:
    """What a run will allocate, by where (``cpu`` or ``cuda``), with the parts named.

    Attributes:
        parts: ``(where, what, bytes, option)``: each part, and the option that shrinks it.
        held_by: why a round holds every client's result (``None``: it streams).
        round_bytes: bytes of one round's held results (0 when streamed).
    """

    parts: list[tuple[str, str, int, str]] = field(default_factory=list)
    held_by: str | None = None
    round_bytes: int = 0

    def total(self, where: str) -> int:
        return sum(b for w, _, b, _ in self.parts if w == where)


def _held_by(fl_round) -> str | None:
    """Why the round holds every client's result (``None``: it streams)."""
    ctx = fl_round.context
    systems = ctx.systems
    for option in ("aggregator", "secure_aggregation", "privacy", "compressor", "attack"):
        value = getattr(systems, option, None)
        if value is not None:
            return f"--model.{option}={type(value).__name__} needs every client's update"
    if ctx.needs_client_results:
        return "a callback with needs_client_results reads every client's result"
    if not getattr(ctx.algorithm, "streamed", False):
        return (f"--model.algorithm={type(ctx.algorithm).__name__} has no streamed server "
                "rule (it overrides aggregate without fold)")
    if ctx.world_size > 1 and fl_round.needs_all_results():
        return "the DDP all-gather gives every rank every client's result"
    return None


def estimate(fl_round, rounds: int | None) -> Estimate:
    """The memory ``rounds`` more rounds of ``fl_round`` will allocate (see the module)."""
    ctx = fl_round.context
    model = tensor_bytes(p.detach() for p in ctx.net.parameters())
    where = "cuda" if ctx.device.type == "cuda" else "cpu"
    out = Estimate()
    entries = len(getattr(ctx.algorithm, "client_state", ()))
    store = getattr(ctx.algorithm, "clients", None)
    if entries and store is not None:
        store_device = getattr(store, "device", None)
        at = "cuda" if (store_device or ctx.device).type == "cuda" else "cpu"
        visited = expected_visited(ctx.source.num_clients, ctx.clients_per_round, rounds)
        sharded = fl_round.owns_state  # DDP with reduced sums: this rank's clients only
        if sharded:
            visited /= ctx.world_size
        nbytes = int(model * entries * visited)
        spill = getattr(store, "_spill", None)  # a store that keeps its rows in a file past
        if spill is not None:                   # a RAM budget holds at most that in RAM
            nbytes = min(nbytes, int(spill[1]))
        out.parts.append((at, f"client state ({entries} x {format_bytes(model)} x "
                              f"{visited:,.0f} expected visited clients"
                              f"{' on this rank' if sharded else ''})", nbytes,
                          "lower --trainer.max_steps or --model.sample_ratio, or set "
                          "--model.algorithm.state_device cpu"))
    out.held_by = _held_by(fl_round)
    if out.held_by is not None:
        per = model * (1 + 2 * entries)
        out.round_bytes = per * ctx.clients_per_round
        out.parts.append((where, f"one round's {ctx.clients_per_round} held results "
                                 f"({format_bytes(per)} each)", out.round_bytes,
                          "lower --model.sample_ratio"))
    chunk = _chunk_bytes(fl_round)
    if chunk:
        out.parts.append((where, "the batched engine's chunk", chunk,
                          "set --model.engine.memory_budget or max_clients_per_chunk lower"))
    return out


def _chunk_bytes(fl_round) -> int:
    """The batched engine's chunk: ``client_bytes x clients``, capped by its budget (0: not
    the batched engine, or a source without training data)."""
    ctx = fl_round.context
    engine = ctx.engine
    if not (hasattr(engine, "client_bytes") and hasattr(engine, "budget")):
        return 0
    try:
        data = ctx.source.train_tensors(ctx.device, ctx.dtype)
        plan = ctx.source.round_plan(0, ctx.clients_per_round, ctx.local_epochs,
                                     ctx.batch_size, ctx.device)
    except (AttributeError, NotImplementedError):
        return 0
    if data is None or not plan.clients:
        return 0
    gp = {k: p.detach() for k, p in ctx.net.named_parameters()}
    per = engine.client_bytes(ctx.algorithm, ctx.net, gp, plan, data, ctx.local_optim(0).momentum)
    clients = len(plan.clients)
    if getattr(engine, "max_clients_per_chunk", None):
        clients = min(clients, engine.max_clients_per_chunk)
    budget = engine.budget(ctx.device)
    return int(per * clients if budget is None else min(per * clients, max(budget, per)))


def check(fl_round, rounds: int | None, *, available: Callable | None = None,
          warn: Callable[[str], None] | None = None) -> Estimate:
    """Warn in one line (``warn``, default: stderr) when the run will not fit the memory
    available where it lives; raise a one-line ``ConfigError`` when a round that holds every
    result cannot fit once. ``available(device) -> (bytes or None, where from)`` defaults to
    :func:`~fl_lightning.memory.available_memory`."""
    available = available or available_memory
    warn = warn or (lambda line: print(line, file=sys.stderr))
    est = estimate(fl_round, rounds)
    ctx = fl_round.context
    for where in ("cpu", "cuda"):
        need = est.total(where)
        if not need:
            continue
        device = ctx.device if where == ctx.device.type else torch.device(where)
        free, source = available(device)
        if free is None:
            continue
        if (where == ctx.device.type and est.held_by is not None and ctx.world_size == 1
                and est.round_bytes > free):
            fits = max(free // max(est.round_bytes // ctx.clients_per_round, 1), 0)
            raise ConfigError(
                f"{est.held_by}: one round holds {ctx.clients_per_round} results, "
                f"{format_bytes(est.round_bytes)}, but {format_bytes(free)} is available "
                f"({source}): lower --model.sample_ratio so that at most {fits} clients are "
                "sampled per round, or drop the mechanism to stream the round"
            )
        if need > free:
            mine = [p for p in est.parts if p[0] == where]
            listed = "; ".join(f"{what} {format_bytes(b)}" for _, what, b, _ in mine)
            fix = max(mine, key=lambda p: p[2])[3]
            warn(f"fl-lightning: warning: this run may need {format_bytes(need)} more on "
                 f"{where} ({listed}) but {format_bytes(free)} is available ({source}): {fix}")
    return est
