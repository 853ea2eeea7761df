"""``HeterogeneityFloor``: the part of the global loss no single model can remove."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from fl_lightning.callbacks.base import RoundCallback, buffers_of, client_batches
from fl_lightning.callbacks.functional import (
    exact_minimum,
    hessian_eigenvalues,
    loss_and_grad,
    normalize_weights,
)
from fl_lightning.callbacks.optima import ClientOptimaProbe
from fl_lightning.hooks import RoundResult

__all__ = ["GlobalObjective", "HeterogeneityFloor"]


class HeterogeneityFloor(ClientOptimaProbe):
    """The gap ``F(w) - sum_k p_k f_k*`` and its curvature bounds (opt-in, expensive).

    Runs :class:`~callbacks.ClientOptimaProbe` (same arguments, same cost, same metrics),
    then, over the probed clients with ``p_k = n_k / sum_j n_j``::

        F(w)  = sum_k p_k f_k(w)           the global model's loss on the probed clients
        gap   = F(w) - sum_k p_k f_k(w_k*) >= 0 up to the probe's accuracy

    ``gap`` cannot reach 0 unless the clients share an optimum: every model pays at least
    ``min_w F - sum_k p_k f_k*`` (the heterogeneity floor). With ``curvature`` the extreme
    Hessian eigenvalues of every ``f_k`` at its optimum are measured (Lanczos,
    ``curvature_iter`` steps), ``mu = min_k lambda_min``, ``L = max_k lambda_max``, and for
    ``mu``-strongly convex, ``L``-smooth ``f_k``::

        bound_lower = mu/2 V  <=  gap(w)            for every w
        floor <= L/2 V = bound_upper                (the floor min_w F - sum_k p_k f_k*)

    with ``V`` the spread of the optima. For a neural network ``mu`` is usually <= 0 and the
    lower bound is vacuous; the upper bound still bounds the floor locally.

    Logs the probe's metrics plus ``global_loss``, ``gap``, and with ``curvature``
    ``mu``, ``L``, ``bound_lower``, ``bound_upper`` under ``floor/``.

    With ``exact=true`` and ``l2`` (the run's ``weight_decay``) the optima are exact
    (:class:`~callbacks.ClientOptimaProbe`) and ``F`` includes ``l2/2 ||w||^2``; probing every
    client then gives the exact floor ``F* - sum_k p_k f_k*`` together with
    :class:`~callbacks.GlobalObjective`'s ``F*``.

    Cost: the probe's, plus one loss pass per probed client, plus with ``curvature``
    ``2 * curvature_iter`` Hessian-vector products over each probed client's data.

    Args:
        curvature: measure ``mu`` and ``L`` and log the bounds.
        curvature_iter: Lanczos steps for each extreme eigenvalue.
        **kwargs: the arguments of :class:`~callbacks.ClientOptimaProbe`.

    Example:
        >>> HeterogeneityFloor(curvature=True, clients=[1]).curvature
        True
    """

    prefix = "floor"

    def __init__(
        self,
        every_n_rounds: int = 50,
        clients: list[int] | None = None,
        num_clients: int = 3,
        lr: float = 0.05,
        momentum: float = 0.9,
        max_steps: int = 300,
        grad_tol: float = 1e-3,
        loss_tol: float = 0.0,
        batch_size: int = 1000,
        seed: int = 0,
        criterion: Any = None,
        curvature: bool = False,
        curvature_iter: int = 20,
        exact: bool = False,
        l2: float = 0.0,
        newton_max_params: int = 2000,
    ) -> None:
        super().__init__(every_n_rounds, clients, num_clients, lr, momentum, max_steps,
                         grad_tol, loss_tol, batch_size, seed, criterion, exact, l2,
                         newton_max_params)
        self.curvature = bool(curvature)
        self.curvature_iter = self.check_int(curvature_iter, "curvature_iter")

    def measure(self, module: Any, params: dict[str, torch.Tensor]) -> dict[str, float]:
        metrics = self.probe(module, params)
        ids = list(self.optima)
        sizes = [len(module.datamodule.client_indices[k]) for k in ids]
        p = normalize_weights(sizes, len(ids))
        buffers = buffers_of(module)
        global_loss = 0.0
        mus, ls = [], []
        with torch.enable_grad():
            for pk, k in zip(p, ids, strict=True):
                batches = client_batches(module, k, self.batch_size)
                loss, _ = loss_and_grad(module.net, params, buffers, batches, self.criterion)
                global_loss += pk * float(loss)
                if self.curvature:
                    top, _ = hessian_eigenvalues(
                        module.net, self.optima[k], buffers, batches, 1, self.curvature_iter,
                        self.criterion, seed=self.seed,
                    )
                    low, _ = hessian_eigenvalues(
                        module.net, self.optima[k], buffers, batches, 1, self.curvature_iter,
                        self.criterion, seed=self.seed, which="smallest",
                    )
                    ls.append(float(top[0]))
                    mus.append(float(low[0]))
        if self.l2:
            flat = torch.cat([v.detach().reshape(-1).double() for v in params.values()])
            global_loss += 0.5 * self.l2 * float(flat @ flat)
        metrics["global_loss"] = global_loss
        metrics["gap"] = global_loss - metrics["opt_loss"]
        if self.curvature:
            mu, big_l = min(mus), max(ls)
            metrics.update({
                "mu": mu, "L": big_l,
                "bound_lower": mu / 2 * metrics["spread_V"],
                "bound_upper": big_l / 2 * metrics["spread_V"],
            })
        return metrics

    @override
    def plot(self, trainer: Any) -> None:
        self.plot_series(trainer, ["gap", "spread_V", "bound_upper"], self.prefix,
                          "heterogeneity floor: F(w) - sum p_k f_k*")


class GlobalObjective(RoundCallback):
    """The global training objective ``F(w)`` every round and, with ``optimum``, its exact
    minimum ``F*`` and the gap ``F(w) - F*``.

    ``F(w) = sum_k p_k f_k(w) + l2/2 ||w||^2``, ``p_k = n_k / n``: the mean loss of the global
    model over every client's training data (the training loss of the FedProx paper's Figure 1)
    plus the L2 term the clients' SGD ``weight_decay`` adds (``l2``: by default the module's
    ``weight_decay``), computed in float64 after each round, with the cross-entropy alone
    (``ce``), the training accuracy and ``||grad F(w)||``. An unregularized softmax regression
    on (nearly) separable data has no finite minimizer; ``weight_decay > 0`` gives it one. With
    ``optimum=true`` the same model is trained centrally on all the training data to
    ``||grad F|| < tol`` in float64 once, at the start of fit
    (:func:`~fl_lightning.callbacks.functional.exact_minimum`: Newton's method for up to
    ``newton_max_params`` parameters, else L-BFGS), and every round logs ``gap = F(w) - F*``.
    For a convex model (``LogisticRegression``) ``F*`` is the global optimum: the gap a method
    settles at is its distance from perfect fitting (the "fails to fit" floor, measured
    exactly). The end of training adds the tail statistics over the last ``tail`` share of the
    rounds to ``analysis/objective.json``: ``gap_tail_mean`` (where the method settles),
    ``gap_tail_std`` and ``gap_tail_range`` (its oscillation), and the same for ``loss``.

    Logs ``objective/loss``, ``objective/acc``, ``objective/grad_norm`` and with ``optimum``
    ``objective/gap`` (and ``objective/opt_loss``, ``opt_grad_norm``, ``opt_iterations``,
    ``opt_seconds`` once, at the first measured round).

    Cost: one forward and backward pass over the training set per measured round (0.01 s for
    the synthetic data); the optimum once (about 2 s for 610 parameters and 5,000 samples).

    Args:
        every_n_rounds: measure after every n-th round.
        optimum: compute ``F*`` and log the gap.
        tol: gradient-norm tolerance of the exact minimum.
        max_iter: iterations of the exact minimum.
        newton_max_params: Newton's method up to this many parameters, L-BFGS above.
        tail: share of the measured rounds the tail statistics cover.
        batch_size: chunk size of the passes over the training set (memory only).
        l2: the L2 coefficient of ``F`` (default: the module's ``weight_decay``).

    Example:
        >>> GlobalObjective(optimum=True).tol
        1e-08
    """

    prefix = "objective"
    replica_aware = True

    def __init__(
        self, every_n_rounds: int = 1, optimum: bool = False, tol: float = 1e-8,
        max_iter: int = 100, newton_max_params: int = 2000, tail: float = 0.2,
        batch_size: int = 100000, l2: float | None = None,
    ) -> None:
        super().__init__(every_n_rounds)
        self.optimum = bool(optimum)
        self.tol = self.check_positive(tol, "tol")
        self.max_iter = self.check_int(max_iter, "max_iter")
        self.newton_max_params = self.check_int(newton_max_params, "newton_max_params", 0)
        self.tail = self.check_positive(tail, "tail")
        if self.tail > 1:
            self.fail(f"{self.option('tail')}={tail!r} is invalid: it is a share in (0, 1]")
        self.batch_size = self.check_int(batch_size, "batch_size")
        self.l2 = None if l2 is None else self.check_positive(l2, "l2", allow_zero=True)
        self.opt_info: dict[str, float] | None = None
        self.opt_params: dict[str, torch.Tensor] | None = None

    def _batches(self, module: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        x, y = module.datamodule.train_tensors(module.device)
        idx = torch.cat(list(module.datamodule.client_indices)).to(y.device)
        return [(x[i].to(torch.float64), y[i]) for i in idx.split(self.batch_size)]

    def l2_of(self, module: Any) -> float:
        """The L2 coefficient of ``F``: ``l2`` or the module's ``weight_decay``."""
        return float(getattr(module, "weight_decay", 0.0)) if self.l2 is None else self.l2

    def solve(self, module: Any) -> dict[str, float]:
        """Compute ``F*`` (once) from the module's current weights; returns its info."""
        if self.opt_info is None:
            start = time.perf_counter()
            params = {k: v.detach() for k, v in module.net.named_parameters()}
            self.opt_params, info = exact_minimum(
                module.net, params, buffers_of(module), self._batches(module), self.criterion,
                self.tol, self.max_iter, self.newton_max_params, self.l2_of(module),
            )
            info["seconds"] = time.perf_counter() - start
            self.opt_info = info
            state = "converged" if info["converged"] else (
                "NOT converged: the data may be separable, with no finite minimum; set "
                "--model.weight_decay (or the callback's l2) > 0")
            rank_zero_info(
                f"GlobalObjective: F* = {info['loss']:.10f}, ||grad F*|| = "
                f"{info['grad_norm']:.2e} after {info['iterations']:.0f} iterations, {state}"
            )
        return self.opt_info

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.optimum:
            self.solve(pl_module)

    @override
    def replica_metrics(self) -> list[str]:
        return ["loss", "ce", "acc", "grad_norm", *(["gap"] if self.optimum else [])]

    @override
    def replica_start(self, module: Any) -> None:
        if self.optimum:
            self.solve(module)

    def measure(self, module: Any, params: dict[str, torch.Tensor]) -> dict[str, float]:
        batches = self._batches(module)
        p64 = {k: v.detach().to(torch.float64) for k, v in params.items()}
        buffers = {k: (b.double() if b.is_floating_point() else b)
                   for k, b in buffers_of(module).items()}
        with torch.enable_grad():
            ce, grad = loss_and_grad(module.net, p64, buffers, batches, self.criterion)
        l2 = self.l2_of(module)
        flat = torch.cat([v.reshape(-1) for v in p64.values()])
        loss = float(ce) + 0.5 * l2 * float(flat @ flat)
        grad = grad + l2 * flat
        with torch.no_grad():
            correct = sum(
                int((torch.func.functional_call(module.net, (p64, buffers), (x,)).argmax(1)
                     == y).sum()) for x, y in batches
            )
        out = {"loss": loss, "ce": float(ce), "acc": correct / sum(len(y) for _, y in batches),
               "grad_norm": float(torch.linalg.vector_norm(grad))}
        if self.optimum:
            info = self.solve(module)
            out["gap"] = out["loss"] - info["loss"]
            if not any("opt_loss" in r for r in self.history):
                out.update({"opt_loss": info["loss"], "opt_grad_norm": info["grad_norm"],
                            "opt_iterations": info["iterations"],
                            "opt_seconds": info["seconds"]})
        return out

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        self.measure_global(trainer, module, result)

    def tail_stats(self) -> dict[str, float]:
        """Mean, std and range of ``loss`` (and ``gap``) over the last ``tail`` share of the
        measured rounds."""
        if not self.history:
            return {}
        n = max(1, math.ceil(self.tail * len(self.history)))
        out: dict[str, float] = {"tail_rounds": float(n)}
        for key in ("loss", "gap"):
            values = torch.tensor([r[key] for r in self.history[-n:] if key in r],
                                  dtype=torch.float64)
            if len(values):
                out[f"{key}_tail_mean"] = float(values.mean())
                out[f"{key}_tail_std"] = float(values.std(unbiased=False))
                out[f"{key}_tail_range"] = float(values.max() - values.min())
        return out

    @override
    def summary(self) -> dict[str, Any]:
        return {"optimum": self.opt_info, "tail": self.tail_stats()}

    @override
    def plot(self, trainer: Any) -> None:
        keys = ["gap"] if self.optimum else ["loss"]
        title = "F(w) - F* (exact optimum)" if self.optimum else "global training loss F(w)"
        self.plot_series(trainer, [*keys, "acc"], self.prefix, title, logy=False)
