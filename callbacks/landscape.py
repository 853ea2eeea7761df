"""``LossLandscape``: the loss of the global model on a 2-D plane through it."""

from __future__ import annotations

import os
import time
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from fl_lightning.callbacks.base import (
    Criterion,
    RoundCallback,
    buffers_of,
    fixed_batches,
)
from fl_lightning.callbacks.functional import (
    filter_normalized_direction,
    flatten,
    hessian_eigenvalues,
    unflatten,
    weighted_loss,
)
from fl_lightning.hooks import RoundResult

__all__ = ["LossLandscape"]


class LossLandscape(RoundCallback):
    """Loss of the global model on a grid ``w + a d_1 + b d_2``, drawn as a contour plot.

    ``a, b`` run over ``resolution`` points of ``[-span, span]``; the loss is the mean
    cross-entropy on a fixed set of batches (as in :class:`~callbacks.HessianEigenvalues`).
    Directions:

    - ``hessian``: the top-2 eigenvectors of the loss Hessian at ``w`` (unit vectors, so ``a``
      and ``b`` are Euclidean distances in weight space; the plane of the sharpest curvature);
    - ``random``: two Gaussian directions normalized filter by filter to the weights' filter
      norms (Li et al., 2018; ``a = 1`` moves every filter by its own norm).

    Every ``every_n_rounds`` rounds it saves ``<log_dir>/analysis/landscape_round<r>.png``
    (contours, the model at the centre) and ``.pt`` (the grid), sends the figure to image
    loggers (TensorBoard ``add_figure``, W&B ``log_image``) and logs ``landscape/center_loss``,
    ``landscape/max_loss`` and ``landscape/mean_rise`` (mean over the grid of the loss minus
    the centre loss: higher is sharper).

    Cost: ``resolution**2`` loss evaluations on ``num_batches * batch_size`` samples (forward
    only), plus for ``hessian`` directions one Lanczos run of ``num_iter`` Hessian-vector
    products, saved when a :class:`~callbacks.HessianEigenvalues` listed before it measured
    the same round on the same batches (its eigenvectors are reused).

    Args:
        every_n_rounds: draw after every n-th round.
        directions: ``hessian`` or ``random``.
        resolution: grid points per axis.
        span: half-width of the grid (units: see directions).
        num_batches, batch_size, split, seed: the fixed batches (``seed`` also seeds the
            random directions and the Lanczos start).
        num_iter: Lanczos steps for ``hessian`` directions.
        criterion: loss ``criterion(logits, y)`` (default: mean cross-entropy).

    Raises:
        ConfigError: for an unknown ``directions`` or a bad number.

    Example:
        >>> LossLandscape(directions="random", resolution=11).resolution
        11
    """

    prefix = "landscape"

    def __init__(
        self,
        every_n_rounds: int = 50,
        directions: Literal["hessian", "random"] = "hessian",
        resolution: int = 15,
        span: float = 1.0,
        num_batches: int = 2,
        batch_size: int = 500,
        split: Literal["train", "test"] = "train",
        seed: int = 0,
        num_iter: int = 20,
        criterion: Criterion | None = None,
    ) -> None:
        super().__init__(every_n_rounds, criterion)
        self.directions = self.check_choice(directions, "directions", ("hessian", "random"))
        self.resolution = self.check_int(resolution, "resolution", 2)
        self.span = self.check_positive(span, "span")
        self.num_batches = self.check_int(num_batches, "num_batches")
        self.batch_size = self.check_int(batch_size, "batch_size")
        self.split = split
        self.seed = int(seed)
        self.num_iter = self.check_int(num_iter, "num_iter", 2)
        self.grids: dict[int, dict[str, torch.Tensor]] = {}

    def _shared_eigenvectors(self, trainer: Any, round_number: int) -> torch.Tensor | None:
        """Top-2 eigenvectors a HessianEigenvalues callback computed at this round on the
        same batches (it runs first when listed first), so that no second Lanczos is run."""
        from fl_lightning.callbacks.hessian import HessianEigenvalues

        for cb in getattr(trainer, "callbacks", None) or []:
            if (isinstance(cb, HessianEigenvalues) and cb.last_round == round_number
                    and cb.eigenvectors is not None and cb.eigenvectors.shape[1] >= 2
                    and (cb.split, cb.num_batches, cb.batch_size, cb.seed, cb.criterion)
                    == (self.split, self.num_batches, self.batch_size, self.seed,
                        self.criterion)):
                return cb.eigenvectors[:, :2]
        return None

    def _directions(self, module: Any, params: dict, batches: list,
                    shared: torch.Tensor | None = None) -> tuple[dict, dict]:
        if self.directions == "random":
            gen = torch.Generator().manual_seed(self.seed)
            return (filter_normalized_direction(params, gen),
                    filter_normalized_direction(params, gen))
        if shared is not None:
            vecs = shared
        else:
            with torch.enable_grad():
                _, vecs = hessian_eigenvalues(
                    module.net, params, buffers_of(module), batches, k=2,
                    num_iter=self.num_iter, criterion=self.criterion, seed=self.seed,
                )
        return unflatten(vecs[:, 0].contiguous(), params), unflatten(
            vecs[:, 1].contiguous(), params
        )

    @torch.no_grad()
    def grid(self, module: Any, params: dict[str, torch.Tensor],
             shared: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"a", "b", "loss"}``: the coordinates and the ``[len(b), len(a)]`` loss grid."""
        params = {k: v.detach() for k, v in params.items()}
        batches = fixed_batches(module, self.split, self.num_batches, self.batch_size, self.seed)
        d1, d2 = self._directions(module, params, batches, shared)
        coords = torch.linspace(-self.span, self.span, self.resolution, dtype=torch.float64)
        base, v1, v2 = flatten(params), flatten(d1), flatten(d2)
        loss = torch.zeros(self.resolution, self.resolution, dtype=torch.float64)
        buffers = buffers_of(module)
        for i, b in enumerate(coords.tolist()):
            for j, a in enumerate(coords.tolist()):
                point = unflatten(base + a * v1 + b * v2, params)
                loss[i, j] = float(
                    weighted_loss(module.net, point, buffers, batches, self.criterion)
                )
        return {"a": coords, "b": coords.clone(), "loss": loss}

    @override
    def on_round_end(self, trainer: pl.Trainer, module: Any, result: RoundResult) -> None:
        if not self.is_due(result.round):
            return
        start = time.perf_counter()
        shared = None
        if self.directions == "hessian":
            shared = self._shared_eigenvectors(trainer, result.round + 1)
        g = self.grid(module, result.global_after, shared)
        seconds = time.perf_counter() - start
        self.seconds += seconds
        r = result.round + 1
        self.grids[r] = g
        loss = g["loss"]
        center = float(loss[self.resolution // 2, self.resolution // 2])
        self.log_round(trainer, r, {
            "center_loss": center,
            "max_loss": float(loss.max()),
            "mean_rise": float((loss - center).mean()),
            "seconds": seconds,
        })
        out = self.output_dir(trainer)
        if out is not None:
            torch.save({**g, "directions": self.directions, "round": r},
                       os.path.join(out, f"landscape_round{r}.pt"))
        self._draw(trainer, r, g)

    def _draw(self, trainer: Any, r: int, g: dict[str, torch.Tensor]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        a, b, z = g["a"].numpy(), g["b"].numpy(), g["loss"].numpy()
        cs = ax.contourf(a, b, z, levels=20, cmap="viridis")
        ax.contour(a, b, z, levels=20, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax, label="loss")
        ax.plot([0], [0], "r*", ms=10)
        unit = "weight-space distance" if self.directions == "hessian" else "filter norms"
        ax.set_xlabel(f"d1 ({unit})")
        ax.set_ylabel(f"d2 ({unit})")
        ax.set_title(f"loss landscape, round {r} ({self.directions} directions)")
        self.save_figure(trainer, fig, f"landscape_round{r}")
