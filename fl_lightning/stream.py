"""``ResultSink``: a round's client results folded into its aggregate as they finish.

A streamed round (``docs/scale.md``) hands the engine a sink: the engine gives it each
client's :class:`~fl_lightning.protocol.ClientResult` as soon as it is trained (the sequential
engine one client at a time, the batched engine a chunk at a time) and drops it. The sink
screens the results (``--model.on_nonfinite``: a non-finite client is found before it is
folded), commits each kept client's state, folds it into the algorithm's sums
(:meth:`~fl_lightning.algorithms.base.Algorithm.fold`) and the BatchNorm statistics into
their weighted sum, and keeps only its light part (id, size, steps, loss). A round's memory
is then ``O(model)`` (plus the chunk the engine trains at once), not ``O(K x model)``.

What needs every client's update (a robust aggregator, secure aggregation's masks, DP,
compression's error feedback, an attack, a callback with ``needs_client_results``, an
algorithm that overrides ``aggregate`` without ``fold``, the DDP all-gather) keeps the list
path: :meth:`fl_lightning.round.FederatedRound.streams` says which a round takes.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from fl_lightning.algorithms.base import Algorithm
from fl_lightning.algorithms.sums import RoundSums, accumulate
from fl_lightning.nonfinite import finite_flags
from fl_lightning.protocol import ClientResult, Params

__all__ = ["Released", "ResultSink", "accepts_sink", "light"]


def accepts_sink(engine: object) -> bool:
    """Whether ``engine.run_round`` takes a ``sink`` keyword (the project's sequential and
    batched engines do; an engine without it returns its list and the round folds it)."""
    run_round = getattr(engine, "run_round", None)
    if run_round is None:
        return False
    try:
        return "sink" in inspect.signature(run_round).parameters
    except (TypeError, ValueError):
        return False


class Released(dict):
    """The weights of a client in a streamed round: folded into the aggregate and released.
    Reading them raises one line saying how to keep them (an empty dict would let a callback
    silently use the global weights instead)."""

    def __init__(self, client_id: int) -> None:
        super().__init__()
        self.client_id = client_id

    def _released(self, *args: object, **kwargs: object):
        raise RuntimeError(
            f"client {self.client_id}'s weights were folded into the round's aggregate and "
            "released (a streamed round keeps O(model) memory): a callback that reads "
            "RoundResult.clients[i].params sets needs_client_results = True"
        )

    __getitem__ = __iter__ = __len__ = keys = values = items = get = _released

    def __reduce__(self):  # copy, deepcopy and pickle keep the marker, not the weights
        return (Released, (self.client_id,))


def light(result: ClientResult) -> ClientResult:
    """The part of a result a streamed round keeps: id, size, steps and loss (the weights
    :class:`Released`; no state, extras or buffers)."""
    return ClientResult(result.client_id, result.num_samples, Released(result.client_id),
                        result.num_steps, result.loss.detach())


class ResultSink:
    """Screens, commits and folds client results as the engine produces them.

    Args:
        algorithm: the round's algorithm (its :meth:`~Algorithm.begin_sums`, ``fold``,
            ``finish`` and ``commit_client``).
        sums: the round's sums (:meth:`Algorithm.begin_sums`).
        screen: ``screen(results, finite) -> (kept, skipped ids)``, the round's
            ``on_nonfinite`` policy on one batch of results (it raises to stop the run).

    Attributes:
        kept: the light part (:func:`light`) of every kept client, in the order they came.
        skipped: ids of the clients left out as non-finite.
        finite: whether each client that came was finite, in order.
        seen: ids of every client that came, in order.
        first_bad: the first non-finite client (light), for the message when all are.
        buffer_sums: ``sum_k n_k b_k`` of the kept clients' buffers (float64).
    """

    def __init__(self, algorithm: Algorithm, sums: RoundSums, screen) -> None:
        self.algorithm = algorithm
        self.sums = sums
        self.screen = screen
        self.kept: list[ClientResult] = []
        self.skipped: list[int] = []
        self.finite: list[bool] = []
        self.first_bad: ClientResult | None = None
        self.buffer_sums: Params = {}
        self.buffer_samples = 0
        self.seen: list[int] = []

    def __call__(self, results: Sequence[ClientResult]) -> None:
        """Take the next results (one client, or a chunk), in plan order."""
        flags = finite_flags(results)
        self.finite.extend(flags)
        self.seen.extend(r.client_id for r in results)
        for r, ok in zip(results, flags, strict=True):
            if not ok and self.first_bad is None:
                self.first_bad = light(r)
        kept, skipped = self.screen(results, flags)
        self.skipped.extend(skipped)
        for r in kept:
            self.algorithm.commit_client(r)
            self.algorithm.fold(self.sums, r)
            if r.buffers:
                self._fold_buffers(r)
            self.kept.append(light(r))

    def _fold_buffers(self, result: ClientResult) -> None:
        n = float(result.num_samples)
        values = {k: v.to(torch.float64) for k, v in result.buffers.items()}
        accumulate(self.buffer_sums, values, n, list(values))
        self.buffer_samples += result.num_samples

    @torch.no_grad()
    def set_buffers(self, net: nn.Module) -> None:
        """Set ``net``'s buffers to the data-size weighted mean of the kept clients' (the
        BatchNorm running statistics; integer buffers get the rounded mean), as
        :func:`~fl_lightning.engine.average_buffers` does on a list."""
        if not self.buffer_sums:
            return
        total = float(self.buffer_samples)
        for name, buf in net.named_buffers():
            acc: Tensor | None = self.buffer_sums.get(name)
            if acc is None:
                continue
            mean = acc / total
            buf.copy_(mean.round() if not buf.is_floating_point() else mean)
