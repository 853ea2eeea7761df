"""What an algorithm is: a local update direction, optional client state, a server rule.

An algorithm never touches an optimizer, a data loader or a device. The client engine owns the
local optimizer (SGD with momentum and weight decay, fresh per client per round) and calls
:meth:`Algorithm.direction` once per local step with the client's current weights as a dict of
plain tensors; the direction it returns is what the optimizer applies. Writing the step as a
function of tensors lets the same code run one client at a time or many at once.

The contract (every hook, when it is called, what it may change) is :class:`Algorithm`'s
docstring; stateful algorithms derive from
:class:`~fl_lightning.algorithms.state.StatefulAlgorithm`. Differentiation, the network call and
the list kernels (:func:`grad_of`, :func:`foreach_mul`, ...) live in
:mod:`fl_lightning.algorithms.functional` and are re-exported here.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fl_lightning import tensors, validate
from fl_lightning.algorithms.functional import (
    adaptive_radius,
    foreach_add,
    foreach_add_,
    foreach_mul,
    foreach_mul_,
    global_norm,
    grad_of,
    in_transform,
    swapped_call,
)
from fl_lightning.algorithms.sums import RoundSums
from fl_lightning.errors import ConfigError
from fl_lightning.protocol import ClientResult, LocalContext, Params

__all__ = [
    "IGNORE_INDEX",
    "SERVER_RULES",
    "Algorithm",
    "ClientResult",
    "LocalContext",
    "Params",
    "ProximalTerm",
    "ServerRule",
    "adaptive_radius",
    "batch_mean",
    "check_nonnegative",
    "check_positive",
    "check_server_rule",
    "cross_entropy",
    "finish_round",
    "foreach_add",
    "foreach_add_",
    "foreach_mul",
    "foreach_mul_",
    "global_norm",
    "grad_of",
    "head_parameter_names",
    "in_transform",
    "kl_batchmean",
    "proximal_sources",
    "real_samples",
    "swapped_call",
    "weighted_mean",
]

#: The label of a padding sample (``F.cross_entropy``'s default ``ignore_index``). The batched
#: engine pads every client's batch to one static shape; its padding samples carry this label,
#: and every batch mean of the project's losses (:func:`batch_mean`, :func:`cross_entropy`,
#: :func:`kl_batchmean`) is taken over the other samples only.
IGNORE_INDEX = -100


def head_parameter_names(net: nn.Module) -> list[str]:
    """Names of the parameters of ``net``'s last child module (its classifier head).

    The official FedSoL code uses the same convention ("the last entry of named_children").
    """
    children = list(net.named_children())
    if not children:
        return []
    head = children[-1][0]
    return [name for name, _ in net.named_parameters() if name.split(".", 1)[0] == head]


def check_nonnegative(name: str, value: float, option: str) -> float:
    """Deprecated: :func:`fl_lightning.validate.nonnegative` with ``name`` (what the option
    means) as the hint; kept for algorithms written against earlier releases."""
    return validate.nonnegative(value, option, hint=name)


def check_positive(name: str, value: float, option: str, hint: str) -> float:
    """Deprecated: :func:`fl_lightning.validate.positive` with ``name`` (what the option
    means) and ``hint`` as the hint; kept for algorithms written against earlier releases."""
    return validate.positive(value, option, hint=f"{name}; {hint}")


def real_samples(y: Tensor) -> Tensor:
    """Mask ``(B,)`` of the samples that are not padding (label != :data:`IGNORE_INDEX`)."""
    return y != IGNORE_INDEX


def batch_mean(values: Tensor, y: Tensor | None = None) -> Tensor:
    """Mean of the per-sample ``values`` ``(B,)`` over the batch's real samples.

    Outside a ``torch.func`` transform (the sequential engine, which never pads) or without
    labels it is ``values.mean()``; inside one (the batched engine) the samples labelled
    :data:`IGNORE_INDEX` are left out: ``sum_b m_b v_b / max(sum_b m_b, 1)``, so a client's
    loss is exactly its own mean over its real samples and a fully padded batch (a client
    that has finished its steps) gives 0, not NaN.
    """
    if y is None or not in_transform():
        return values.mean()
    mask = real_samples(y).to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of ``logits`` ``(B, C)`` against class indices ``y``, over the
    samples whose label is not :data:`IGNORE_INDEX` (padding).

    ``F.cross_entropy`` outside a transform (its ``ignore_index`` is the same); inside one
    (``vmap``), the same quantity as ``-mean_b log_softmax(logits)[b, y_b]`` over the real
    samples, whose operations have native batching rules (``F.cross_entropy`` falls back to
    a decomposition written in Python there).
    """
    if in_transform():
        picked = torch.log_softmax(logits, dim=-1).gather(-1, y.clamp_min(0).unsqueeze(-1))
        return batch_mean(-picked.squeeze(-1), y)
    return F.cross_entropy(logits, y)


def kl_batchmean(log_q: Tensor, p: Tensor, y: Tensor | None = None) -> Tensor:
    """``F.kl_div(log_q, p, reduction="batchmean")`` (``KL(p || q)`` per sample, summed over
    classes, averaged over the batch), over the real samples when ``y`` is given inside a
    transform (see :func:`batch_mean`)."""
    if y is None or not in_transform():
        return F.kl_div(log_q, p, reduction="batchmean")
    return batch_mean(F.kl_div(log_q, p, reduction="none").sum(-1), y)


def cross_entropy_loss(ctx: LocalContext, params: Params, x: Tensor, y: Tensor) -> Tensor:
    return cross_entropy(ctx.forward(params, x), y)


#: The server rules an algorithm may declare (:attr:`Algorithm.server_rule`).
ServerRule = Literal["mean", "custom"]
SERVER_RULES: tuple[str, ...] = get_args(ServerRule)


def check_server_rule(owner: str, rule: object) -> str:
    """``rule`` if it is one of :data:`SERVER_RULES`, else a one-line ``ConfigError`` naming
    ``owner`` (the algorithm's class)."""
    if rule not in SERVER_RULES:
        raise ConfigError(
            f"{owner}.server_rule={rule!r} is invalid: declare one of "
            f"{', '.join(map(repr, SERVER_RULES))} ('mean' when aggregate is the data-size "
            "weighted mean of the client weights, else 'custom')"
        )
    return str(rule)


class Algorithm(abc.ABC):
    """The algorithm contract: a local update direction, optional state, a server rule.

    A subclass implements :meth:`direction` (abstract) and overrides the other hooks it needs.
    The hooks, in the order of a run, and what each may change:

    ======================== ================================= ==============================
    hook                     called                            may change
    ======================== ================================= ==============================
    :meth:`init_server`      once before the first round of a  the server state (it must keep
                             fit, and again after a checkpoint state that is already there:
                             was loaded                        loaded from the checkpoint)
    :meth:`client_begin`     per sampled client, before its    ``ctx.state`` only
                             first local step
    :meth:`frozen`           per sampled client                nothing (returns names)
    :meth:`direction`        at every local step               nothing: a pure function of
                                                               its arguments (see below)
    :meth:`client_end`       per client, after its last step   ``result.state`` and
                                                               ``result.extras`` only
    :meth:`commit_client`    per client kept by the round      the client state store
                             (finite update), after training
    :meth:`begin_sums`       once per round, before training   nothing (returns the sums)
    :meth:`fold`             per kept client, as it finishes,  the sums only
                             after :meth:`commit_client`
    :meth:`finish`           once per round, after the last    the server state; returns the
                             fold                              new global weights
    :meth:`aggregate`        instead of the three above when   the server state; returns the
                             the round holds every result      new global weights
    :meth:`state_dict` /     at a checkpoint / a resume        (load: all state)
    :meth:`load_state_dict`
    ======================== ================================= ==============================

    ``client_begin`` and ``client_end`` never change the algorithm, so a client whose update
    is dropped (non-finite, or lost by a Flower node) leaves no trace: only
    :meth:`commit_client` writes client state. Clients may run one at a time, many at once
    (the batched engine), on another DDP rank or on a Flower node: the server state a client
    reads must therefore be what :meth:`state_dict` saves (the Flower apps send its
    ``"server"`` part, :meth:`server_state_dict`, to the nodes).

    :meth:`direction` runs inside ``torch.vmap`` (and ``torch.compile``) in the batched engine:
    no Python branch on a tensor's value, no ``.item()``; ``ctx.lr`` may be a 0-d tensor;
    batches may hold padding samples labelled :data:`IGNORE_INDEX` (``ctx.padded``), so every
    batch mean goes through :func:`batch_mean` (or :func:`cross_entropy`, :func:`kl_batchmean`).
    Differentiate with :func:`grad_of` and call the network with :meth:`LocalContext.forward`.

    Declarations (class attributes; an instance may set its own in ``__init__``, as FedSoL
    copies its proximal source's):

    Attributes:
        name: short lower-case name.
        client_state: names of the per-client state entries kept between rounds (SCAFFOLD:
            ``("c_i",)``); empty when clients are stateless. Stateful algorithms derive from
            :class:`~fl_lightning.algorithms.state.StatefulAlgorithm`, which owns the store.
        server_rule: ``"mean"`` when :meth:`aggregate` is the data-size weighted mean of the
            client weights (DDP computes it as one flat all-reduce; robust aggregators, DP and
            secure aggregation may replace it); ``"custom"`` when it needs more (the extras).
            Checked when the class is defined.
        batchable: whether the batched engine (``torch.vmap`` over clients) can run it.
        plain_gradient: fast path: :meth:`direction` is exactly the gradient of
            :meth:`task_loss` (:meth:`task_grad`), so an engine may vmap only the loss and take
            every client's gradient with one backward. FedAvg declares it.
        cross_entropy_task: fast path: :meth:`task_loss` is the cross-entropy of the logits
            (FedSoL's head-only shortcut computes it from the penultimate features).
        streamed: the server rule is written as sums (:meth:`begin_sums`, :meth:`fold`,
            :meth:`finish`), so the round folds each client's result as it finishes and keeps
            ``O(model)`` memory. Set to ``False`` when the class is defined for a subclass that
            overrides :meth:`aggregate` without :meth:`fold` (the round then keeps every
            result until :meth:`aggregate`).

    A subclass that overrides the method a fast-path flag vouches for (``direction`` or
    ``task_grad`` for ``plain_gradient``, ``task_loss`` for ``cross_entropy_task``) and does not
    declare the flag itself gets it set to ``False`` when the class is defined.

    Example:
        >>> from fl_lightning.algorithms import FedAvg
        >>> algo = FedAvg()
        >>> algo.name, algo.client_state, algo.server_rule, algo.batchable, algo.plain_gradient
        ('fedavg', (), 'mean', True, True)
    """

    name: str = "algorithm"
    client_state: tuple[str, ...] = ()
    server_rule: ServerRule = "mean"
    batchable: bool = True
    plain_gradient: ClassVar[bool] = False
    cross_entropy_task: ClassVar[bool] = True
    streamed: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = vars(cls)
        if "server_rule" in own:
            check_server_rule(cls.__name__, own["server_rule"])
        if ("direction" in own or "task_grad" in own) and "plain_gradient" not in own:
            cls.plain_gradient = False
        if "task_loss" in own and "cross_entropy_task" not in own:
            cls.cross_entropy_task = False
        if "aggregate" in own and "fold" not in own and "streamed" not in own:
            cls.streamed = False

    def init_server(self, global_params: Params) -> None:
        """Create the server state for a run whose global weights are ``global_params``
        (read-only); state already there (loaded from a checkpoint) must be kept. Called once
        before the first round of a fit and again after a resume. Default: no server state."""
        del global_params

    def task_loss(self, ctx: LocalContext, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """The client's own objective on a batch: the cross-entropy ``CE(f(w; x), y)``.

        Every algorithm builds its direction from this loss, so a subclass that overrides it
        (e.g. a least-squares loss in tests) changes the task and nothing else.
        """
        return cross_entropy_loss(ctx, params, x, y)

    def task_grad(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Gradient of :meth:`task_loss` w.r.t. every parameter, and the loss."""
        return grad_of(lambda p: self.task_loss(ctx, p, x, y), params)

    @abc.abstractmethod
    def direction(
        self, params: Params, x: Tensor, y: Tensor, ctx: LocalContext
    ) -> tuple[Params, Tensor]:
        """Return the local update direction at ``params`` for the batch, and the batch loss
        (a 0-d tensor). Abstract; this implementation (the task gradient, :meth:`task_grad`)
        may be reached with ``super().direction(...)``."""
        return self.task_grad(params, x, y, ctx)

    def frozen(self, ctx: LocalContext) -> set[str]:
        """Names of parameters the local optimizer must not touch this round (default none)."""
        del ctx
        return set()

    def client_begin(self, ctx: LocalContext) -> None:
        """Called before a client's first local step: read its stored state into ``ctx.state``
        (never change the algorithm here)."""
        del ctx

    def client_end(self, ctx: LocalContext, result: ClientResult) -> None:
        """Called after a client's last local step: fill ``result.state`` (the client's new
        state) and ``result.extras`` (what the server rule needs); never change the
        algorithm here."""
        del ctx, result

    def commit_client(self, result: ClientResult) -> None:
        """Store ``result.state`` as the client's state; called by the round only for clients
        whose update is kept (finite). Stateless algorithms have nothing to store.

        Raises:
            TypeError: if a client returned state but the algorithm keeps no store (derive
                from :class:`~fl_lightning.algorithms.state.StatefulAlgorithm`).
        """
        if result.state:
            raise TypeError(
                f"{type(self).__name__}.client_end returned client state "
                f"{sorted(result.state)} but the algorithm keeps no client store: derive it "
                "from fl_lightning.algorithms.StatefulAlgorithm"
            )

    def begin_sums(
        self,
        global_params: Params,
        *,
        num_clients: int | None = None,
        total_samples: int | None = None,
    ) -> RoundSums:
        """Start a round's streamed server rule (before its first client reports). Default:
        the sums of the data-size weighted mean
        (:class:`~fl_lightning.algorithms.sums.RoundSums`); never change the server state
        here."""
        return RoundSums(list(global_params), num_clients=num_clients,
                         total_samples=total_samples)

    def fold(self, sums: RoundSums, result: ClientResult) -> None:
        """Add one kept client's result to the round's sums (called as each client finishes,
        after :meth:`commit_client`; the result is dropped afterwards, so keep only sums).
        Default: ``sum_k n_k w_k``. Never change the server state here. Under DDP each rank
        folds its own clients and the ranks' :class:`RoundSums` are added (tensors, counts,
        number scalars; bools or-ed): every accumulator must start at zero and add a term per
        client (``check_algorithm(..., ddp=True)`` checks it)."""
        sums.count(result.num_samples)
        sums.add("mean", result.params, float(result.num_samples))

    def finish(self, sums: RoundSums, global_params: Params) -> Params:
        """The new global weights from the round's sums (at least one client was folded); the
        server state may change here. Default: the data-size weighted mean."""
        del global_params
        return sums.mean()

    def aggregate(
        self,
        global_params: Params,
        results: Sequence[ClientResult],
        *,
        num_clients: int | None = None,
        total_samples: int | None = None,
    ) -> Params:
        """New global weights from the clients' results: :meth:`begin_sums`, :meth:`fold`
        of every result in order, :meth:`finish` (the data-size weighted average by default),
        so the list and the streamed round give the same numbers.

        ``num_clients`` and ``total_samples`` describe the whole population (sampled or not);
        server rules such as SCAFFOLD's and FedDyn's need them. An algorithm that overrides
        this method without :meth:`fold` is not streamed (:attr:`streamed` is ``False``):
        the round then keeps every client's result until it calls this.
        """
        sums = self.begin_sums(global_params, num_clients=num_clients,
                               total_samples=total_samples)
        for r in results:
            self.fold(sums, r)
        return self.finish(sums, global_params)

    def server_state_dict(self) -> dict[str, Any]:
        """The server state a client's local step reads (``{name: {param: tensor}}``, entries
        that are not set yet left out): what the Flower server sends its nodes. Default none."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs (stateless algorithms: ``{}``)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        del state


@runtime_checkable
class ProximalTerm(Protocol):
    """What FedSoL can use as its perturbation source (``--model.algorithm.proximal``): an
    algorithm whose local objective adds a proximal term to the task loss.

    ``proximal_gradient(params, x, y, ctx) -> (gradient, value)`` returns the gradient of that
    term w.r.t. every parameter in ``params`` and its value, with the client's state in
    ``ctx.state`` as :meth:`Algorithm.client_begin` left it. It obeys :meth:`Algorithm.direction`'s
    rules (it runs inside ``vmap``). FedProx (``mu (w - w_g)``), SCAFFOLD (``c - c_i``), FedDyn,
    MOON, FedNTD and FedNova implement it; an implementation whose options leave no term
    (FedNova without ``ccvr``) raises a ``ConfigError`` there.
    """

    def proximal_gradient(
        self, params: Params, x: Tensor, y: Tensor | None, ctx: LocalContext
    ) -> tuple[Params, Tensor]: ...


def proximal_sources() -> list[str]:
    """Names of the registered algorithms (``fl_lightning.algorithms.__all__``) that implement
    :class:`ProximalTerm`, sorted: the choices of FedSoL's ``proximal`` option."""
    import fl_lightning.algorithms as registered

    names = []
    for name in registered.__all__:
        obj = getattr(registered, name)
        if (isinstance(obj, type) and issubclass(obj, Algorithm) and not inspect.isabstract(obj)
                and issubclass(obj, ProximalTerm)):
            names.append(name)
    return sorted(names)


def finish_round(
    algorithm: Algorithm,
    global_params: Params,
    results: Sequence[ClientResult],
    *,
    num_clients: int | None = None,
    total_samples: int | None = None,
) -> Params:
    """The server side of a round without systems mechanisms: commit every client's new state
    (:meth:`Algorithm.commit_client`), then return the server rule's aggregate."""
    for r in results:
        algorithm.commit_client(r)
    return algorithm.aggregate(
        global_params, results, num_clients=num_clients, total_samples=total_samples
    )


def weighted_mean(global_params: Params, results: Sequence[ClientResult]) -> Params:
    """``sum_k n_k w_k / sum_k n_k`` over the results, for every entry of ``global_params``
    (:func:`fl_lightning.tensors.weighted_mean` with :func:`~fl_lightning.tensors.data_weights`
    of the clients' sample counts, in the default dtype)."""
    weights = tensors.data_weights([r.num_samples for r in results]).tolist()
    return {
        name: tensors.weighted_mean([r.params[name] for r in results], weights)
        for name in global_params
    }
