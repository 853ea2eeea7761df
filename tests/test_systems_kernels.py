"""Closed forms of the systems kernels: participation, attacks, robust rules, DP, secure
aggregation and compression (no data, no trainer)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fl_lightning.engine import ClientPlan, RoundPlan
from fl_lightning.errors import ConfigError
from fl_lightning.systems import (
    CoordinateMedian,
    GaussianUpdate,
    Krum,
    NormBounding,
    Participation,
    SecureAggregation,
    SignFlip,
    StochasticQuantizer,
    TopK,
    TrimmedMean,
)
from fl_lightning.systems.attacks import flip_labels, malicious_clients
from fl_lightning.systems.privacy import RDP_ORDERS, clip_update, dp_epsilon, dp_noise_std
from fl_lightning.systems.robust import RobustAggregator, krum_select, trimmed_mean
from fl_lightning.systems.secure_agg import (
    decode_fixed_point,
    encode_fixed_point,
    mask_update,
    unmask_sum,
)


# ---------------------------------------------------------------- participation
def test_participation_counts_are_exact_disjoint_and_seeded():
    p = Participation(dropout_ratio=0.3, straggler_ratio=0.3)
    ids = list(range(40, 50))
    dropped, slow = p.split(7, 3, ids)
    assert len(dropped) == 3 and len(slow) == 3 and not set(dropped) & set(slow)
    assert set(dropped) | set(slow) <= set(ids)
    assert p.split(7, 3, ids) == (dropped, slow)  # a pure function of (seed, round)
    assert {tuple(p.split(7, r, ids)[0]) for r in range(10)} != {tuple(dropped)}


def test_participation_plan_drops_clients_and_truncates_stragglers():
    batches = [torch.arange(i, i + 2) for i in range(0, 20, 2)]  # 10 steps each
    plan = RoundPlan(round=0, clients=[ClientPlan(c, 20, list(batches)) for c in range(10)])
    new, dropped, slow = Participation(0.2, 0.5, straggler_work=0.35).apply(plan, seed=1)
    assert len(new.clients) == 8 and {c.client_id for c in new.clients}.isdisjoint(dropped)
    steps = {c.client_id: len(c.batches) for c in new.clients}
    assert all(steps[c] == 3 for c in slow) and len(slow) == 5  # floor(0.35 * 10)
    assert all(steps[c] == 10 for c in steps if c not in slow)
    assert [len(c.batches) for c in plan.clients] == [10] * 10  # the input plan is untouched


# ---------------------------------------------------------------- attacks
def test_malicious_clients_are_a_fixed_seeded_share():
    bad = malicious_clients(0, 100, 0.2)
    assert len(bad) == 20 and bad == malicious_clients(0, 100, 0.2)
    assert bad != malicious_clients(1, 100, 0.2)
    assert malicious_clients(0, 100, 0.0) == []


def test_label_flip_and_update_attacks():
    y = torch.tensor([0, 1, 2, 9, 5, 3])
    flipped = flip_labels(y, [torch.tensor([0, 3]), torch.tensor([5])], 10)
    assert flipped.tolist() == [9, 1, 2, 0, 5, 6] and y.tolist() == [0, 1, 2, 9, 5, 3]
    d = torch.tensor([1.0, -2.0])
    assert SignFlip(scale=3.0).corrupt(d, None).tolist() == [-3.0, 6.0]
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = GaussianUpdate(std=2.0).corrupt(torch.zeros(200_000), g1)
    assert float(noise.std()) == pytest.approx(2.0, rel=0.01)
    assert torch.equal(noise, GaussianUpdate(std=2.0).corrupt(torch.zeros(200_000), g2))


# ---------------------------------------------------------------- robust aggregation
def test_robust_rules_closed_forms():
    u = torch.tensor([[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [4.0, 7.0], [100.0, 1.0]])
    w = torch.ones(5)
    assert CoordinateMedian()(u, w).tolist() == [3.0, 1.0]
    assert CoordinateMedian()(u[:4], w[:4]).tolist() == [2.5, 3.5]  # mean of the middle two
    assert TrimmedMean(beta=0.2)(u, w).tolist() == [3.0, pytest.approx(8 / 3)]
    assert torch.allclose(trimmed_mean(u, 0.0), u.mean(0))
    # Krum: scores by hand with n - f - 2 = 2 nearest neighbours
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [20.0]])
    d2 = (x - x.T) ** 2
    scores = [sorted(d2[i].tolist()[:i] + d2[i].tolist()[i + 1:])[:2] for i in range(5)]
    best = sorted(range(5), key=lambda i: sum(scores[i]))
    assert krum_select(x, num_byzantine=1, multi=2) == best[:2]
    assert Krum(num_byzantine=1, multi=2)(x, torch.ones(5)).tolist() == [x[best[:2]].mean().item()]
    bounded = NormBounding(max_norm=5.0)(torch.tensor([[30.0, 40.0], [1.0, 0.0]]),
                                         torch.tensor([1.0, 3.0]))
    assert bounded.tolist() == pytest.approx([(3.0 + 3.0) / 4, 4.0 / 4])
    mean = RobustAggregator()(u, torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    assert mean.tolist() == [2.5, 3.0]


def test_krum_rejects_too_many_byzantine_clients():
    with pytest.raises(ConfigError, match="num_byzantine=3 is too many for 8"):
        Krum(num_byzantine=3).check(8)
    Krum(num_byzantine=2).check(7)
    with pytest.raises(ConfigError, match="beta"):
        TrimmedMean(beta=0.5)


def _quadratic_run(aggregator: RobustAggregator, attack, rounds: int = 40) -> float:
    """Distance to the optimum after federated gradient steps on sum_k 1/2 ||w - c_k||^2 over
    the 40 honest clients of a population of 50 (20% malicious); every round samples 8 honest
    and 2 malicious clients, so exactly 20% of the updates are attacks."""
    gen = torch.Generator().manual_seed(0)
    d, n_clients = 20, 50
    centers = 1.0 + 0.1 * torch.randn(n_clients, d, generator=gen)
    bad = malicious_clients(0, n_clients, 0.2)
    good = [k for k in range(n_clients) if k not in bad]
    optimum = centers[good].mean(0)
    w = torch.zeros(d)
    for r in range(rounds):
        honest = [good[i] for i in torch.randperm(len(good), generator=gen)[:8].tolist()]
        evil = [bad[i] for i in torch.randperm(len(bad), generator=gen)[:2].tolist()]
        updates = [0.5 * (centers[k] - w) for k in honest]  # local steps toward c_k
        updates += [
            attack.corrupt(0.5 * (centers[k] - w), torch.Generator().manual_seed(r * 100 + k))
            for k in evil
        ]
        w = w + aggregator(torch.stack(updates), torch.ones(10))
    return float(torch.linalg.vector_norm(w - optimum))


@pytest.mark.parametrize("attack", [SignFlip(0.2, scale=5.0), GaussianUpdate(0.2, std=20.0)],
                         ids=["sign_flip_x5", "gaussian"])
def test_robust_rules_stay_near_the_clean_result_where_the_mean_breaks(attack):
    clean = _quadratic_run(RobustAggregator(), SignFlip(0.0))
    assert clean < 0.2
    assert _quadratic_run(RobustAggregator(), attack) > 5.0  # plain averaging breaks
    for rule in (CoordinateMedian(), TrimmedMean(0.2), Krum(2, multi=3), NormBounding(0.5)):
        assert _quadratic_run(rule, attack) < clean + 0.3, type(rule).__name__


# ---------------------------------------------------------------- differential privacy
def test_clipping_and_noise_scale():
    v = torch.tensor([3.0, 4.0])
    assert clip_update(v, 1.0).tolist() == pytest.approx([0.6, 0.8])
    assert clip_update(v, 10.0) is v
    assert dp_noise_std(1.2, 0.5, 10) == pytest.approx(0.06)


@pytest.mark.parametrize("z,rounds", [(1.0, 1), (1.3, 25), (4.0, 200)])
def test_epsilon_for_full_participation_matches_the_gaussian_rdp_formula(z, rounds):
    from opacus.accountants.analysis.rdp import compute_rdp

    orders = np.array(RDP_ORDERS)
    rdp = compute_rdp(q=1.0, noise_multiplier=z, steps=rounds, orders=RDP_ORDERS)
    np.testing.assert_allclose(rdp, rounds * orders / (2 * z * z), rtol=1e-12)
    delta = 1e-5
    eps, alpha = dp_epsilon(1.0, z, rounds, delta)
    rdp_t = rounds * orders / (2 * z * z)
    # Opacus' conversion (Balle et al. 2020, Thm. 21), minimized over the same orders:
    tight = rdp_t + np.log((orders - 1) / orders) - (np.log(delta) + np.log(orders)) / (orders - 1)
    assert eps == pytest.approx(tight.min(), rel=1e-12) and alpha == orders[tight.argmin()]
    # ... never above the classic bound min_alpha T alpha / (2 z^2) + log(1/delta) / (alpha - 1):
    classic = (rdp_t + math.log(1 / delta) / (orders - 1)).min()
    assert eps <= classic
    assert dp_epsilon(0.1, z, rounds, delta)[0] < eps  # subsampling amplifies privacy


# ---------------------------------------------------------------- secure aggregation
def test_masked_updates_hide_each_client_and_sum_exactly_with_dropouts():
    sa = SecureAggregation(frac_bits=20, modulus_bits=60)
    gen = torch.Generator().manual_seed(0)
    participants = [3, 8, 11, 20, 42]
    updates = {c: torch.randn(1000, generator=gen, dtype=torch.float64) for c in (3, 11, 20, 42)}
    masked = sa.masked_updates(updates, participants, seed=9, round_idx=4)  # client 8 dropped
    for c, x in updates.items():
        plain = encode_fixed_point(x, 20, 60)
        assert not torch.equal(masked[c], plain)
        assert float((masked[c] == plain).double().mean()) < 0.01
        assert not torch.allclose(decode_fixed_point(masked[c], 20, 60), x, atol=1.0)
    total = unmask_sum(masked, participants, 9, 4, 60)
    fixed = sum(encode_fixed_point(x, 20, 60) for x in updates.values()) & ((1 << 60) - 1)
    assert torch.equal(total, fixed)  # exactly the fixed-point sum of the survivors
    decoded = decode_fixed_point(total, 20, 60)
    exact = sum(updates.values())
    assert float((decoded - exact).abs().max()) <= 4 * 2.0**-21  # n * half a quantization step
    assert torch.allclose(sa.secure_sum(updates, participants, 9, 4), decoded, atol=0, rtol=0)


def test_pairwise_masks_cancel_without_dropouts():
    x = {c: torch.full((5,), 7, dtype=torch.long) for c in range(4)}
    masked = [mask_update(v, c, list(x), 1, 2, 40) for c, v in x.items()]
    assert torch.equal(sum(masked) & ((1 << 40) - 1), torch.full((5,), 28))


# ---------------------------------------------------------------- compression
def test_stochastic_quantization_is_unbiased_and_on_the_grid():
    x = torch.tensor([-1.0, -0.37, 0.0, 0.12, 0.5, 0.99, 2.0], dtype=torch.float64)
    q = StochasticQuantizer(bits=2)
    draws = torch.stack([
        q.compress(x, [7], 0, torch.Generator().manual_seed(s))[0] for s in range(4000)
    ])
    step = 3.0 / 3  # (max - min) / (2^2 - 1)
    levels = (draws + 1.0) / step
    assert torch.allclose(levels.round(), levels, atol=1e-9)  # only the 4 levels -1, 0, 1, 2
    sem = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - x).abs() <= 4 * sem + 1e-12).all()  # E[Q(x)] = x
    assert torch.equal(draws[:, 0], torch.full((4000,), -1.0, dtype=torch.float64))
    _, nbytes = StochasticQuantizer(bits=4).compress(torch.randn(10), [7, 3], 0,
                                                     torch.Generator().manual_seed(0))
    assert nbytes == math.ceil(7 * 4 / 8) + 8 + math.ceil(3 * 4 / 8) + 8


def test_top_k_error_feedback_conserves_the_sum_of_updates():
    topk = TopK(ratio=0.1)
    gen = torch.Generator().manual_seed(0)
    sent_total = torch.zeros(200, dtype=torch.float64)
    update_total = torch.zeros(200, dtype=torch.float64)
    for _ in range(6):
        delta = torch.randn(200, generator=gen, dtype=torch.float64)
        before = topk.residual(4)
        sent, nbytes = topk.compress(delta, [200], 4, None)
        assert nbytes == 20 * 8 and int((sent != 0).sum()) == 20
        # each round, exactly: sent + new residual = update + old residual
        carried = delta if before is None else delta + before
        assert torch.equal(sent + topk.residual(4), carried)
        sent_total += sent
        update_total += delta
    assert torch.allclose(sent_total + topk.residual(4), update_total, rtol=0, atol=1e-12)
    no_ef = TopK(ratio=0.1, error_feedback=False)
    no_ef.compress(torch.ones(50), [50], 0, None)
    assert no_ef.residual(0) is None
