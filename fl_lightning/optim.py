"""Server optimizers. The server steps on the pseudo-gradient ``w_global - aggregate``."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fl_lightning.validate import positive, share

__all__ = ["FedAdagrad", "FedYogi", "ServerSGD"]


class ServerSGD(torch.optim.SGD):
    """SGD with server defaults: ``lr=1`` and no momentum is exactly FedAvg's averaging
    (``w <- w - 1 * (w - aggregate) = aggregate``, up to one rounding); ``momentum=0.9`` is
    FedAvgM. Any ``torch.optim`` class (e.g. ``Adam`` for FedAdam) can be used instead.

    Example:
        >>> import torch
        >>> ServerSGD([torch.zeros(1, requires_grad=True)]).defaults["lr"]
        1.0
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        super().__init__(
            params, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, nesterov=nesterov,
        )


def _check_adaptive(lr: float, tau: float, betas: dict[str, Iterable[float]]) -> None:
    """The options of the adaptive server optimizers: ``lr > 0``, ``tau > 0``, betas in
    ``[0, 1)`` (one ``ConfigError`` line naming the option)."""
    positive(lr, "--model.server_optimizer.lr", "e.g. 0.01")
    positive(tau, "--model.server_optimizer.tau", "the adaptivity; e.g. 1e-3")
    for name, values in betas.items():
        for b in values:
            share(b, f"--model.server_optimizer.{name}", "e.g. 0.9")


class FedYogi(torch.optim.Optimizer):
    """The server optimizer of FedYogi (Reddi et al., 2021, "Adaptive Federated Optimization").

    With the pseudo-gradient ``g = w - aggregate`` in ``.grad``:

    ``m <- b1 m + (1 - b1) g``;
    ``v <- v - (1 - b2) g^2 sign(v - g^2)``;
    ``w <- w - lr m / (sqrt(v) + tau)``

    with ``v`` initialized to ``tau^2`` and no bias correction, as in the paper's Algorithm 2.
    FedAdam is ``torch.optim.Adam`` on the same pseudo-gradient (with its own defaults, e.g.
    bias correction); FedAdagrad is :class:`FedAdagrad` (with a first moment).

    Args:
        params: the global model's parameters.
        lr: server learning rate ``eta``.
        betas: ``(b1, b2)``.
        tau: adaptivity (the ``eps`` of Adam-type methods); also sets ``v_0 = tau^2``.

    Example:
        >>> import torch
        >>> w = torch.zeros(2, requires_grad=True)
        >>> opt = FedYogi([w], lr=0.1)
        >>> w.grad = torch.tensor([1.0, -1.0]); opt.step()
        >>> w.detach().sign().tolist()
        [-1.0, 1.0]
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.99),
        tau: float = 1e-3,
    ) -> None:
        _check_adaptive(lr, tau, {"betas": betas})
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "tau": tau})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["tau"] ** 2)
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                g2 = g * g
                v.sub_((1.0 - b2) * g2 * torch.sign(v - g2))
                p.sub_(group["lr"] * m / (v.sqrt() + group["tau"]))
        return loss


class FedAdagrad(torch.optim.Optimizer):
    """FedAdagrad of Reddi et al. (2021), Algorithm 2, on the pseudo-gradient ``g`` in ``.grad``:

    ``m <- b1 m + (1 - b1) g``; ``v <- v + g^2``; ``w <- w - lr m / (sqrt(v) + tau)``

    with ``v`` initialized to ``tau^2`` and no bias correction. ``torch.optim.Adagrad`` has no
    first moment (it is this rule with ``b1 = 0``).

    Args:
        params: the global model's parameters.
        lr: server learning rate ``eta``.
        beta1: first-moment decay ``b1``.
        tau: adaptivity; also sets ``v_0 = tau^2``.

    Example:
        >>> import torch
        >>> w = torch.zeros(1, requires_grad=True)
        >>> opt = FedAdagrad([w], lr=0.1, beta1=0.9, tau=1.0)
        >>> w.grad = torch.tensor([1.0]); opt.step()
        >>> round(float(w), 6)  # -0.1 * 0.1 / (sqrt(1 + 1) + 1)
        -0.004142
    """

    def __init__(
        self, params: Iterable, lr: float = 0.01, beta1: float = 0.9, tau: float = 1e-3
    ) -> None:
        _check_adaptive(lr, tau, {"beta1": (beta1,)})
        super().__init__(params, {"lr": lr, "beta1": beta1, "tau": tau})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1 = group["beta1"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["m"] = torch.zeros_like(p)
                    state["v"] = torch.full_like(p, group["tau"] ** 2)
                m, v = state["m"], state["v"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.add_(g * g)
                p.sub_(group["lr"] * m / (v.sqrt() + group["tau"]))
        return loss
