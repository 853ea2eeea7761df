"""Ctrl-C (SIGINT) stops a run the way SIGTERM does: at the round boundary, with a checkpoint.

The first Ctrl-C asks the run to stop after the round in flight; :class:`FederatedModule` then
writes ``preempted-round=N.ckpt`` and the command line prints the resume command (exit status
130). A second Ctrl-C stops at once (Lightning's own KeyboardInterrupt shutdown, no checkpoint
of the round in flight). Without this, Lightning turns the first Ctrl-C into an immediate stop
with no checkpoint, and up to ``--checkpoint_every_n_rounds`` rounds are lost.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from lightning.fabric.utilities.rank_zero import rank_zero_only

__all__ = ["interrupt_at_round_boundary", "interrupt_requested"]

_requested = threading.Event()


def interrupt_requested() -> bool:
    """Whether a Ctrl-C asked the run to stop at the next round boundary."""
    return _requested.is_set()


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    if _requested.is_set():  # the second Ctrl-C: stop now
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt
    _requested.set()
    if rank_zero_only.rank == 0:  # under DDP every rank gets the Ctrl-C; one of them says so
        print("\nfl-lightning: Ctrl-C: stopping after the round in flight, with a checkpoint "
              "(Ctrl-C again to stop at once)", file=sys.stderr, flush=True)


@contextmanager
def interrupt_at_round_boundary() -> Iterator[None]:
    """Within the block, Ctrl-C asks for a stop at the round boundary (see the module);
    the previous SIGINT handler is restored after. Outside the main thread it does nothing
    (Python delivers signals to the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _requested.clear()
    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()
