"""The draft gate and the drafting-time model (schedule/gate.py): engine-free."""

import pytest

from vllm_dspark.schedule.gate import DraftCost, DraftGate


def run(gate, steps, requests, drafted_step, plain_step, start=0.0):
    """Drive the gate like the proposer does: each step is timed from one decision to
    the next and emits tokens according to the choice made before it. ``*_step(R)``
    give (tokens, seconds). Returns the decisions and the clock."""
    now, tokens, decisions = start, None, []
    for i in range(steps):
        r = requests(i) if callable(requests) else requests
        draft = gate.step(now, r, tokens)
        decisions.append(draft)
        tokens, seconds = (drafted_step if draft else plain_step)(r)
        now += seconds
    return decisions, now


def draft_pays(r):  # a drafted step: 2 tokens per request in 15 ms (plain: 1 in 10 ms)
    return 2 * r, 0.015


def plain(r):
    return r, 0.010


def draft_loses(r):  # compute bound: 1.2 tokens per request in 16 ms
    return round(1.2 * r), 0.016


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


def test_follows_the_faster_choice_and_explores_less_and_less():
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=64)
    decisions, _ = run(gate, 400, 1, draft_pays, plain)
    assert decisions[:6] == [True, False, True, False, True, False]  # learning, R unknown
    assert gate.rates(1) == (pytest.approx(2 / 0.015), pytest.approx(1 / 0.010))
    later = decisions[100:]
    assert sum(later) >= len(later) - 6  # explorations only, at most every 64 steps
    assert not all(later)  # but it still looks
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=64)
    decisions, _ = run(gate, 400, 16, draft_loses, plain)
    assert sum(decisions[100:]) <= 6
    assert (gate.drafted_steps, gate.skipped_steps) == (sum(decisions), 400 - sum(decisions))


def test_changes_its_mind_when_the_workload_changes():
    gate = DraftGate(window=8, min_samples=3, explore_min=4, explore_max=16)
    first, now = run(gate, 200, 4, draft_pays, plain)
    assert all(first[-10:]) or sum(first[-10:]) >= 9
    # drafts stop being accepted: drafting now costs time for nothing
    second, _ = run(gate, 300, 4, lambda r: (r, 0.015), plain, start=now)
    assert sum(second[-100:]) <= 10


def test_each_request_count_learns_its_own_answer():
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=64)
    run(gate, 100, 1, draft_pays, plain)
    decisions, _ = run(gate, 60, 12, draft_loses, plain)  # R = 12: never seen
    assert decisions[:6] == [True, False] * 3  # alternates, whatever R = 1 says
    assert sum(decisions[6:]) <= 4
    # past 16 requests, quarter octaves share their samples: 40 and 41 are one bucket
    gate = DraftGate(min_samples=3)
    assert gate.step(0.0, 40, None) is True
    gate.step(0.010, 41, 41)
    assert gate.rates(40) == gate.rates(41) == (pytest.approx(4100.0), None)


def test_steps_that_are_not_pure_decode_or_change_the_batch_are_not_samples():
    gate = DraftGate(min_samples=1)
    assert gate.step(0.0, 4, None) is True  # nothing known: draft first
    assert gate.step(1.0, 4, None) is True  # a prefill step: no sample, still unknown
    assert gate.step(2.0, 5, 8) is True  # a request joined: not comparable
    assert gate.step(2.010, 5, 5) is False  # 5 tokens in 10 ms after drafting; try the other
    assert gate.rates(5) == (pytest.approx(500.0), None)
    assert gate.step(2.014, 5, 5) is False  # plain: 5 in 4 ms beats 5 in 10 ms
    assert gate.rates(5) == (pytest.approx(500.0), pytest.approx(1250.0))


def test_an_unmeasured_request_count_follows_the_monotone_answer():
    """Drafting gains less as R grows: an R not yet measured skips from the start when a
    smaller R skips, drafts when a larger one drafts, and explores until it has its own
    samples; with no such evidence, or contradicting evidence, it alternates."""
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=256)
    run(gate, 60, 4, draft_loses, plain)
    assert gate.rates(4)[0] < gate.rates(4)[1]
    decisions, _ = run(gate, 200, 16, draft_loses, plain)  # R = 16: never seen
    assert decisions[:7] == [False] * 7  # no alternation (R = 4 skips); explores at 8
    assert 2 <= sum(decisions) <= 4  # explorations only
    decisions, _ = run(gate, 20, 2, draft_pays, plain)  # smaller than 4: no evidence
    assert decisions[:6] == [False, True] * 3  # alternates, skipping first (4 skips)
    gate = DraftGate(min_samples=3)
    run(gate, 60, 8, draft_pays, plain)
    assert run(gate, 6, 2, draft_pays, plain)[0] == [True] * 6  # R = 8 drafts: so does 2
    gate = DraftGate(min_samples=3)  # R = 1 skips and R = 8 drafts: a contradiction
    run(gate, 60, 1, draft_loses, plain)
    run(gate, 120, 8, draft_pays, plain)  # starts from R = 1's skip; its samples overrule
    assert gate.rates(8)[0] > gate.rates(8)[1]
    assert run(gate, 4, 4, draft_pays, plain)[0] == [True, False, True, False]


def test_an_unmeasured_request_count_follows_close_ones_either_way():
    """Without monotone evidence, R within 1.5× of measured request counts follows them
    when they agree (a batch's tail: 16 requests skip, so 13 skip from the start);
    further away, or when close ones disagree, it still alternates."""
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=256)
    run(gate, 60, 16, draft_loses, plain)
    assert run(gate, 7, 13, draft_pays, plain)[0] == [False] * 7  # 16/13 < 1.5
    assert run(gate, 4, 10, draft_pays, plain)[0] == [False, True, False, True]  # 1.6×
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=256)
    run(gate, 60, 2, draft_pays, plain)
    assert run(gate, 3, 3, draft_loses, plain)[0] == [True] * 3  # 3/2 = 1.5: drafts
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=256)
    run(gate, 60, 2, draft_pays, plain)
    run(gate, 60, 4, draft_loses, plain)  # 2 drafts and 4 skips: they disagree on 3
    assert run(gate, 4, 3, draft_pays, plain)[0] == [False, True, False, True]


def test_an_unmeasured_request_count_below_a_skipping_one_skips_first():
    """A batch's tail: each count is visited once and the next step has another R, so
    it is never measured and keeps its first choice. Below a skipping R that choice
    is to skip; with nothing larger skipping, or nothing measured, it is to draft."""
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=256)
    assert gate.step(0.0, 10, None) is True  # nothing measured: draft first
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=256)
    run(gate, 60, 1, draft_pays, plain)
    run(gate, 60, 16, draft_loses, plain)
    tail = [16, 14, 11, 9, 6, 5, 3, 2]  # requests finishing: every step a new R
    for _ in range(3):  # three batches' tails
        assert run(gate, len(tail), lambda i: tail[i], draft_pays, plain)[0][1:] == [False] * 7
    gate = DraftGate(min_samples=3, explore_min=8, explore_max=256)
    run(gate, 60, 1, draft_pays, plain)
    assert gate.step(1.0, 6, None) is True  # only a smaller R measured: draft first


def test_explorations_cost_at_most_the_budget():
    """Intervals between explorations at least double while the answer holds, and are
    long enough that the explored steps cost at most ``budget`` of the throughput."""
    def explorations(drafted_step, budget):
        gate = DraftGate(min_samples=3, explore_min=8, explore_max=256, budget=budget)
        decisions, _ = run(gate, 1000, 16, drafted_step, plain)
        return sum(decisions[6:])  # after the 3 + 3 learning steps

    # 3× as slow per token: 2 steps lost per try, 1 % budget → every 200, then 256
    assert explorations(lambda r: (r, 0.030), 0.01) == 5  # at 8, 208, 464, 720, 976
    # 10 % slower (0.1 step per try): doubling dominates: 8, 24, 56, 120, 248, 504, 760
    assert explorations(lambda r: (r, 0.011), 0.01) == 7
    assert explorations(lambda r: (r, 0.030), 1.0) == 7  # a loose budget: doubling only
