"""The screen phase's policy for clients whose weights or loss are not finite (NaN or inf).

:func:`finite_flags` finds them with one host sync per round; :func:`screen_nonfinite` applies
``--model.on_nonfinite`` (``raise``: stop with :class:`DivergenceError`; ``skip_client``: leave
them out unless every client diverged). Used by :class:`fl_lightning.round.FederatedRound`
(which re-exports these names) and by the streamed round's sink.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fl_lightning.protocol import ClientResult

__all__ = ["DivergenceError", "finite_flags", "screen_nonfinite"]


class DivergenceError(RuntimeError):
    """A client's local training produced NaN or infinite weights."""


def finite_flags(results: Sequence[ClientResult]) -> list[bool]:
    """Whether each client's weights and loss are all finite, with one host sync per round
    (one ``foreach`` norm over every client's tensors; a NaN or inf entry makes a norm
    non-finite)."""
    if not results:
        return []
    tensors = [t for r in results for t in r.params.values()]
    per = len(results[0].params)
    norms = torch.stack(torch._foreach_norm(tensors)).view(len(results), per)
    losses = torch.stack([r.loss.detach().to(norms.device, norms.dtype) for r in results])
    ok = torch.isfinite(norms).all(dim=1) & torch.isfinite(losses)
    return ok.tolist()


def screen_nonfinite(
    results: Sequence[ClientResult], round_idx: int, on_nonfinite: str, local_lr: float, *,
    finite: Sequence[bool] | None = None, num_bad: int | None = None,
    num_all: int | None = None,
) -> tuple[list[ClientResult], list[int]]:
    """The screen phase's policy for clients with NaN/inf weights or loss.

    Args:
        results: the round's client results.
        round_idx: the round (from 0; messages count from 1).
        on_nonfinite: ``raise`` (stop) or ``skip_client`` (leave them out unless all are).
        local_lr: the configured local learning rate (named in the message).
        finite: :func:`finite_flags` of ``results`` (computed here if not given).
        num_bad: under DDP, non-finite clients over every rank (so every rank decides alike).
        num_all: under DDP, clients over every rank.

    Returns:
        ``(kept results, ids of the skipped clients)``.

    Raises:
        DivergenceError: with ``raise`` if any client is not finite, with ``skip_client`` if
            none is.
    """
    finite = finite_flags(results) if finite is None else finite
    bad = [r for r, ok in zip(results, finite, strict=True) if not ok]
    num_bad = len(bad) if num_bad is None else num_bad
    num_all = len(results) if num_all is None else num_all
    if not num_bad:
        return list(results), []
    shown = round_idx + 1  # rounds are counted from 1 in messages, metrics and checkpoints
    where = (
        f"client {bad[0].client_id} produced non-finite weights in round {shown} "
        f"(mean local loss {float(bad[0].loss):.4g})" if bad
        else f"{num_bad} client(s) of another rank produced non-finite weights in round "
        f"{shown}"
    )
    if on_nonfinite == "skip_client" and num_bad < num_all:
        kept = [r for r, ok in zip(results, finite, strict=True) if ok]
        return kept, [r.client_id for r in bad]
    if on_nonfinite == "skip_client":
        where = f"every client diverged in round {shown} (first: {where})"
    raise DivergenceError(
        f"{where}: lower --model.local_lr (now {local_lr}) or the algorithm's "
        "strength, or set --model.on_nonfinite skip_client to leave such clients out; "
        "the checkpoints written so far are kept"
    )
