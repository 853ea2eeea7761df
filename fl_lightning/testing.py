"""A conformance kit for algorithms: the checks the project's own algorithms pass.

In the spirit of torchmetrics' ``MetricTester``: :func:`check_algorithm` runs an algorithm
(one of the project's or one written outside it, following ``docs/extending.md``) through a
tiny float64 federation (6 clients of unequal sizes on a 2-layer perceptron, 2 rounds, client
state read back in the second round) and checks, each failing with a
:class:`ConformanceError` that names the property that broke:

- ``declarations``: an :class:`~fl_lightning.algorithms.Algorithm`, ``server_rule`` one of
  the declared rules, client state only with a
  :class:`~fl_lightning.algorithms.StatefulAlgorithm` store;
- ``engines``: the batched engine (``torch.vmap`` over clients) gives the sequential engine's
  client weights, losses, steps, client state, extras, global weights and saved state (where
  the algorithm is ``batchable``);
- ``resume``: saving the state after round 1 (``state_dict``, through ``torch.save``) and
  continuing in a fresh instance gives the uninterrupted run bit for bit;
- ``skipped_client``: a client whose update is not finite (its samples are NaN) and is dropped
  by the round's screen leaves no trace: the run ends exactly as the run without that client;
- ``proximal``: an algorithm that implements
  :class:`~fl_lightning.algorithms.base.ProximalTerm` gives a gradient for every parameter and
  runs as FedSoL's perturbation source, which takes over its state;
- ``ddp`` (opt-in, it starts processes): a 2-process gloo DDP fit of the command line gives the
  one-process fit's checkpoint (weights and algorithm state) within 1e-6.

The rounds are driven as the round does them: ``init_server`` before the first round (and
after a resume), the engine, the non-finite screen, ``commit_client`` for the kept clients,
``aggregate``, the buffers' weighted mean.

Example:
    >>> from fl_lightning.algorithms import FedProx
    >>> report = check_algorithm(FedProx, {"mu": 0.1})
    >>> sorted(report)
    ['ddp', 'declarations', 'engines', 'proximal', 'resume', 'skipped_client']
    >>> report["engines"] < 1e-12, report["resume"], report["ddp"]
    (True, 0.0, 'not run (ddp=False)')
"""

from __future__ import annotations

import copy
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fl_lightning.algorithms.base import (
    Algorithm,
    ClientResult,
    LocalContext,
    ProximalTerm,
    check_server_rule,
    finish_round,
)
from fl_lightning.algorithms.state import StatefulAlgorithm
from fl_lightning.engine import ClientPlan, RoundPlan, SequentialEngine, average_buffers
from fl_lightning.errors import ConfigError

__all__ = ["ConformanceError", "check_algorithm"]

#: client sizes (unequal, partial last batches at batch size 10)
SIZES = (23, 50, 7, 31, 16, 12)
#: the clients of each round: clients 0 and 2 come back, so their stored state is read again
ROUNDS = ([0, 1, 2, 3], [2, 4, 0])
#: the client whose samples are NaN in the ``skipped_client`` check
VICTIM = 2
LR, MOMENTUM, WEIGHT_DECAY, BATCH = 0.05, 0.9, 1e-3, 10


class ConformanceError(AssertionError):
    """A property of the algorithm contract does not hold (the message says which)."""


@dataclass
class _Problem:
    net: nn.Module
    x: Tensor
    y: Tensor
    owned: list[Tensor]


def _problem(net: nn.Module | None, seed: int) -> _Problem:
    """Float64 data of 4 classes on 1x6x6 inputs; client ``c`` owns a contiguous block."""
    from fl_lightning.models import MLP2NN

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = (MLP2NN(4, (1, 6, 6), hidden=8) if net is None else copy.deepcopy(net)).double()
    n = sum(SIZES)
    x = torch.randn(n, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=gen)
    starts = [sum(SIZES[:c]) for c in range(len(SIZES))]
    owned = [torch.arange(s, s + size) for s, size in zip(starts, SIZES, strict=True)]
    return _Problem(net, x, y, owned)


def _plan(problem: _Problem, round_idx: int, ids: Sequence[int]) -> RoundPlan:
    clients = []
    for cid in ids:
        gen = torch.Generator().manual_seed(1000 * round_idx + cid)
        own = problem.owned[cid]
        clients.append(ClientPlan(cid, len(own), list(own[torch.randperm(len(own),
                                                                        generator=gen)]
                                                          .split(BATCH))))
    return RoundPlan(round_idx, clients, num_clients=len(SIZES), total_samples=sum(SIZES))


def _finite(result: ClientResult) -> bool:
    return bool(torch.isfinite(result.loss).all()) and all(
        bool(torch.isfinite(v).all()) for v in result.params.values())


def _run(algorithm: Algorithm, engine: Any, problem: _Problem, rounds: Sequence[Sequence[int]],
         *, start: int = 0, net: nn.Module | None = None, x: Tensor | None = None):
    """Rounds ``start, start + 1, ...`` of ``rounds`` as the round runs them; returns every
    round's client results and the network with the final global weights."""
    net = copy.deepcopy(problem.net if net is None else net)
    x = problem.x if x is None else x
    history = []
    for r in range(start, len(rounds)):
        gp = {k: p.detach().clone() for k, p in net.named_parameters()}
        buffers = {k: b.detach() for k, b in net.named_buffers()}
        if r == start:  # before the first round, and after a resume
            algorithm.init_server(gp)
        plan = _plan(problem, r, rounds[r])
        results = engine.run_round(algorithm, net, gp, buffers, plan, (x, problem.y), LR,
                                   MOMENTUM, WEIGHT_DECAY)
        kept = [res for res in results if _finite(res)]
        new = finish_round(algorithm, gp, kept, num_clients=plan.num_clients,
                           total_samples=plan.total_samples)
        with torch.no_grad():
            for k, p in net.named_parameters():
                p.copy_(new[k])
        average_buffers(net, kept)
        history.append(results)
    return history, net


def _flat(value: Any, path: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{path}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {k: v for i, sub in enumerate(value) for k, v in _flat(sub, f"{path}/{i}").items()}
    return {path: value}


def _max_diff(a: Any, b: Any, what: str, name: str) -> float:
    """Largest absolute difference between two nested structures of tensors and numbers."""
    fa, fb = _flat(a), _flat(b)
    if fa.keys() != fb.keys():
        raise ConformanceError(
            f"check_algorithm({name}): {what}: the entries differ: "
            f"{sorted(set(fa) ^ set(fb))[:5]}")
    worst = 0.0
    for k, u in fa.items():
        v = fb[k]
        if isinstance(u, Tensor) and isinstance(v, Tensor):
            if u.shape != v.shape:
                raise ConformanceError(f"check_algorithm({name}): {what}: {k} has shape "
                                       f"{tuple(u.shape)} vs {tuple(v.shape)}")
            if u.numel():
                worst = max(worst, float((u.double() - v.double()).abs().max()))
        elif u != v and not (u is None and v is None):
            raise ConformanceError(f"check_algorithm({name}): {what}: {k} is {u!r} vs {v!r}")
    return worst


def _results(history: Sequence[Sequence[ClientResult]]) -> list[dict[str, Any]]:
    return [{"id": r.client_id, "steps": r.num_steps, "params": r.params, "loss": r.loss,
             "state": r.state, "extras": r.extras, "buffers": r.buffers}
            for rs in history for r in rs]


def _weights(net: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in net.state_dict().items()}


def _state(algorithm: Algorithm) -> dict[str, Any]:
    """The algorithm's state as a checkpoint holds it (``torch.save`` and back)."""
    buf = io.BytesIO()
    torch.save(algorithm.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _declarations(algo: Algorithm, name: str) -> str:
    if not isinstance(algo, Algorithm):
        raise ConformanceError(f"check_algorithm({name}): declarations: "
                               f"{type(algo).__name__} is not an fl_lightning Algorithm")
    try:
        check_server_rule(type(algo).__name__, algo.server_rule)
    except ConfigError as err:
        raise ConformanceError(f"check_algorithm({name}): declarations: {err}") from None
    if algo.client_state and not isinstance(algo, StatefulAlgorithm) and not isinstance(
            getattr(algo, "proximal", None), StatefulAlgorithm):
        raise ConformanceError(
            f"check_algorithm({name}): declarations: client_state={algo.client_state} needs "
            "a client store: derive from fl_lightning.algorithms.StatefulAlgorithm")
    return "ok"


def _sequential(make: Callable[[], Algorithm], problem: _Problem):
    """The sequential run over :data:`ROUNDS`: ``(algorithm, history, network)``."""
    hist, net = _run(algo := make(), SequentialEngine(), problem, ROUNDS)
    return algo, hist, net


def _engines(make: Callable[[], Algorithm], problem: _Problem, name: str, atol: float,
             reference: tuple) -> float:
    from fl_lightning.engines import BatchedEngine

    seq, seq_hist, seq_net = reference
    bat_hist, bat_net = _run(bat := make(), BatchedEngine(), problem, ROUNDS)
    diff = max(_max_diff(_results(seq_hist), _results(bat_hist), "engines (client results)",
                         name),
               _max_diff(_weights(seq_net), _weights(bat_net), "engines (global weights)", name),
               _max_diff(seq.state_dict(), bat.state_dict(), "engines (state_dict)", name))
    if not diff <= atol:
        raise ConformanceError(
            f"check_algorithm({name}): engines: the batched engine differs from the sequential "
            f"engine by {diff:.3g} > {atol:g} in float64 (a Python branch on a tensor, a batch "
            "mean over padding samples, or state written outside client_end?)")
    return diff


def _resume(make: Callable[[], Algorithm], problem: _Problem, name: str,
            reference: tuple) -> float:
    engine = SequentialEngine()
    whole, _, whole_net = reference
    first = make()
    _, net = _run(first, engine, problem, ROUNDS[:1])
    resumed = make()
    resumed.load_state_dict(_state(first))
    _, net = _run(resumed, engine, problem, ROUNDS, start=1, net=net)
    diff = max(_max_diff(_weights(whole_net), _weights(net), "resume (global weights)", name),
               _max_diff(whole.state_dict(), resumed.state_dict(), "resume (state_dict)", name))
    if diff != 0.0:
        raise ConformanceError(
            f"check_algorithm({name}): resume: continuing from state_dict() after round 1 "
            f"differs from the uninterrupted run by {diff:.3g} (state that state_dict does not "
            "save, or init_server that overwrites loaded state?)")
    return diff


def _skipped(make: Callable[[], Algorithm], problem: _Problem, name: str) -> float:
    engine = SequentialEngine()
    x = problem.x.clone()
    x[problem.owned[VICTIM]] = float("nan")
    with_victim = make()
    hist, net_a = _run(with_victim, engine, problem, ROUNDS, x=x)
    if all(_finite(r) for rs in hist for r in rs):
        raise ConformanceError(f"check_algorithm({name}): skipped_client: NaN samples gave "
                               f"client {VICTIM} a finite update")
    absent = make()
    _, net_b = _run(absent, engine, problem,
                    [[c for c in ids if c != VICTIM] for ids in ROUNDS])
    diff = max(_max_diff(_weights(net_a), _weights(net_b), "skipped_client (weights)", name),
               _max_diff(with_victim.state_dict(), absent.state_dict(),
                         "skipped_client (state_dict)", name))
    if diff != 0.0:
        raise ConformanceError(
            f"check_algorithm({name}): skipped_client: a dropped non-finite client left a "
            f"trace of {diff:.3g} (client_begin or client_end changed the algorithm?)")
    return diff


def _proximal(make: Callable[[], Algorithm], problem: _Problem, name: str) -> str:
    from fl_lightning.algorithms import FedSoL

    source = make()
    if not isinstance(source, ProximalTerm):
        return "not a ProximalTerm"
    net = problem.net
    gp = {k: p.detach().clone() for k, p in net.named_parameters()}
    ctx = LocalContext(net, gp, dict(net.named_buffers()), round=0, client_id=0, lr=LR,
                       momentum=MOMENTUM, num_clients=len(SIZES), total_samples=sum(SIZES))
    source.init_server(gp)
    source.client_begin(ctx)
    idx = problem.owned[0][:BATCH]
    params = {k: v + 0.01 for k, v in gp.items()}
    try:
        grads, value = source.proximal_gradient(params, problem.x[idx], problem.y[idx], ctx)
    except ConfigError as err:  # its options leave no term (FedNova without ccvr)
        return f"not run ({err})"
    if set(grads) != set(params) or any(grads[k].shape != params[k].shape for k in params):
        raise ConformanceError(
            f"check_algorithm({name}): proximal: proximal_gradient must return a gradient for "
            f"every parameter, of its shape; got {sorted(grads)}")
    if not (isinstance(value, Tensor) and value.dim() == 0 and bool(torch.isfinite(value))):
        raise ConformanceError(f"check_algorithm({name}): proximal: proximal_gradient's value "
                               f"must be a finite 0-d tensor, got {value!r}")
    fedsol = FedSoL(proximal=make())
    if (fedsol.client_state, fedsol.server_rule) != (source.client_state, source.server_rule):
        raise ConformanceError(f"check_algorithm({name}): proximal: FedSoL did not take over "
                               "the source's client_state and server_rule")
    _, out = _run(fedsol, SequentialEngine(), problem, ROUNDS)
    if not all(bool(torch.isfinite(v).all()) for v in _weights(out).values()):
        raise ConformanceError(f"check_algorithm({name}): proximal: FedSoL with it as "
                               "perturbation source gave non-finite weights")
    _max_diff(fedsol.state_dict(), fedsol.proximal.state_dict(), "proximal (FedSoL state)",
              name)
    return "ok"


#: the command line of the ``ddp`` check: digits, 10 LDA clients, 4 per round, 2 rounds
DDP_ARGS = [
    "--seed_everything", "0", "--trainer.max_steps", "2", "--trainer.accelerator", "cpu",
    "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
    "--checkpoint_every_n_rounds", "1", "--data.dataset", "digits", "--data.num_clients", "10",
    "--data.partition", "lda", "--data.alpha", "0.5", "--data.seed", "0",
    "--model.sample_ratio", "0.4", "--model.local_epochs", "1", "--model.batch_size", "50",
    "--model.local_lr", "0.05",
]


def _checkpoint_content(root: Path) -> dict[str, Any]:
    ckpt = root / "lightning_logs" / "fl" / "version_0" / "checkpoints" / "round=2.ckpt"
    state = torch.load(ckpt, weights_only=True)
    return {"weights": state["state_dict"], "algorithm": state.get("fl_algorithm_state", {})}


def _ddp(cls: type, init_args: Mapping[str, Any], name: str, where: Path | None) -> float:
    """Fit the command line in 2 gloo processes and in this one; compare the checkpoints."""
    from fl_lightning.cli import main

    module = sys.modules[cls.__module__]
    if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
        raise ConfigError(f"check_algorithm({name}, ddp=True) needs a class importable by "
                          "path (defined at the top of a module), not a local class")
    where = Path(tempfile.mkdtemp(prefix="check_ddp_") if where is None else where)
    config = where / "algorithm.json"  # JSON is YAML: the CLI reads it with --config
    config.write_text(json.dumps({"model": {"algorithm": {
        "class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}}}))
    paths = [str(Path(inspect.getfile(module)).parent.resolve()),
             str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    if cls.__module__.count("."):  # a package: its top folder's parent goes on the path
        top = sys.modules[cls.__module__.split(".")[0]]
        paths.insert(0, str(Path(inspect.getfile(top)).parent.parent.resolve()))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
           "OMP_NUM_THREADS": "1"}
    args = ["fit", "--config", str(config), *DDP_ARGS]
    (where / "two").mkdir(parents=True, exist_ok=True)
    (where / "one").mkdir(parents=True, exist_ok=True)
    log = where / "ddp.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fl_lightning.cli", *args, "--trainer.strategy", "ddp",
             "--trainer.devices", "2"], cwd=where / "two", env=env, stdout=fh,
            stderr=subprocess.STDOUT)
        here = os.getcwd()
        try:  # the one-process reference is fitted here while the DDP processes run
            os.chdir(where / "one")
            main(args)
        finally:
            os.chdir(here)
            proc.wait()
    if proc.returncode != 0:
        raise ConformanceError(f"check_algorithm({name}): ddp: the 2-process fit failed "
                               f"(exit {proc.returncode}); its log: {log}")
    diff = _max_diff(_checkpoint_content(where / "one"), _checkpoint_content(where / "two"),
                     "ddp (checkpoint)", name)
    if not diff < 1e-6:
        raise ConformanceError(f"check_algorithm({name}): ddp: 2 gloo processes differ from one "
                               f"process by {diff:.3g} >= 1e-6 (weights or algorithm state)")
    return diff


def check_algorithm(
    algorithm: type[Algorithm] | Callable[..., Algorithm],
    init_args: Mapping[str, Any] | None = None,
    *,
    net: nn.Module | None = None,
    seed: int = 0,
    atol: float = 1e-12,
    ddp: bool = False,
    ddp_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Run the conformance checks on an algorithm (see the module docstring).

    Args:
        algorithm: the algorithm's class (or a factory); every check builds fresh instances
            as ``algorithm(**init_args)``.
        init_args: its arguments (copied for every instance).
        net: the network (converted to float64); default a 2-layer perceptron on 1x6x6
            inputs with 4 classes (it has ``forward_features``).
        seed: seed of the data and of the network's initialization.
        atol: the largest difference allowed between the float64 engines.
        ddp: also run the 2-process DDP check (starts processes; the class must be importable
            by path and ``init_args`` JSON-serializable).
        ddp_dir: where the DDP check runs (default a new temporary folder).

    Returns:
        ``{check: measurement}``: the largest difference found (``engines``, ``resume``,
        ``skipped_client``, ``ddp``), ``"ok"``, or why a check was not run.

    Raises:
        ConformanceError: naming the first property that does not hold.
    """
    args = dict(init_args or {})
    name = getattr(algorithm, "__name__", repr(algorithm))

    def make() -> Algorithm:
        return algorithm(**copy.deepcopy(args))

    problem = _problem(net, seed)
    report: dict[str, Any] = {"declarations": _declarations(probe := make(), name)}
    reference = _sequential(make, problem)
    if probe.batchable:
        report["engines"] = _engines(make, problem, name, atol, reference)
    else:
        report["engines"] = "not run (batchable = False)"
    report["resume"] = _resume(make, problem, name, reference)
    report["skipped_client"] = _skipped(make, problem, name)
    report["proximal"] = _proximal(make, problem, name)
    if ddp:
        report["ddp"] = _ddp(algorithm, args, name, None if ddp_dir is None else Path(ddp_dir))
    else:
        report["ddp"] = "not run (ddp=False)"
    return report
