"""FedSoL (Lee et al., CVPR 2024): Federated Stability on Learning.

The local step takes the gradient of the original loss at weights perturbed along the gradient
of a proximal loss, so the update is robust to the perturbation that the proximal objective
would cause, without adding the proximal gradient to the update itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, grad_and_value, vjp

from fl_lightning import validate
from fl_lightning.algorithms.base import (
    Algorithm,
    ClientResult,
    LocalContext,
    Params,
    ProximalTerm,
    adaptive_radius,
    cross_entropy,
    foreach_add_,
    foreach_mul,
    foreach_mul_,
    global_norm,
    grad_of,
    in_transform,
    kl_batchmean,
    proximal_sources,
)
from fl_lightning.algorithms.features import FeatureCaller
from fl_lightning.algorithms.sums import RoundSums

__all__ = ["FedSoL", "kl_to_global"]


def kl_to_global(local_logits: Tensor, global_logits: Tensor, temperature: float,
                 y: Tensor | None = None) -> Tensor:
    """``KL(p_g || p_l)`` of temperature-softened outputs, averaged over the batch (over its
    real samples when the labels ``y`` are given: see
    :func:`~fl_lightning.algorithms.base.batch_mean`).

    ``p = softmax(logits / T)``; no ``T^2`` factor; ``global_logits`` carry no gradient.
    """
    target = torch.softmax(global_logits.detach() / temperature, dim=1)
    return kl_batchmean(F.log_softmax(local_logits / temperature, dim=1), target, y)


class FedSoL(Algorithm):
    """FedSoL with the adaptive (default) or fixed perturbation radius.

    For a batch ``(x, y)`` at local weights ``w`` with global weights ``w_g``:

    1. proximal loss ``L_p(w) = KL(softmax(f(w_g; x)/T) || softmax(f(w; x)/T))``, batch mean,
       and its gradient ``g_p`` (w.r.t. the perturbed parameters only);
    2. perturbation ``eps = rho * Lambda * g_p / (||g_p||_2 + 1e-12)``, the norm taken over all
       perturbed parameters; adaptive ``Lambda`` per parameter tensor is ``|w - w_g|``
       L2-normalized along dimension 0 of that tensor (so ``eps = 0`` exactly at the first
       local step), the fixed variant uses ``Lambda = 1``;
    3. direction ``grad CE(w + eps)`` on the same batch; the optimizer steps from ``w``.

    The reported loss is ``CE(w + eps)`` (the second pass; at the first step it is ``CE(w)``).

    Note:
        With ``adaptive=False`` the KL gradient at the first local step is rounding noise
        (local and global outputs agree), and its normalization still perturbs by ``rho`` in
        that arbitrary direction. The official code behaves the same; the adaptive radius
        avoids it.

    Args:
        rho: perturbation strength (paper Table 4: 2.0; the official config file uses 1.0).
        temperature: softening temperature ``T`` of the proximal KL (3 in the paper).
        adaptive: per-parameter adaptive radius ``Lambda`` (True) or ``Lambda = 1`` (False).
        perturb_head: perturb the classifier head (the network's last child module).
        perturb_body: perturb every other parameter.
        proximal: another algorithm whose proximal term replaces the KL as the perturbation
            source (paper Table 7): one that implements
            :class:`~fl_lightning.algorithms.base.ProximalTerm`, e.g. ``FedProx``
            (``mu (w - w_g)``), ``SCAFFOLD`` (``c - c_i``), ``FedDyn``
            (``alpha (w - w_g) - h_i``), ``MOON`` (contrastive gradient), ``FedNTD`` or
            ``FedNova(ccvr=True)`` (``c_i``). Its client state, server state and server rule
            become FedSoL's (e.g. SCAFFOLD's control variates are updated, FedDyn's ``h`` is
            applied).
        source: ``proximal`` (FedSoL: ``eps_p`` along ``g_p``), ``local`` (along the local
            loss's own gradient ``g_l``, SAM's direction with FedSoL's radius) or ``both``
            (``eps_c`` along ``g_p + g_l``, paper Table 6 A4); the last two are ablations.
        proximal_in_update: ``beta``: also add ``beta`` times the proximal gradient to the
            direction (0 in FedSoL, which keeps the proximal term out of the update); an
            ablation (paper Table 6 A2-A6).
        local_at: where the local loss's gradient is taken: ``perturbed`` (``w + eps``, FedSoL)
            or ``w`` (Table 6 A2).
        proximal_at: where the added proximal gradient is taken: ``w`` (A5, A6) or
            ``perturbed`` (``w + eps``, A2-A4).

    Raises:
        ConfigError: for a negative ``rho``, a non-positive ``temperature``, a ``proximal``
            algorithm without a proximal term, or an unknown ``source``.

    Example:
        >>> FedSoL().rho
        2.0
    """

    name = "fedsol"

    def __init__(
        self,
        rho: float = 2.0,
        temperature: float = 3.0,
        adaptive: bool = True,
        perturb_head: bool = True,
        perturb_body: bool = True,
        proximal: Algorithm | None = None,
        source: Literal["proximal", "local", "both"] = "proximal",
        proximal_in_update: float = 0.0,
        local_at: Literal["perturbed", "w"] = "perturbed",
        proximal_at: Literal["w", "perturbed"] = "w",
    ) -> None:
        self.rho = validate.nonnegative(rho, "--model.algorithm.rho", "the perturbation strength")
        self.temperature = validate.positive(
            temperature, "--model.algorithm.temperature", "the KL temperature; the paper uses 3"
        )
        self.adaptive = bool(adaptive)
        self.perturb_head = bool(perturb_head)
        self.perturb_body = bool(perturb_body)
        if proximal is not None and not isinstance(proximal, ProximalTerm):
            raise validate.invalid(
                "--model.algorithm.proximal", type(proximal).__name__,
                "an algorithm with a proximal term (ProximalTerm.proximal_gradient): one of "
                f"{', '.join(proximal_sources())}", "or unset: the KL to the global model",
            )
        validate.choice(source, "--model.algorithm.source", ("proximal", "local", "both"),
                        "'proximal': FedSoL; 'local': along the local loss, as SAM does; "
                        "'both': along their sum")
        for option, value in (("local_at", local_at), ("proximal_at", proximal_at)):
            validate.choice(value, f"--model.algorithm.{option}", ("perturbed", "w"),
                            "'perturbed': at w + eps")
        self.local_at = local_at
        self.proximal_at = proximal_at
        self.proximal = proximal
        if proximal is not None:  # its client state and server rule are FedSoL's
            self.client_state = proximal.client_state
            self.server_rule = proximal.server_rule
            self.streamed = proximal.streamed
            self.batchable = proximal.batchable
        self.source = source
        self._features: FeatureCaller | None = None
        self.proximal_in_update = validate.nonnegative(
            proximal_in_update, "--model.algorithm.proximal_in_update",
            "the weight of the proximal gradient in the update",
        )

    def proximal_gradient(
        self, params: Params, x: Tensor, y: Tensor | None, ctx: LocalContext,
        names: list[str] | None = None,
    ) -> tuple[Params, Tensor]:
        """Gradient of the proximal objective (only for ``names``, default all) and its value.

        Without ``proximal`` it is the KL to the global model's outputs; otherwise it is the
        proximal algorithm's own term (FedProx's L2, SCAFFOLD's ``<c - c_i, w>``, ...).
        """
        names = list(params) if names is None else names
        if self.proximal is not None:
            g, value = self.proximal.proximal_gradient(params, x, y, ctx)
            return {k: g[k] for k in names}, value
        with torch.no_grad():
            global_logits = ctx.forward(ctx.global_params, x)

        def proximal(p: Params) -> Tensor:
            return kl_to_global(ctx.forward(p, x), global_logits, self.temperature, y)

        return grad_of(proximal, params, names)

    def perturbation(
        self, params: Params, x: Tensor, ctx: LocalContext, y: Tensor | None = None
    ) -> tuple[Params, Tensor]:
        """The perturbation ``eps`` (only for the perturbed parameters) and the source loss."""
        names = ctx.select(params, self.perturb_head, self.perturb_body)
        if not names:
            return {}, torch.zeros((), dtype=x.dtype, device=x.device)
        if self.source == "local":
            g, prox_loss = grad_of(lambda p: self.task_loss(ctx, p, x, y), params, names)
        elif self.source == "both":
            g_p, prox_loss = self.proximal_gradient(params, x, y, ctx, names)
            g_l, _ = grad_of(lambda p: self.task_loss(ctx, p, x, y), params, names)
            g = {k: g_p[k] + g_l[k] for k in names}
        else:
            g, prox_loss = self.proximal_gradient(params, x, y, ctx, names)
        return self._scaled(g, params, ctx), prox_loss

    def _scaled(self, g: Params, params: Params, ctx: LocalContext) -> Params:
        """``eps = rho * Lambda * g / (||g||_2 + 1e-12)`` for the parameters in ``g``."""
        names = list(g)
        grads = [g[k] for k in names]
        scale = self.rho / (global_norm(grads) + 1e-12)
        if self.adaptive:  # (Lambda * g) * scale, written into Lambda's fresh tensors
            lam = adaptive_radius([params[k] for k in names],
                                  [ctx.global_params[k] for k in names])
            eps = foreach_mul_(foreach_mul_(lam, grads), scale)
        else:  # g may be the proximal algorithm's own tensors: not written into
            eps = foreach_mul(grads, scale)
        return dict(zip(names, eps, strict=True))

    @staticmethod
    def _perturbed(params: Params, eps: Params) -> Params:
        """``params`` with ``w + eps`` for the parameters in ``eps``; the sums are written into
        ``eps``'s tensors (its own, from :meth:`_scaled`), which are not to be used after."""
        perturbed = dict(params)
        if eps:
            names = list(eps)
            moved = foreach_add_([eps[k] for k in names], [params[k] for k in names])
            perturbed.update(zip(names, moved, strict=True))
        return perturbed

    def _radius_is_zero(self, params: Params, ctx: LocalContext) -> bool:
        """Whether the adaptive radius ``Lambda = |w - w_g| / ||.||`` is exactly 0 (the first
        local step, where ``w = w_g``): then ``eps = 0`` and the proximal pass is skipped (the
        result is the same). Checked only outside ``vmap`` (a data-dependent branch)."""
        if in_transform() or not self.adaptive or ctx.step != 0:  # (a compiled step must
            # not read ctx.step: it would be specialized on every step's value)
            return False
        names = ctx.select(params, self.perturb_head, self.perturb_body)
        return all(torch.equal(params[k], ctx.global_params[k]) for k in names)

    def _head_only_fast(self, ctx: LocalContext) -> FeatureCaller | None:
        """The feature caller when the head-only shortcut applies (else ``None``): only the
        head is perturbed, by the KL to the global model, and the task is the cross-entropy."""
        if (self.perturb_body or not self.perturb_head or self.proximal is not None
                or self.source != "proximal" or self.proximal_in_update
                or self.local_at != "perturbed"
                or not self.cross_entropy_task
                or not callable(getattr(ctx.net, "forward_features", None))):
            return None
        if self._features is None or self._features.net is not ctx.net:
            self._features = FeatureCaller(ctx.net, "FedSoL")
        return self._features

    def _head_only_direction(
        self, caller: FeatureCaller, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Head-only FedSoL with one forward of the body instead of two.

        The body is not perturbed, so its features ``z = f_body(w_body; x)`` are the same at
        ``w`` and at ``w + eps``: the KL gradient w.r.t. the head and the cross-entropy at the
        perturbed head both start from ``z``, and the body's gradient is the vector-Jacobian
        product of the cross-entropy's gradient w.r.t. ``z``. The result is the same as the
        general path's (the same operations, in another order).
        """
        head = set(ctx.head_names())
        body_params = {k: v for k, v in params.items() if k not in head}
        head_params = {k: v for k, v in params.items() if k in head}
        buffers = ctx.buffers
        with torch.no_grad():
            global_logits = ctx.forward(ctx.global_params, x)
        z, body_vjp = vjp(lambda p: caller.features(p, buffers, x), body_params)
        z_fixed = z.detach()
        g_head = grad(
            lambda h: kl_to_global(caller.logits(h, buffers, z_fixed), global_logits,
                                   self.temperature, y)
        )(head_params)
        eps = self._scaled(g_head, params, ctx)
        perturbed = self._perturbed(head_params, eps)
        (g_perturbed, g_z), loss = grad_and_value(
            lambda h, feats: cross_entropy(caller.logits(h, buffers, feats), y), argnums=(0, 1)
        )(perturbed, z)
        (g_body,) = body_vjp(g_z)
        return {k: (g_perturbed[k] if k in head else g_body[k]) for k in params}, loss

    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        caller = self._head_only_fast(ctx)
        if caller is not None:
            return self._head_only_direction(caller, params, x, y, ctx)
        eps = {} if self._radius_is_zero(params, ctx) else self.perturbation(params, x, ctx, y)[0]
        perturbed = self._perturbed(params, eps)
        at = perturbed if self.local_at == "perturbed" else params
        out, loss = grad_of(lambda p: self.task_loss(ctx, p, x, y), at, list(params))
        if self.proximal_in_update:
            at_p = perturbed if self.proximal_at == "perturbed" else params
            prox, _ = self.proximal_gradient(at_p, x, y, ctx)
            out = {k: g + self.proximal_in_update * prox[k] for k, g in out.items()}
        return out, loss

    # The proximal algorithm's client state, server state and server rule are FedSoL's.
    def init_server(self, global_params: Params) -> None:
        if self.proximal is not None:
            self.proximal.init_server(global_params)

    def client_begin(self, ctx: LocalContext) -> None:
        self._head_only_fast(ctx)  # its feature caller is made here, outside the local step
        if self.proximal is not None:
            self.proximal.client_begin(ctx)

    def client_end(self, ctx: LocalContext, result: ClientResult) -> None:
        if self.proximal is not None:
            self.proximal.client_end(ctx, result)

    def commit_client(self, result: ClientResult) -> None:
        if self.proximal is not None:
            self.proximal.commit_client(result)

    def begin_sums(
        self,
        global_params: Params,
        *,
        num_clients: int | None = None,
        total_samples: int | None = None,
    ) -> RoundSums:
        source = self.proximal if self.proximal is not None else super()
        return source.begin_sums(global_params, num_clients=num_clients,
                                 total_samples=total_samples)

    def fold(self, sums: RoundSums, result: ClientResult) -> None:
        if self.proximal is not None:
            self.proximal.fold(sums, result)
        else:
            super().fold(sums, result)

    def finish(self, sums: RoundSums, global_params: Params) -> Params:
        if self.proximal is not None:
            return self.proximal.finish(sums, global_params)
        return super().finish(sums, global_params)

    def aggregate(
        self,
        global_params: Params,
        results: Sequence[ClientResult],
        *,
        num_clients: int | None = None,
        total_samples: int | None = None,
    ) -> Params:
        if self.proximal is not None and not self.proximal.streamed:  # its own list rule
            return self.proximal.aggregate(
                global_params, results, num_clients=num_clients, total_samples=total_samples
            )
        return super().aggregate(global_params, results, num_clients=num_clients,
                                 total_samples=total_samples)

    def frozen(self, ctx: LocalContext) -> set[str]:
        return self.proximal.frozen(ctx) if self.proximal is not None else set()

    def server_state_dict(self) -> dict[str, Any]:
        return self.proximal.server_state_dict() if self.proximal is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return self.proximal.state_dict() if self.proximal is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.proximal is not None:
            self.proximal.load_state_dict(state)
