"""How fl-lightning's round objects travel in Flower messages (``flwr.app`` records).

Server to client (message type ``train``)::

    "global"        ArrayRecord   the global weights w_g (one array per parameter)
    "buffers"       ArrayRecord   the model's buffers (only if it has any)
    "server.<key>"  ArrayRecord   server state the local step reads (SCAFFOLD's "c")
    "config"        ConfigRecord  round, lr, num_clients, total_samples, recipe (JSON)

Client to server (the reply)::

    "params"        ArrayRecord   the client's weights after local training
    "metrics"       MetricRecord  client_id, num_samples, num_steps, loss
    "extra.<key>"   ArrayRecord   a Params-valued extra (SCAFFOLD "delta_c", FedNova "d_i")
    "extras"        MetricRecord  the scalar extras (FedNova "a")

A client's persistent state (``ClientResult.state``) never leaves the client: it is kept in
the SuperNode's ``context.state`` as ``"state.<entry>"`` ArrayRecords.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from torch import Tensor

__all__ = [
    "extras_from_content",
    "extras_to_content",
    "params_from_record",
    "params_to_record",
    "record_bytes",
]


def params_to_record(params: Mapping[str, Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` holding each tensor (bit-exact; any dtype numpy can hold)."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v.detach().cpu().numpy()))
                        for k, v in params.items()})


def params_from_record(
    record: ArrayRecord, device: torch.device | str = "cpu"
) -> dict[str, Tensor]:
    """The tensors of an ``ArrayRecord``, in its order, on ``device``."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)).to(device)
            for k, a in record.items()}


def _is_params(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, Tensor) for v in value.values())


def extras_to_content(extras: Mapping[str, Any], content: RecordDict) -> None:
    """Put a ``ClientResult.extras`` dict into ``content``: Params as ``extra.<key>`` arrays,
    numbers (or 0-d tensors) in the ``extras`` metric record."""
    scalars: dict[str, float] = {}
    for key, value in extras.items():
        if _is_params(value):
            content[f"extra.{key}"] = params_to_record(value)
        elif isinstance(value, Tensor) and value.numel() == 1:
            scalars[key] = float(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[key] = float(value)
        else:
            raise TypeError(
                f"client extra {key!r} is a {type(value).__name__}: an extra must be a dict "
                "of tensors or a number to travel in a Flower message"
            )
    if scalars:
        content["extras"] = MetricRecord(scalars)


def extras_from_content(content: RecordDict, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The inverse of :func:`extras_to_content`."""
    extras: dict[str, Any] = {}
    for name, record in content.items():
        if name.startswith("extra."):
            extras[name[len("extra."):]] = params_from_record(record, device)
    if "extras" in content:
        extras.update({k: float(v) for k, v in content["extras"].items()})
    return extras


def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content: array data plus keys and config/metric values
    (as Flower counts them; the protocol's own framing is not included)."""
    total = 0
    for name, record in content.items():
        total += len(name)
        if isinstance(record, ArrayRecord):
            total += record.count_bytes()
        else:
            total += sum(len(k) + len(str(v)) for k, v in record.items())
    return total
