"""``--model.on_nonfinite skip_client``: a diverged client leaves no trace in any state.

For every stateful algorithm, a run in which one sampled client diverges (its local direction
is NaN) and is skipped must end exactly as the same run in which that client was never sampled:
same global weights (finite), same server state (SCAFFOLD ``c``, FedDyn ``h``, FedNova ``d``),
same per-client store (``c_i``, ``h_i``, ``d_i``, MOON's previous model), entry for entry.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from fl_lightning.algorithms import MOON, SCAFFOLD, FedDyn, FedNova, FedSoL
from fl_lightning.data.module import FederatedDataModule
from fl_lightning.module import FederatedModule
from fl_lightning.systems import TopK

ROUNDS = 2


def _diverging(cls: type, victim: int) -> type:
    """``cls`` whose client ``victim`` returns a NaN local direction (and so NaN weights)."""

    class Diverging(cls):
        def direction(self, params, x, y, ctx):
            grads, loss = super().direction(params, x, y, ctx)
            if ctx.client_id == victim:
                grads = {k: g * float("nan") for k, g in grads.items()}
            return grads, loss

    Diverging.__name__ = f"Diverging{cls.__name__}"
    return Diverging


class WithoutClient(FederatedDataModule):
    """The same partition and sampling, with one client never sampled."""

    def __init__(self, absent: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.absent = absent

    def sample_clients(self, round_idx: int, clients_per_round: int) -> list[int]:
        ids = super().sample_clients(round_idx, clients_per_round)
        return [c for c in ids if c != self.absent]


DATA = dict(dataset="digits", num_clients=10, partition="iid", seed=0)
CASES = {  # name: (algorithm class, its arguments, the module's systems options)
    "scaffold": (SCAFFOLD, {}, {}),
    "feddyn": (FedDyn, {}, {}),
    "fednova_ccvr": (FedNova, {"ccvr": True}, {}),
    "moon": (MOON, {}, {}),
    "fedsol_prox_scaffold": (FedSoL, {"proximal": SCAFFOLD()}, {}),
    "fedsol_prox_feddyn": (FedSoL, {"proximal": FedDyn()}, {}),
    # the systems pipeline's round path, with the compressor's error memory as state too
    "moon+topk": (MOON, {}, {"compressor": lambda: TopK(ratio=0.5)}),
}


def _run(algorithm, dm: FederatedDataModule, systems: dict) -> FederatedModule:
    pl.seed_everything(0, verbose=False)
    module = FederatedModule(
        algorithm=algorithm, num_classes=10, input_shape=(1, 8, 8), sample_ratio=0.3,
        local_epochs=1, batch_size=50, local_lr=0.05, on_nonfinite="skip_client",
        **{k: make() for k, make in systems.items()},
    )
    trainer = pl.Trainer(
        max_steps=ROUNDS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        accelerator="cpu", devices=1,
    )
    trainer.fit(module, datamodule=dm)
    return module


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: {set(a) ^ set(b)}"
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("name", list(CASES))
def test_a_skipped_client_leaves_no_trace(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cls, kwargs, systems = CASES[name]
    victim = FederatedDataModule(**DATA).sample_clients(0, 3)[1]

    def fresh_kwargs():  # a new proximal source per run (it holds state)
        return {k: type(v)() if k == "proximal" else v for k, v in kwargs.items()}

    skipped = _run(_diverging(cls, victim)(**fresh_kwargs()), FederatedDataModule(**DATA),
                   systems)
    absent = _run(cls(**fresh_kwargs()), WithoutClient(victim, **DATA), systems)

    weights = dict(skipped.net.named_parameters())
    assert all(torch.isfinite(w).all() for w in weights.values())
    for k, w in absent.net.named_parameters():
        assert torch.equal(weights[k], w), k
    state = skipped.algorithm.state_dict()
    _assert_same(state, absent.algorithm.state_dict(), name)
    _assert_same(skipped.systems.state_dict(), absent.systems.state_dict(), "systems")
    stores = [s for s in _stores(state)]
    assert stores, "the algorithm keeps no client store"
    for store in stores:
        assert victim not in {int(k) for k in store}, f"client {victim} has stored state"


def _stores(state):
    """The per-client stores inside an algorithm's state dict (``{"clients": {id: ...}}``)."""
    if isinstance(state, dict):
        clients = state.get("clients")
        if isinstance(clients, dict) and isinstance(clients.get("clients"), dict):
            yield clients["clients"]
        for v in state.values():
            yield from _stores(v)
