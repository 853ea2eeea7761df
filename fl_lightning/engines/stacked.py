"""The batched engine's per-round data: the clients' stacked state, the padded round plan and
the small tensor helpers of the vmapped step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from fl_lightning.algorithms.base import IGNORE_INDEX, Params
from fl_lightning.engines.base import GroupedTransform, PlannedAugmentation

if TYPE_CHECKING:  # the plan types import the engines
    from fl_lightning.engine import BatchTransform, ClientPlan, RoundPlan

__all__ = [
    "PaddedRound",
    "StackedState",
    "device_of",
    "float_dtype",
    "groups_at",
    "match_layout",
    "mixes_samples",
    "stack_batches",
    "to_channels_last",
]


class StackedState:
    """The sampled clients' ``ctx.state`` trees as per-client inputs of the vmapped step.

    Every client's state (what :meth:`Algorithm.client_begin` put into ``ctx.state``) must have
    the same structure. A leaf that is the very same object for every client (e.g. SCAFFOLD's
    server control variate ``c``) is passed once, unbatched; every other tensor leaf is stacked
    into a ``(K, ...)`` tensor and vmapped over dimension 0. The tensors under the entries
    named in ``per_client`` (the algorithm's declared ``client_state``) are always stacked,
    even when every sampled client holds the same object (MOON's previous model in the first
    round is the initial model for everyone), so that the step sees the same structure in
    every round and a compiled step is not compiled again.

    Example:
        >>> a, b = torch.zeros(2), torch.ones(2)
        >>> s = StackedState([{"c": a, "c_i": a}, {"c": a, "c_i": b}])
        >>> [t.shape for t in s.batched], s.unpack(list(s.batched))["c"] is a
        ([torch.Size([2, 2])], True)
        >>> len(StackedState([{"c_i": a}, {"c_i": a}], per_client=("c_i",)).batched)
        1
    """

    def __init__(self, states: list[dict[str, Any]], per_client: tuple[str, ...] = ()) -> None:
        flat = [tree_flatten(s) for s in states]
        self.spec = flat[0][1]
        for _, spec in flat[1:]:
            if spec != self.spec:
                raise ValueError(
                    "the clients' ctx.state have different structures; the batched engine "
                    "needs one structure for every client"
                )
        # for each leaf: does it sit under a declared per-client entry? (a dict flattens its
        # values in insertion order, each value's leaves together)
        owned: list[bool] = []
        for key, value in states[0].items():
            owned += [key in per_client] * len(tree_flatten(value)[0])
        columns = list(zip(*(leaves for leaves, _ in flat), strict=True)) if flat[0][0] else []
        self.shared: list[Any] = []
        self.is_batched: list[bool] = []
        batched: list[Tensor] = []
        for column, mine in zip(columns, owned, strict=True):
            first = column[0]
            same = all(v is first for v in column[1:]) and not (mine and
                                                                isinstance(first, Tensor))
            if same or not isinstance(first, Tensor):
                if not same and not all(v == first for v in column[1:]):
                    raise ValueError("a non-tensor ctx.state entry differs between clients")
                self.shared.append(first)
                self.is_batched.append(False)
            else:
                self.shared.append(None)
                self.is_batched.append(True)
                batched.append(torch.stack(list(column)))
        self.batched: tuple[Tensor, ...] = tuple(batched)

    def unpack(self, batched: list[Tensor] | tuple[Tensor, ...]) -> dict[str, Any]:
        """One client's state tree from its rows of the batched leaves (inside ``vmap``)."""
        it = iter(batched)
        leaves = [next(it) if b else v for b, v in zip(self.is_batched, self.shared,
                                                        strict=True)]
        return tree_unflatten(leaves, self.spec)


class PaddedRound:
    """A round's plan as static-shape device tensors, built once per round.

    With ``S`` the most local steps of any client, ``K`` clients and ``B`` the largest batch:

    Attributes:
        index: ``(S, K, B)`` training-set indices (padding: index 0, any valid sample).
        labels: ``(S, K, B)`` labels, :data:`~fl_lightning.algorithms.base.IGNORE_INDEX` at
            padding samples (a client's short last batch, every sample of a step it does not
            have), so each client's losses average over its real samples only.
        active: ``(S, K)`` whether client ``k`` has a step ``s``.
        everyone: per step, whether every client has it (a host list, from the plan).
        draws: ``(S, K, B, 5)`` augmentation draws of the round (``None`` without the data
            module's augmentation), ``augment`` the function that applies them.
    """

    def __init__(self, plan: RoundPlan, index: Tensor, labels: Tensor, active: Tensor,
                 everyone: list[bool], lengths: list[int], draws: Tensor | None,
                 augment: Any) -> None:
        self.plan = plan
        self.index, self.labels, self.active, self.everyone = index, labels, active, everyone
        self.lengths = lengths
        self.draws, self.augment = draws, augment
        self.steps = index.shape[0]

    @classmethod
    def build(cls, plan: RoundPlan, y_all: Tensor, device: torch.device,
              max_steps: int | None = None) -> PaddedRound:
        """The padded plan of the first ``max_steps`` local steps (``None``: all)."""
        clients = plan.clients
        count = len(clients)
        steps = max(len(c.batches) for c in clients)
        if max_steps is not None:
            steps = min(steps, max_steps)
        empty = torch.zeros(0, dtype=torch.long, device=device)
        seqs = [clients[k].batches[s].to(device) if s < len(clients[k].batches) else empty
                for s in range(steps) for k in range(count)]
        lengths = [len(q) for q in seqs]
        if steps == 0 or max(lengths) == 0:
            z = torch.zeros(0, count, 0, dtype=torch.long, device=device)
            return cls(plan, z, z, torch.zeros(0, count, dtype=torch.bool, device=device), [],
                       [], None, None)
        index = pad_sequence(seqs, batch_first=True, padding_value=0)
        width = index.shape[1]
        n = torch.tensor(lengths, device=device)
        valid = torch.arange(width, device=device) < n.unsqueeze(1)
        labels = torch.where(valid, y_all[index], torch.full_like(index, IGNORE_INDEX))
        everyone = [all(s < len(c.batches) for c in clients) for s in range(steps)]
        draws, augment = cls._draws(plan, lengths, steps, width, device)
        return cls(plan, index.view(steps, count, width), labels.view(steps, count, width),
                   (n > 0).view(steps, count), everyone, lengths,
                   None if draws is None else draws.view(steps, count, width, -1), augment)

    @staticmethod
    def _draws(plan: RoundPlan, lengths: list[int], steps: int, width: int,
               device: torch.device) -> tuple[Tensor | None, Any]:
        """The round's augmentation draws padded like the indices, when the transform is the
        data module's (a :class:`~fl_lightning.engines.base.PlannedAugmentation` of this round)."""
        transform = plan.transform
        if not isinstance(transform, PlannedAugmentation) or transform.round != plan.round:
            return None, None
        augment = transform.augmentation
        if augment is None:
            return None, None
        count = len(plan.clients)
        parts = []
        for j, size in enumerate(lengths):
            s, k = divmod(j, count)
            if size == 0:
                parts.append(torch.zeros(0, 5, dtype=torch.long, device=device))
                continue
            d = transform.step_draws(plan.clients[k].client_id, s, size)
            if d is None or d.device != device:
                return None, None
            parts.append(d)
        return pad_sequence(parts, batch_first=True, padding_value=0), augment

    def transform_generic(self, transform: BatchTransform, x_all: Tensor, step: int) -> Tensor:
        """Step ``step``'s padded batches ``(K, B, ...)`` with a generic pure ``transform``
        applied to each client's real samples (host work per client: the data module's
        augmentation takes the device path instead)."""
        x = x_all[self.index[step]]
        count = len(self.plan.clients)
        rows = []
        for k, client in enumerate(self.plan.clients):
            n = self.lengths[step * count + k]
            if n == 0:
                rows.append(x[k])
                continue
            real = transform(x[k, :n], self.plan.round, client.client_id, step)
            rows.append(torch.cat([real, x[k, n:]]) if n < x.shape[1] else real)
        return torch.stack(rows)


def match_layout(
    stacked: Params, bufs: list[Tensor] | None, names: list[str], direction: Params
) -> None:
    """Store each stacked weight (and its momentum buffer) in the memory layout of its
    direction, once per round: a gradient taken through a vmapped ``linear`` comes out
    transposed, and an update of a contiguous tensor by a transposed one is a slow strided
    pass (about 10x the contiguous one for MLP2NN on a CPU). The values do not change."""
    for j, k in enumerate(names):
        d, w = direction[k], stacked[k]
        if d.shape != w.shape or d.stride() == w.stride():
            continue
        stacked[k] = torch.empty_strided(d.shape, d.stride(), dtype=w.dtype,
                                         device=w.device).copy_(w)
        if bufs is not None:
            b = bufs[j]
            bufs[j] = torch.empty_strided(d.shape, d.stride(), dtype=b.dtype,
                                          device=b.device).copy_(b)


def groups_at(clients: list[ClientPlan], step: int) -> list[list[int]]:
    """Indices of the clients that have a local step ``step``, grouped by its batch size."""
    groups: dict[int, list[int]] = {}
    for i, client in enumerate(clients):
        if step < len(client.batches):
            groups.setdefault(len(client.batches[step]), []).append(i)
    return list(groups.values())


def stack_batches(
    clients: list[ClientPlan], members: list[int], step: int, x_all: Tensor, y_all: Tensor,
    plan: RoundPlan,
) -> tuple[Tensor, Tensor]:
    """The group's batches at ``step`` as ``(K, B, ...)`` inputs and ``(K, B)`` labels."""
    transform: BatchTransform | None = plan.transform
    idx = torch.stack([clients[i].batches[step] for i in members]).to(x_all.device)
    x, y = x_all[idx], y_all[idx]
    if transform is not None:
        ids = [clients[i].client_id for i in members]
        if isinstance(transform, GroupedTransform):  # one call for the whole group
            x = transform.many(x, plan.round, ids, step)
        else:
            x = torch.stack([transform(x[j], plan.round, c, step) for j, c in enumerate(ids)])
    return x, y


def mixes_samples(net: nn.Module) -> bool:
    """Whether a forward of ``net`` mixes the samples of a batch (training-mode BatchNorm
    normalizes with the batch's statistics, so a padding sample would change the others)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


def float_dtype(stacked: Params) -> torch.dtype:
    """The dtype of the first floating-point tensor of ``stacked`` (else the default)."""
    return next((v.dtype for v in stacked.values() if v.is_floating_point()),
                torch.get_default_dtype())


def device_of(stacked: Params) -> torch.device:
    """The device of ``stacked``'s tensors."""
    return next(iter(stacked.values())).device


def to_channels_last(t: Tensor) -> Tensor:
    """``t`` with every trailing ``(C, H, W)`` block stored channels-last (the layout
    ``torch.channels_last`` gives a 4-d tensor, for any number of leading batch dimensions);
    other tensors unchanged."""
    if t.ndim < 4:
        return t
    lead = t.ndim - 3
    order = (*range(lead), lead + 1, lead + 2, lead)
    back = (*range(lead), t.ndim - 1, lead, lead + 1)
    return t.permute(order).contiguous().permute(back)
