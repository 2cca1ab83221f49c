"""The draft gate and the drafting-time model (schedule/gate.py): engine-free."""

import pytest
import torch

from vllm_dspark.schedule.gate import DraftCost, DraftGate
from vllm_dspark.schedule.sps import SPSTable

# A compute-bound target: 10 ms + 1 ms per token (time per step linear in B).
LINEAR = SPSTable(b=[1, 1024], sps=[1 / 0.011, 1 / (0.010 + 0.001 * 1024)])


def survival(values, rows):
    return torch.tensor([values] * rows, dtype=torch.float64)


def test_draft_cost_fixed_recent_minimum_and_nearest():
    fixed = DraftCost(fixed=0.003)
    fixed.observe(4, 1.0)
    assert fixed.seconds(4) == fixed.seconds(100) == 0.003
    cost = DraftCost(window=3)
    assert cost.seconds(4) is None  # nothing measured yet
    for t in (0.500, 0.012, 0.010, 0.020):  # a warm-up spike first
        cost.observe(4, t)
    assert cost.seconds(4) == 0.010  # minimum of the last 3
    for t in (0.030, 0.030, 0.030):
        cost.observe(4, t)
    assert cost.seconds(4) == 0.030  # older ones forgotten
    cost.observe(16, 0.040)
    assert cost.seconds(6) == 0.030 and cost.seconds(12) == 0.040  # nearest R


def test_unknown_curves_or_cost_mean_draft():
    gate = DraftGate(LINEAR, DraftCost())
    assert gate.predicted_gain(4) is None and gate.should_draft(4)
    gate.observe(survival([0.9, 0.8, 0.7], 4))
    assert gate.predicted_gain(4) is None and gate.should_draft(4)  # d(R) unknown


def test_gain_matches_a_hand_computation():
    # R = 1, a = [0.9, 0.5], d = 5 ms. Plain: 1 token / 11 ms.
    # ℓ=1: 1.9 tokens / (12 + 5) ms; ℓ=2: 2.4 / (13 + 5) ms = best.
    gate = DraftGate(LINEAR, DraftCost(fixed=0.005))
    gate.observe(survival([0.9, 0.5], 1))
    assert gate.predicted_gain(1) == pytest.approx((2.4 / 0.018) / (1 / 0.011))


def test_heavy_load_or_slow_drafting_skips_then_probes():
    gate = DraftGate(LINEAR, DraftCost(fixed=0.002), probe_every=3)
    gate.observe(survival([0.8, 0.6, 0.4, 0.2], 8))
    assert gate.should_draft(1)  # light load: cheap drafts pay
    # 64 requests: the target is compute bound, a draft token costs as much as a new one
    assert gate.predicted_gain(64) < 1.0
    decisions = [gate.should_draft(64) for _ in range(8)]
    assert decisions == [False, False, False, True, False, False, False, True]  # probes
    assert (gate.drafted_steps, gate.skipped_steps) == (3, 6)
    slow = DraftGate(LINEAR, DraftCost(fixed=1.0))
    slow.observe(survival([0.99] * 4, 8))
    assert not slow.should_draft(1)


def test_gain_grows_with_confidence_and_falls_with_cost():
    gains = []
    for a, d in [(0.3, 0.002), (0.9, 0.002), (0.9, 0.02)]:
        gate = DraftGate(LINEAR, DraftCost(fixed=d))
        gate.observe(survival([a ** (j + 1) for j in range(4)], 4))
        gains.append(gate.predicted_gain(4))
    assert gains[1] > gains[0] and gains[1] > gains[2]


def test_pool_keeps_recent_rows_and_cycles_them():
    gate = DraftGate(LINEAR, DraftCost(fixed=0.0), pool_rows=4)
    gate.observe(survival([0.1, 0.0], 3))
    gate.observe(survival([0.9, 0.8], 2))
    assert gate._pool.shape == (4, 2)
    # R = 2 uses the two most recent rows ([0.9, 0.8]); free drafting and a flat-ish
    # start make both verified: τ = 2 + 3.4
    g = gate.predicted_gain(2)
    best = max((2 + s) / (0.010 + 0.001 * (2 + k)) for k, s in
               enumerate([0, 0.9, 1.8, 2.6, 3.4]))
    assert g == pytest.approx(best / (2 / 0.012))
