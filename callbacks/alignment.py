"""``GradientAlignment``: the update gradient against the proximal gradient."""

from __future__ import annotations

import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value
from typing_extensions import override

from fl_lightning.algorithms.base import LocalContext
from fl_lightning.algorithms.fedsol import kl_to_global
from fl_lightning.callbacks.base import (
    RoundCallback,
    buffers_of,
    client_batches,
)
from fl_lightning.callbacks.functional import flatten
from fl_lightning.hooks import RoundResult

__all__ = ["GradientAlignment"]


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    den = float(torch.linalg.vector_norm(a) * torch.linalg.vector_norm(b))
    return float(torch.dot(a.double(), b.double())) / den if den > 0 else 0.0


class GradientAlignment(RoundCallback):
    """Cosine between the local update gradient and the proximal gradient, and the proximal loss.

    Measured at the end of local training (where the client is farthest from the global model)
    for each sampled client ``k`` (at most ``max_clients``), on its first ``num_batches``
    batches of ``batch_size`` samples, at its local weights ``w_k`` and the round's global
    weights ``w_g``:

    - ``g_ce = grad CE(w_k)``, the plain loss gradient;
    - ``g_upd``: the direction the algorithm hands the optimizer there
      (``module.algorithm.direction``: ``g_ce`` for FedAvg, ``g_ce + mu (w - w_g)`` for FedProx,
      the gradient at the perturbed weights for FedSAM/FedSoL);
    - ``g_prox``: the proximal gradient, ``grad KL(softmax(f(w_g)/T) || softmax(f(w_k)/T))``
      (``proximal="kl"``, FedSoL's proximal loss) or ``w_k - w_g`` (``proximal="l2"``, the
      gradient of ``1/2 ||w - w_g||^2``, FedProx's). ``auto`` picks ``kl`` when the algorithm
      has a ``temperature`` (FedSoL) and ``l2`` otherwise.

    Logs the client means of ``cos_update_prox = cos(g_upd, g_prox)``,
    ``cos_ce_prox = cos(g_ce, g_prox)``, ``cos_update_ce`` and ``prox_loss`` (the KL, or
    ``1/2 ||w_k - w_g||^2``). A negative ``cos_ce_prox`` is the conflict between local learning
    and staying near the global model that FedSoL's perturbation is designed to resolve.

    Cost: per client, ``num_batches`` x (one algorithm step + two gradients).

    Args:
        every_n_rounds: measure after every n-th round.
        proximal: ``auto``, ``kl`` or ``l2``.
        temperature: KL temperature (default: the algorithm's, else 3).
        max_clients: measure at most this many clients of the round.
        num_batches: batches per client.
        batch_size: samples per batch.

    Raises:
        ConfigError: for an unknown ``proximal``.

    Example:
        >>> GradientAlignment(proximal="kl").proximal
        'kl'
    """

    prefix = "alignment"
    needs_client_results = True

    def __init__(
        self,
        every_n_rounds: int = 1,
        proximal: Literal["auto", "kl", "l2"] = "auto",
        temperature: float | None = None,
        max_clients: int | None = 5,
        num_batches: int = 1,
        batch_size: int = 50,
    ) -> None:
        super().__init__(every_n_rounds)
        self.proximal = self.check_choice(proximal, "proximal", ("auto", "kl", "l2"))
        self.temperature = temperature
        self.max_clients = (
            None if max_clients is None else self.check_int(max_clients, "max_clients")
        )
        self.num_batches = self.check_int(num_batches, "num_batches")
        self.batch_size = self.check_int(batch_size, "batch_size")

    def _mode(self, algorithm: Any) -> tuple[str, float]:
        temp = self.temperature
        if temp is None:
            temp = float(getattr(algorithm, "temperature", 3.0))
        if self.proximal != "auto":
            return self.proximal, temp
        return ("kl" if hasattr(algorithm, "temperature") else "l2"), temp

    def measure_client(
        self, module: Any, result: RoundResult, index: int
    ) -> dict[str, float]:
        client = result.clients[index]
        mode, temp = self._mode(module.algorithm)
        buffers = buffers_of(module)
        net = module.net
        w = {k: v.detach() for k, v in client.params.items()}
        wg = {k: v.detach() for k, v in result.global_before.items()}
        batches = client_batches(module, client.client_id, self.batch_size)[: self.num_batches]
        rows = []
        for x, y in batches:
            def ce(p, x=x, y=y):
                return F.cross_entropy(functional_call(net, (p, buffers), (x,)), y)

            g_ce, _ = grad_and_value(ce)(w)
            ctx = LocalContext(net=net, global_params=wg, buffers=buffers, round=result.round,
                               client_id=client.client_id, lr=result.lr, step=1)
            g_upd, _ = module.algorithm.direction(dict(w), x, y, ctx)
            if mode == "kl":
                with torch.no_grad():
                    g_logits = functional_call(net, (wg, buffers), (x,))

                def prox(p, x=x, g_logits=g_logits):
                    return kl_to_global(functional_call(net, (p, buffers), (x,)), g_logits, temp)

                g_prox, prox_loss = grad_and_value(prox)(w)
                g_prox = flatten(g_prox)
            else:
                g_prox = flatten(w) - flatten(wg)
                prox_loss = 0.5 * torch.linalg.vector_norm(g_prox) ** 2
            gc, gu = flatten(g_ce), flatten({k: g_upd[k] for k in w})
            rows.append((_cos(gu, g_prox), _cos(gc, g_prox), _cos(gu, gc), float(prox_loss)))
        t = torch.tensor(rows, dtype=torch.float64).mean(0)
        return {"cos_update_prox": float(t[0]), "cos_ce_prox": float(t[1]),
                "cos_update_ce": float(t[2]), "prox_loss": float(t[3])}

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        if not self.is_due(result.round):
            return
        start = time.perf_counter()
        n = len(result.clients) if self.max_clients is None else min(
            self.max_clients, len(result.clients)
        )
        with torch.enable_grad():
            per = [self.measure_client(module, result, i) for i in range(n)]
        self.seconds += time.perf_counter() - start
        keys = per[0].keys()
        self.log_round(trainer, result.round + 1,
                     {k: sum(p[k] for p in per) / len(per) for k in keys})

    def plot(self, trainer: Any) -> None:
        self.plot_series(trainer, ["cos_update_prox", "cos_ce_prox", "prox_loss"], "alignment",
                          "update vs proximal gradient at the end of local training")
