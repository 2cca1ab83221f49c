"""Prefix schedulers: Algorithm 1 by hand, vectorised == reference, prefixes, early stop,
§5.2's asynchronous variant, and Appendix A's losslessness argument as a Monte Carlo."""

import itertools
import random

import pytest
import torch

from vllm_dspark.schedule.prefix import (
    _sorted_path,
    admission_floor,
    async_schedule,
    capacity_budget,
    causal_schedule,
    causal_schedule_reference,
    fixed_schedule,
    survival,
    topk_schedule,
    with_drafting_time,
)
from vllm_dspark.schedule.sps import SPSTable


def sps_table(values, b=None):
    """SPS table measured at B = 1..len(values) (or at ``b``)."""
    return SPSTable(b=b or list(range(1, len(values) + 1)), sps=[float(v) for v in values])


# ------------------------------------------------------------------ hand-worked cases
def test_two_requests_drop_at_b5():
    # a = cumprod: r0 = [0.9, 0.72, 0.36], r1 = [0.6, 0.3, 0.15].
    # Sorted: (0,1) .9, (0,2) .72, (1,1) .6, (0,3) .36, (1,2) .3, (1,3) .15.
    # SPS(1..4) = 10, SPS(5..7) = 7.  Start B = R = 2, τ* = 2, Θ = 2·10 = 20.
    #   admit (0,1): B=3, τ*=2.9,  Θ = 29    > 20   keep
    #   admit (0,2): B=4, τ*=3.62, Θ = 36.2  > 29   keep
    #   admit (1,1): B=5, τ*=4.22, Θ = 29.54 ≤ 36.2 break  ->  ℓ = [2, 0]
    c = torch.tensor([[0.9, 0.8, 0.5], [0.6, 0.5, 0.5]])
    s = causal_schedule(c, sps_table([10, 10, 10, 10, 7, 7, 7]))
    assert s.lengths.tolist() == [2, 0]
    assert int(s.batch) == 4 and int(s.admitted) == 2
    assert float(s.tau) == pytest.approx(3.62) and float(s.theta) == pytest.approx(36.2)


def test_flat_drop_flat_causal_stops_noncausal_does_not():
    # R=1, c = 0.9 each: a = .9, .81, .729.  SPS(1,2) = 10, SPS(3,4) = 6.
    #   Θ0 = 1·10 = 10; Θ1 = 1.9·10 = 19; Θ2 = 2.71·6 = 16.26 ≤ 19: causal stops at ℓ = 1.
    #   Θ3 = 3.439·6 = 20.63 > 19: a global argmax (no early stop) would take ℓ = 3.
    c = torch.tensor([[0.9, 0.9, 0.9]])
    t = sps_table([10, 10, 6, 6])
    assert causal_schedule(c, t).lengths.tolist() == [1]
    assert int(capacity_budget(c, t)) == 3
    assert async_schedule(c, c, t).lengths.tolist() == [3]  # the lossy search of App. A


def test_confidence_one_and_decreasing_sps():
    # c = 1: a = 1, 1, 1.  SPS(1..4) = 4, 3, 2.5, 2.
    #   Θ0 = 4; Θ1 = 2·3 = 6; Θ2 = 3·2.5 = 7.5; Θ3 = 4·2 = 8: every step improves, ℓ = 3.
    c = torch.ones(1, 3)
    s = causal_schedule(c, sps_table([4, 3, 2.5, 2]))
    assert s.lengths.tolist() == [3] and float(s.theta) == 8.0


def test_equal_theta_is_not_an_improvement():
    # c = 0.5, SPS(1) = 3, SPS(2) = 2: Θ0 = 3, Θ1 = 1.5·2 = 3 (exact): line 10 needs Θ > Θbest.
    assert causal_schedule(torch.tensor([[0.5]]), sps_table([3, 2])).lengths.tolist() == [0]


def test_ties_caps_and_flat_curve():
    # a: r0 = [1, 1], r1 = [1, (0.5 but cap 1: no candidate)].  Flat SPS: every admission
    # raises Θ, so all three candidates, in tie order (0,1), (0,2), (1,1), are admitted.
    c = torch.tensor([[1.0, 1.0], [1.0, 0.5]])
    s = causal_schedule(c, sps_table([5, 5]), torch.tensor([2, 1]))
    assert s.lengths.tolist() == [2, 1] and int(s.batch) == 5 and float(s.tau) == 5.0


def test_degenerate_inputs():
    t = sps_table([5, 4, 3])
    empty = causal_schedule(torch.zeros(0, 4), t)
    assert empty.lengths.shape == (0,) and int(empty.batch) == 0
    zeros = causal_schedule(torch.zeros(3, 4), t)  # no candidates (a = 0): bonus tokens only
    assert zeros.lengths.tolist() == [0, 0, 0] and float(zeros.theta) == 3 * t.sps_at(3)
    g1 = causal_schedule(torch.tensor([[0.99], [0.1]]), sps_table([10, 10, 9.9, 5]))
    assert g1.lengths.tolist() == [1, 0]  # Θ: 20 -> 29.7 -> 15.45: stop
    capped = causal_schedule(torch.ones(2, 3), sps_table([9, 9]), torch.tensor([0, 2]))
    assert capped.lengths.tolist() == [0, 2]
    assert async_schedule(torch.zeros(0, 2), torch.ones(1, 2), t).lengths.shape == (0,)


def test_any_callable_curve_and_dtypes():
    # SPS(B) = 12 / B (time per step ∝ tokens): Θ0 = 2·6 = 12; Θ1 = 2.9·4 = 11.6: stop.
    c = torch.tensor([[0.9, 0.9], [0.5, 0.5]], dtype=torch.bfloat16)
    s = causal_schedule(c, lambda b: 12.0 / b.double(), torch.tensor([2, 2], dtype=torch.int32))
    assert s.lengths.tolist() == [0, 0] and float(s.theta) == 12.0
    assert causal_schedule(torch.zeros(3, 0), lambda b: 1.0 / b).lengths.tolist() == [0] * 3


# ------------------------------------------------------------------ random cases
def _random_case(rng: random.Random):
    R, gamma = rng.randint(0, 12), rng.randint(1, 8)
    levels = [0.0, 0.3, 0.5, 0.9, 1.0]
    c = [[rng.choice(levels) if rng.random() < 0.3 else rng.random() for _ in range(gamma)]
         for _ in range(R)]
    caps = [rng.randint(0, gamma) for _ in range(R)]
    n = rng.randint(2, 8)
    b = sorted(rng.sample(range(1, R * (gamma + 1) + 12), n))
    s, v = [], 100.0
    for _ in b:  # monotone non-increasing, with occasional cliffs
        v *= rng.choice([1.0, 1.0, rng.uniform(0.5, 1.0), rng.uniform(0.9, 1.0)])
        s.append(v)
    return torch.tensor(c, dtype=torch.float32).reshape(R, gamma), torch.tensor(caps), \
        SPSTable(b=b, sps=s)


def test_vectorised_matches_reference_on_random_cases():
    rng = random.Random(0)
    for i in range(200):
        c, caps, t = _random_case(rng)
        got = causal_schedule(c, t, caps).lengths.tolist()
        assert got == causal_schedule_reference(c, t.sps_at, caps.tolist()), i
        assert all(0 <= x <= cap for x, cap in zip(got, caps.tolist()))


# ------------------------------------------------------------------ admission floor
def test_admission_floor_of_a_linear_step_time_is_r_slope_over_time():
    # t(B) = 1 + B/k  ->  floor = R·(1/k) / (1 + R/k) = R / (k + R), whatever γ.
    for r, k, gamma in [(1, 16.0, 7), (8, 16.0, 4), (64, 16.0, 2), (4, 3.0, 7)]:
        got = admission_floor(lambda b, k=k: 1.0 / (1.0 + b.double() / k), r, gamma)
        assert got == pytest.approx(r / (k + r), rel=1e-8) and got < r / (k + r)
    # Drafting time d adds to every step: t = 1 + d + B/k.
    got = admission_floor(with_drafting_time(lambda b: 1.0 / (1.0 + b.double() / 16), 0.5),
                          8, 4)
    assert got == pytest.approx(8 / 16 / (1.5 + 8 / 16), rel=1e-8)


def test_admission_floor_is_zero_where_a_longer_step_is_not_slower():
    assert admission_floor(lambda b: torch.ones_like(b, dtype=torch.float64), 4, 7) == 0.0
    dip = sps_table([100, 90, 95, 80, 70, 60, 50, 40, 30, 20])  # SPS(3) > SPS(2): noise
    assert admission_floor(dip, 1, 7) == 0.0
    assert admission_floor(dip, 3, 2) > 0.0  # B ≥ 3 never meets the dip
    assert admission_floor(dip, 0, 7) == admission_floor(dip, 2, 0) == 0.0


def _prune_at_floor(c: torch.Tensor, floor: float) -> torch.Tensor:
    """What sample_block hands the scheduler: each row's confidences up to the first
    position whose survival is at or below the floor, 0 afterwards."""
    a = torch.cumprod(c.double(), 1)
    below = (a <= floor).long()
    stopped_before = torch.cumsum(below, 1) - below  # a position ≤ floor came earlier
    return torch.where(stopped_before > 0, torch.zeros_like(c), c)


def test_stopping_rows_at_the_floor_keeps_algorithm_1s_lengths():
    rng = random.Random(4)
    pruned_cases = 0
    for i in range(300):
        r, gamma = rng.randint(1, 16), rng.randint(1, 8)
        c = torch.rand(r, gamma, generator=torch.Generator().manual_seed(i)) ** 0.5
        b = list(range(1, r * (gamma + 1) + 3))
        t, slope = 1.0, rng.uniform(0.001, 0.2)
        steps = []
        for _ in b:  # time per step rising with B, at a varying rate, sometimes a jump
            t += slope * rng.choice([0.2, 1.0, 1.0, 3.0])
            steps.append(t)
        table = SPSTable(b=b, sps=[1.0 / x for x in steps])
        sps = with_drafting_time(table, rng.choice([0.0, 0.3]))
        floor = admission_floor(sps, r, gamma)
        want = causal_schedule(c, sps)
        a = survival(c)
        taken = torch.arange(1, gamma + 1)[None, :] <= want.lengths[:, None]
        assert bool((a[taken] > floor).all()), i  # nothing admitted at or below the floor
        cut = _prune_at_floor(c, floor)
        pruned_cases += int(not torch.equal(cut, c))
        assert causal_schedule(cut, sps).lengths.tolist() == want.lengths.tolist(), i
        assert causal_schedule_reference(cut, lambda x, f=sps: float(f(torch.tensor([x]))[0])) \
            == want.lengths.tolist(), i
    assert pruned_cases > 100  # the floor really stops rows in most cases


def test_sorted_path_admits_prefixes():
    rng = random.Random(1)
    for _ in range(100):
        c, caps, _ = _random_case(rng)
        if c.shape[0] == 0:
            continue
        a = survival(c, caps)
        order, _, n_valid = _sorted_path(a)
        next_j = [1] * c.shape[0]
        for idx in order[: int(n_valid)].tolist():
            r, j = divmod(idx, c.shape[1])
            assert j + 1 == next_j[r]  # request r's position j+1 comes right after j
            next_j[r] += 1


def _path_thetas(c, t, caps=None):
    a = survival(c, caps).reshape(-1)
    vals = sorted([x for x in a.tolist() if x > 0], reverse=True)
    R = c.shape[0]
    return [(R + sum(vals[:k])) * t.sps_at(R + k) for k in range(len(vals) + 1)]


def test_async_budget_is_global_argmax_and_topk_is_current_ranking():
    rng = random.Random(2)
    for _ in range(100):
        c_old, caps_old, t = _random_case(rng)
        c_now = torch.rand(rng.randint(1, 6), rng.randint(1, 8))
        th = _path_thetas(c_old, t, caps_old) if c_old.shape[0] else [0.0]
        k = int(capacity_budget(c_old, t, caps_old))
        assert th[k] == max(th) and k == th.index(max(th))
        s = async_schedule(c_now, c_old, t, old_lengths_cap=caps_old)
        a = survival(c_now)
        assert int(s.admitted) == min(k, int((a > 0).sum()))
        # The admitted set is the top-K by current a: min admitted ≥ max not admitted.
        admitted = torch.arange(c_now.shape[1])[None, :] < s.lengths[:, None]
        if admitted.any() and (~admitted).any():
            assert a[admitted].min() >= a[~admitted].max()
        # Causal never beats the global argmax on the same confidences.
        assert float(causal_schedule(c_old, t, caps_old).theta) <= max(th) + 1e-12


def test_topk_and_fixed():
    c = torch.tensor([[0.9, 0.9], [0.95, 0.1]])
    t = sps_table([1, 1])
    # a: (0,1) .9, (0,2) .81, (1,1) .95, (1,2) .095 -> top-2 = (1,1), (0,1).
    assert topk_schedule(c, 2, t).lengths.tolist() == [1, 1]
    assert topk_schedule(c, 99, t).lengths.tolist() == [2, 2]
    f = fixed_schedule(torch.tensor([2, 1]), c, t)
    assert f.lengths.tolist() == [2, 1] and int(f.batch) == 5
    assert float(f.tau) == pytest.approx(2 + 0.9 + 0.81 + 0.95)
    assert torch.isnan(fixed_schedule(torch.tensor([3])).tau)


# ------------------------------------------------------------------ Appendix A
def test_appendix_a_worked_numbers():
    # App. A: R = 1, γ = 2, a1 = 0.8, SPS(1, 2, 3) = 1, 0.5, 0.45: Θ0 = 1, Θ1 = 0.9.
    # x1 = A gives c2 = 0.9: Θ2 = (1 + 0.8 + 0.72)·0.45 = 1.134 -> global search ℓ = 2.
    # x1 = B gives c2 = 0:   a2 = 0 is no candidate, max(1, 0.9) -> ℓ = 0.
    # The causal scheduler breaks at Θ1 ≤ Θ0 and returns ℓ = 0 in both cases.
    t = sps_table([1.0, 0.5, 0.45])
    high, low = torch.tensor([[0.8, 0.9]]), torch.tensor([[0.8, 0.0]])
    assert async_schedule(high, high, t).lengths.tolist() == [2]
    assert float(async_schedule(high, high, t).theta) == pytest.approx(1.134)
    assert async_schedule(low, low, t).lengths.tolist() == [0]
    assert causal_schedule(high, t).lengths.tolist() == [0]
    assert causal_schedule(low, t).lengths.tolist() == [0]
    # With p_t = (0.7, 0.3), p_d = (0.5, 0.5): Pr(Y = A) = 0.5·1 + 0.5·0.7 = 0.85 ≠ 0.7.


# Context-free target p and draft q (iid per position), vocabulary {0, 1, 2}; the emitted
# stream must be iid p whatever the scheduler does, if the scheduler is non-anticipating.
P = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
Q = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64)  # Σ min(p, q) = 0.8 per position
G = torch.tensor([0.95, 0.5, 0.2])  # c_k = G[x_{k-1}] (eq. 7's Markov feature), x_0 = anchor
GAMMA = 3
# Θ1 = (1 + c1)·0.6 > Θ0 = 1 iff c1 > 2/3: after anchor 0 the causal scheduler admits and
# ℓ then depends on x1 (allowed: it decides x2's admission).  After anchor 1 (c1 = 0.5),
# Θ1 = 0.9 < 1 and the causal scheduler stops at ℓ = 0, but a global search sees
# Θ2 = (1.5 + 0.5·0.95)·0.55 = 1.086 > 1 when x1 = 0 (App. A's case 1) and admits x1 = 0
# only: Pr(Y1 = 0 | anchor 1) = 0.4 + 0.6·0.6 = 0.76 instead of 0.6.
SPS = sps_table([1.0, 0.6, 0.55, 0.5])


def _configs():
    return list(itertools.product(range(3), repeat=GAMMA))  # (x0 = anchor, x1, x2)


def _lookup(schedule):
    """ℓ for every (anchor, x1, x2), computed by the real scheduler on [1, γ] inputs."""
    out = torch.zeros(3 ** GAMMA, dtype=torch.long)
    for i, cfg in enumerate(_configs()):
        out[i] = schedule(G[list(cfg)][None, :])
    return out


def _sample(p, n, gen):
    return torch.searchsorted(p.cumsum(0), torch.rand(n, generator=gen, dtype=torch.float64)
                              ).clamp(max=len(p) - 1)


def _step(anchor, ell_of, gen):
    """One draft + verify step for each row; returns the first two emitted tokens (-1: one
    token only). ``ell_of(anchor, drafts)`` is the scheduler's ℓ per row."""
    n = anchor.shape[0]
    x = torch.stack([_sample(Q, n, gen) for _ in range(GAMMA)], 1)
    ell = ell_of(anchor, x)
    u = torch.rand(n, GAMMA, generator=gen, dtype=torch.float64)
    ok = u < (P[x] / Q[x]).clamp(max=1)
    ok &= torch.arange(GAMMA)[None, :] < ell[:, None]
    n_acc = torch.cumprod(ok.long(), 1).sum(1)
    residual = (P - Q).clamp(min=0)
    final = torch.where(n_acc < ell, _sample(residual / residual.sum(), n, gen),
                        _sample(P, n, gen))  # rejection -> residual; all accepted -> bonus
    emitted = torch.cat([x, torch.full((n, 1), -1)], 1)
    emitted.scatter_(1, n_acc[:, None], final[:, None])
    emitted = torch.where(torch.arange(GAMMA + 1)[None, :] <= n_acc[:, None], emitted, -1)
    return emitted[:, 0], emitted[:, 1]


def _first_two(ell_of, n, gen):
    anchor = _sample(P, n, gen)
    y1, y2 = _step(anchor, ell_of, gen)
    more = y2 < 0
    y2[more] = _step(y1[more], ell_of, gen)[0]
    return y1, y2


def _chi2_pvalue(y, probs):
    counts = torch.bincount(y, minlength=len(probs)).double()
    exp = probs * y.shape[0]
    stat = ((counts - exp) ** 2 / exp).sum()
    df = torch.tensor(len(probs) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def appendix_a_pvalues(seed: int, n: int) -> dict[str, tuple[float, float]]:
    """(p-value of Y1, p-value of (Y1, Y2)) per scheduler, ``n`` episodes each."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor([3 ** (GAMMA - 1 - i) for i in range(GAMMA)])

    def key(anchor, x):
        return (torch.cat([anchor[:, None], x[:, : GAMMA - 1]], 1) * idx).sum(1)

    causal = _lookup(lambda c: causal_schedule(c, SPS).lengths[0])
    greedy_global = _lookup(lambda c: async_schedule(c, c, SPS).lengths[0])
    budget_old = _lookup(lambda c: capacity_budget(c, SPS))
    topk = torch.stack([_lookup(lambda c, k=k: topk_schedule(c, k, SPS).lengths[0])
                        for k in range(GAMMA + 1)])  # [K, config]
    assert causal.unique().numel() > 1  # the causal scheduler really varies ℓ here

    def asynchronous(anchor, x):
        old = key(_sample(P, len(anchor), gen),
                  torch.stack([_sample(Q, len(anchor), gen) for _ in range(GAMMA)], 1))
        return topk[budget_old[old], key(anchor, x)]

    pair = (P[:, None] * P[None, :]).reshape(-1)
    results = {}
    for name, ell_of in [("causal", lambda a, x: causal[key(a, x)]),
                         ("global", lambda a, x: greedy_global[key(a, x)]),
                         ("async", asynchronous)]:
        y1, y2 = _first_two(ell_of, n, gen)
        results[name] = (_chi2_pvalue(y1, P), _chi2_pvalue(y1 * 3 + y2, pair))
    return results


def test_appendix_a_early_stop_is_lossless_global_search_is_not():
    """Emitted tokens vs the target, chi-square goodness of fit on Y1 (3 cells) and on the
    pair (Y1, Y2) (9 cells, p⊗p), 60k episodes each, fixed seed.

    Bound: the global search shifts Pr(Y1 = 0) by 0.3·0.16 = 0.048 (anchor 1 has mass 0.3),
    a χ² of ≈ 0.0096 per episode, i.e. ≈ 580 expected here: p ≪ 1e-6 (asserted). The
    lossless schedulers must give p > 1e-3 (a 0.1% false alarm rate per check if all is
    well; deterministic under the seed). The asynchronous one (§5.2) picks K by global
    search on an independent earlier draft (two steps back) and top-K on the current one.
    """
    results = appendix_a_pvalues(seed=1234, n=60_000)
    assert results["global"][0] < 1e-6 and results["global"][1] < 1e-6, results
    for name in ("causal", "async"):
        assert min(results[name]) > 1e-3, results
