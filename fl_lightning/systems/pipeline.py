"""``Systems``: applies the configured systems mechanisms to a round, in protocol order."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fl_lightning.algorithms.base import Algorithm, ClientResult, Params
from fl_lightning.protocol import RoundPlan, RoundSystems
from fl_lightning.systems._common import (
    STREAM_ATTACK,
    STREAM_COMPRESSION,
    STREAM_DP_NOISE,
    generator,
)
from fl_lightning.systems.attacks import Attack, flip_labels
from fl_lightning.systems.compression import Compressor
from fl_lightning.systems.participation import Participation
from fl_lightning.systems.privacy import DPFedAvg
from fl_lightning.systems.robust import RobustAggregator
from fl_lightning.systems.secure_agg import SecureAggregation
from fl_lightning.tensors import flatten, unflatten
from fl_lightning.validate import conflict, invalid

__all__ = ["RoundSystems", "Systems", "has_weighted_average"]


def _mean_rule_algorithms() -> str:
    """The project's algorithms whose server rule is the weighted mean, for messages (read from
    their declarations, not listed by hand)."""
    from fl_lightning import algorithms  # noqa: PLC0415 - the package imports the systems

    names = [
        name for name in algorithms.__all__
        if inspect.isclass(cls := getattr(algorithms, name, None)) and issubclass(cls, Algorithm)
        and cls is not Algorithm and not inspect.isabstract(cls)
        and getattr(cls, "server_rule", None) == "mean"
    ]
    return ", ".join(sorted(names))


def has_weighted_average(algorithm: Algorithm) -> bool:
    """Whether the algorithm declares the data-size weighted average as its server rule
    (``server_rule == "mean"``; FedSoL copies its proximal source's declaration)."""
    return algorithm.server_rule == "mean"


class Systems:
    """Unreliable, curious and malicious participants around any algorithm's round.

    Order within a round (``FederatedRound.run``): dropouts and stragglers change the round
    plan (:class:`Participation`); malicious clients train on flipped labels (data-level
    attacks); after local training, each reporting client's update ``Delta_k = w_k - w_g``
    goes through the update-level attack (malicious clients only), then compression, then DP
    clipping, then secure-aggregation masking; the server combines the updates with the
    algorithm's own rule (the default), a robust aggregator, or DP-FedAvg's fixed-denominator
    mean, adds DP noise, and hands ``w_g + update`` to the server optimizer.

    Attacks and compression compose with every algorithm (they change what clients send).
    Robust aggregators, DP and secure aggregation replace the weighted mean, so they require an
    algorithm whose server rule is the weighted mean (not SCAFFOLD, FedNova or FedDyn).

    Args:
        participation: dropouts and stragglers.
        attack: the malicious clients' attack.
        compressor: client-side update compression.
        privacy: client-level DP (DP-FedAvg).
        secure_aggregation: pairwise-masked secure aggregation.
        aggregator: a robust replacement of the weighted mean.

    Example:
        >>> Systems().active
        False
    """

    def __init__(
        self,
        participation: Participation | None = None,
        attack: Attack | None = None,
        compressor: Compressor | None = None,
        privacy: DPFedAvg | None = None,
        secure_aggregation: SecureAggregation | None = None,
        aggregator: RobustAggregator | None = None,
    ) -> None:
        self.participation = participation
        self.attack = attack
        self.compressor = compressor
        self.privacy = privacy
        self.secure_aggregation = secure_aggregation
        self.aggregator = aggregator
        self.bytes_up_total = 0
        self.rounds_done = 0
        self.sample_rate: float | None = None
        self._labels: dict[Any, Tensor] = {}
        self._malicious: set[int] | None = None
        for option, value, cls in (
            ("participation", participation, Participation),
            ("attack", attack, Attack),
            ("compressor", compressor, Compressor),
            ("privacy", privacy, DPFedAvg),
            ("secure_aggregation", secure_aggregation, SecureAggregation),
            ("aggregator", aggregator, RobustAggregator),
        ):
            if value is not None and not isinstance(value, cls):
                raise invalid(f"--model.{option}", type(value).__name__,
                              f"a {cls.__name__}", "a class from fl_lightning.systems")
        if secure_aggregation is not None and aggregator is not None:
            raise conflict(
                "--model.secure_aggregation", f"--model.aggregator={type(aggregator).__name__}",
                "the robust rule needs each client's update and secure aggregation reveals "
                "only their sum", "drop one of the two",
            )
        if secure_aggregation is not None and compressor is not None:
            raise conflict(
                "--model.secure_aggregation", f"--model.compressor={type(compressor).__name__}",
                "masked updates are dense ring elements, so compression would save nothing",
                "drop one of the two",
            )

    def _options(self) -> dict[str, Any]:
        return {
            "participation": self.participation, "attack": self.attack,
            "compressor": self.compressor, "privacy": self.privacy,
            "secure_aggregation": self.secure_aggregation, "aggregator": self.aggregator,
        }

    @property
    def active(self) -> bool:
        return any(m is not None for m in self._options().values())

    @property
    def needs_all_updates(self) -> bool:
        """Whether a mechanism acts on each client's update (an attack, compression and its
        error memory, DP clipping, secure aggregation's masks, a robust aggregator): the round
        then holds every client's result until :meth:`aggregate`. Participation alone only
        changes the plan, so such a round is streamed (:mod:`fl_lightning.stream`)."""
        return any(m is not None for m in (self.attack, self.compressor, self.privacy,
                                           self.secure_aggregation, self.aggregator))

    def log_streamed(self, info: RoundSystems, results: Sequence[ClientResult],
                     global_params: Params) -> None:
        """The round's metrics for a streamed round (participation only): what
        :meth:`aggregate` logs, from the kept clients' ids (each sent the full weights)."""
        like = list(global_params.values())
        per_client = sum(t.numel() for t in like) * like[0].element_size()
        self._log(info, results, self.malicious(info.seed, 0), len(results) * per_client)

    def first_option(self) -> str:
        """Name of the first mechanism that is on (for error messages), e.g. ``privacy``."""
        return next(name for name, m in self._options().items() if m is not None)

    def check(self, algorithm: Algorithm, clients_per_round: int) -> None:
        """Reject combinations that are not well defined (one ``ConfigError`` line)."""
        if self.participation is not None:
            self.participation.check(algorithm, clients_per_round)
        if not has_weighted_average(algorithm):
            for option, value in (
                ("aggregator", self.aggregator), ("privacy", self.privacy),
                ("secure_aggregation", self.secure_aggregation),
            ):
                if value is not None:
                    raise conflict(
                        f"--model.{option}={type(value).__name__}",
                        f"--model.algorithm={type(algorithm).__name__}",
                        "the mechanism replaces the weighted mean of the client updates and the "
                        "algorithm has its own server rule",
                        f"use it with {_mean_rule_algorithms()}, or drop one of the two",
                    )
        if self.aggregator is not None:
            dropped = 0
            if self.participation is not None:
                dropped = len(self.participation.split(0, 0, list(range(clients_per_round)))[0])
            self.aggregator.check(clients_per_round - dropped)

    # ------------------------------------------------------------------ before training
    def begin_round(
        self, plan: RoundPlan, seed: int, clients_per_round: int
    ) -> tuple[RoundPlan, RoundSystems]:
        """Apply dropouts and stragglers to ``plan``; returns the new plan and the round's
        record."""
        num_clients = plan.num_clients or clients_per_round
        self.sample_rate = clients_per_round / num_clients
        info = RoundSystems(
            round=plan.round, seed=seed, sampled=[c.client_id for c in plan.clients],
            expected_clients=clients_per_round, sample_rate=self.sample_rate,
        )
        if self.participation is not None:
            plan, info.dropped, info.stragglers = self.participation.apply(plan, seed)
        return plan, info

    def malicious(self, seed: int, num_clients: int) -> set[int]:
        """The fixed set of malicious clients (empty without an attack)."""
        if self.attack is None:
            return set()
        if self._malicious is None:
            self._malicious = set(self.attack.malicious(seed, num_clients))
        return self._malicious

    def training_data(
        self, data: tuple[Tensor, Tensor], client_indices: Sequence[Tensor], seed: int,
        num_classes: int,
    ) -> tuple[Tensor, Tensor]:
        """The training tensors, with labels flipped on malicious clients' samples when the
        attack flips labels (computed once per device)."""
        if self.attack is None or not self.attack.flips_labels:
            return data
        x, y = data
        key = (y.device, y.data_ptr())
        if key not in self._labels:
            bad = sorted(self.malicious(seed, len(client_indices)))
            self._labels = {key: flip_labels(y, [client_indices[c] for c in bad], num_classes)}
        return x, self._labels[key]

    # ------------------------------------------------------------------ after training
    def aggregate(
        self, algorithm: Algorithm, global_params: Params, results: Sequence[ClientResult],
        info: RoundSystems, num_clients: int, total_samples: int | None = None,
    ) -> Params:
        """The round's aggregate: the clients' (attacked, compressed, clipped, masked) updates
        combined by the server rule, plus DP noise."""
        names = list(global_params)
        like = [global_params[k] for k in names]
        g = flatten(like)
        bad = self.malicious(info.seed, num_clients)
        deltas, changed, sent_bytes = self._client_updates(names, like, g, results, info, bad)
        self._log(info, results, bad, sent_bytes)
        if self.privacy is None and self.aggregator is None and self.secure_aggregation is None:
            if any(changed):  # the algorithm's own rule on what the clients sent
                results = [
                    dataclasses.replace(r, params=dict(zip(names, unflatten(g + d, like),
                                                           strict=True)))
                    if c else r
                    for r, d, c in zip(results, deltas, changed, strict=True)
                ]
            return algorithm.aggregate(
                global_params, results, num_clients=num_clients, total_samples=total_samples
            )
        update = self._combine(g, results, deltas, info)
        return dict(zip(names, [t.clone() for t in unflatten(g + update, like)], strict=True))

    def _client_updates(
        self, names: list[str], like: list[Tensor], g: Tensor, results: Sequence[ClientResult],
        info: RoundSystems, bad: set[int],
    ) -> tuple[list[Tensor], list[bool], int]:
        """Every client's flat update as the server receives it (attacked if malicious,
        compressed, clipped), whether the attack or the compressor changed it, and the bytes
        sent up in all."""
        sizes = [t.numel() for t in like]
        deltas: list[Tensor] = []
        changed: list[bool] = []
        sent_bytes = 0
        value_bytes = (
            self.secure_aggregation.bytes_per_value if self.secure_aggregation is not None
            else g.element_size()
        )
        for r in results:
            delta = flatten([r.params[k] for k in names]) - g
            touched = False
            if self.attack is not None and r.client_id in bad:
                gen = generator(info.seed, info.round, r.client_id, STREAM_ATTACK,
                                device=delta.device)
                corrupted = self.attack.corrupt(delta, gen)
                touched = corrupted is not delta
                delta = corrupted
            if self.compressor is not None:
                gen = generator(info.seed, info.round, r.client_id, STREAM_COMPRESSION,
                                device=delta.device)
                delta, nbytes = self.compressor.compress(delta, sizes, r.client_id, gen)
                touched = True
            else:
                nbytes = delta.numel() * value_bytes
            if self.privacy is not None:
                delta = self.privacy.clip(delta)
            sent_bytes += nbytes
            deltas.append(delta)
            changed.append(touched)
        return deltas, changed, sent_bytes

    def _combine(self, g: Tensor, results: Sequence[ClientResult], deltas: list[Tensor],
                 info: RoundSystems) -> Tensor:
        """The server's flat update from the clients' updates: secure sum, robust rule or
        DP-FedAvg's fixed denominator, then DP noise."""
        if self.privacy is not None:
            weights = torch.ones(len(results), dtype=torch.float64)
        else:
            weights = torch.tensor([float(r.num_samples) for r in results], dtype=torch.float64)
        if self.secure_aggregation is not None:
            total = self.secure_aggregation.secure_sum(
                {r.client_id: d * float(w) for r, d, w in zip(results, deltas, weights,
                                                              strict=True)},
                info.sampled, info.seed, info.round,
            )
            denom = float(info.expected_clients) if self.privacy is not None else float(
                weights.sum())
            update = (total / denom).to(g.dtype)
        elif self.aggregator is not None:
            update = self.aggregator(torch.stack(deltas), weights.to(g.dtype))
        else:  # DP-FedAvg: fixed denominator
            update = torch.stack(deltas).sum(0) / float(info.expected_clients)
        if self.privacy is not None:
            std = self.privacy.noise_std(info.expected_clients)
            gen = generator(info.seed, info.round, STREAM_DP_NOISE, device=g.device)
            update = update + std * torch.randn(
                update.shape, generator=gen, device=g.device, dtype=g.dtype
            )
        return update

    def _log(self, info: RoundSystems, results: Sequence[ClientResult], bad: set[int],
             sent_bytes: int) -> None:
        self.bytes_up_total += sent_bytes
        self.rounds_done = info.round + 1
        m = info.metrics
        m["stragglers"] = float(len(info.stragglers))
        m["dropped_clients"] = float(len(info.dropped))
        m["malicious_clients"] = float(sum(r.client_id in bad for r in results))
        m["bytes_up"] = float(sent_bytes)
        if self.privacy is not None:
            m["epsilon"] = self.privacy.epsilon(info.sample_rate, info.round + 1)

    def final_metrics(self, rounds: int) -> dict[str, float]:
        """What goes into ``final_metrics.json``: total bytes uploaded, and epsilon/delta."""
        if not self.active:
            return {}
        out: dict[str, float] = {"bytes_up_total": float(self.bytes_up_total)}
        if self.privacy is not None and self.sample_rate is not None:
            out["epsilon"] = self.privacy.epsilon(self.sample_rate, rounds)
            out["delta"] = self.privacy.delta
        return out

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"bytes_up_total": self.bytes_up_total}
        if self.compressor is not None:
            state["compressor"] = self.compressor.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.bytes_up_total = int(state.get("bytes_up_total", 0))
        if self.compressor is not None:
            self.compressor.load_state_dict(state.get("compressor", {}))
