"""One drafting round's policy (schedule/round.py), without vLLM: gate, plan, lengths, timing.

End to end (the V1 proposer calls it every step): tests/engine/test_scheduler.py and
tests/engine/test_greedy.py."""

import pytest
import torch

from vllm_dspark.schedule.prefix import admission_floor, causal_schedule, with_drafting_time
from vllm_dspark.schedule.round import Plan, RoundPolicy
from vllm_dspark.schedule.sps import SPSTable
from vllm_dspark.schedule.verification import Settings, VerificationScheduler

STEEP = SPSTable(b=[1, 512], sps=[100.0, 100 / (1 + 512 / 16)])  # time per step linear in B
FLAT = SPSTable(b=[1, 512], sps=[100.0, 100.0])  # verification is free: admission floor 0
CPU = torch.device("cpu")


def scheduler(mode="causal", draft_cost=None, sps=STEEP):
    return VerificationScheduler(Settings(mode, "t", draft_cost=draft_cost), sps=sps)


class Clock:
    def __init__(self, *times):
        self.times = list(times)

    def __call__(self):
        return self.times.pop(0)


def never(*_):
    raise AssertionError("emitted() is read only when there is a gate")


@pytest.mark.parametrize("policy", [
    RoundPolicy(),  # before warm-up: no scheduler attached
    RoundPolicy(scheduler("fixed"), confidence=True),
    RoundPolicy(scheduler("causal"), confidence=False),  # a draft without a confidence head
    RoundPolicy(VerificationScheduler(Settings("causal", "profile")), confidence=True),  # no SPS
], ids=["none", "fixed", "no-confidence-head", "no-sps"])
def test_unscheduled_rounds_draft_and_verify_everything(policy):
    assert not policy.scheduled
    assert policy.skip(8, 7, never) is False
    assert policy.plan(8, 7, "cpu") == Plan(width=7, floor=None)
    assert policy.plan(8, 7, "cuda") == Plan(width=7, floor=None)
    assert isinstance(policy.start(CPU), float)
    assert policy.finish(torch.full((8, 7), 0.5), 8, 0.0) is None


def test_fixed_drafting_time_never_skips_and_the_cpu_plan_is_the_admission_floor():
    d = 0.004
    sched = scheduler(draft_cost=d)
    policy = RoundPolicy(sched, confidence=True, clock=Clock(1.0, 1.5))
    assert policy.scheduled
    assert policy.skip(8, 7, never) is False  # no gate with a fixed drafting time
    assert policy.skip(8, 0, never) is False
    floor = admission_floor(with_drafting_time(STEEP, d), 8, 7)
    assert floor > 0
    assert policy.plan(8, 7, "cpu") == Plan(width=7, floor=floor)
    # On a GPU no per-row stop; the paper's variant keeps the whole block.
    assert policy.plan(8, 7, "cuda") == Plan(width=7, floor=None)
    c = torch.rand(8, 7, generator=torch.Generator().manual_seed(0))
    started = policy.start(CPU)
    assert started == 1.0
    lengths = policy.finish(c, 8, started)
    assert lengths == causal_schedule(c, with_drafting_time(STEEP, d)).lengths.tolist()
    assert sched.cost.seconds(8) == d  # a fixed drafting time is not replaced by timings


def test_measured_drafting_time_is_observed_after_the_lengths():
    sched = scheduler()  # draft_cost None = measure (and gate)
    seen = []

    def clock():  # the second read must come after lengths() decided
        seen.append(sched._longest)
        return [10.0, 10.25][len(seen) - 1]

    policy = RoundPolicy(sched, confidence=True, clock=clock)
    started = policy.start(CPU)
    assert sched.cost.seconds(4) is None
    assert policy.finish(torch.full((4, 7), 0.5), 4, started) == [1] * 4
    assert seen == [None, 1]
    assert sched.cost.seconds(4) == pytest.approx(0.25)
    policy.finish(torch.full((4, 7), 0.5), 4, None)  # started None: the caller times it
    assert sched.cost.seconds(4) == pytest.approx(0.25) and len(seen) == 2


def test_the_width_follows_the_last_lengths_where_there_is_no_floor():
    """With the measured cost: one more than the longest prefix verified last round, on a
    GPU (never a per-row floor) and on CPU where the floor is 0 (a flat SPS curve)."""
    for sps, device_type in ((STEEP, "cuda"), (FLAT, "cpu")):
        policy = RoundPolicy(scheduler(sps=sps), confidence=True)
        assert policy.plan(8, 7, device_type) == Plan(width=7, floor=None)  # nothing yet
        c = torch.full((8, 7), 0.5)
        c[:, 2:] = 0.0  # at most 2 positions can survive
        lengths = policy.finish(c, 8, policy.start(CPU))
        assert max(lengths) >= 1
        assert policy.plan(8, 7, device_type) == Plan(width=max(lengths) + 1, floor=None)


def test_async_has_no_floor():
    policy = RoundPolicy(scheduler("async", draft_cost=0.004), confidence=True)
    assert policy.plan(8, 7, "cpu") == Plan(width=7, floor=None)
    assert policy.finish(torch.full((8, 7), 0.5), 8, None) == [7] * 8  # no budget yet


def test_the_gate_decides_the_skip():
    """With the measured cost the draft gate decides; it reads emitted() (the tokens of
    the step that just ran), and a round with γ = 0 never asks it."""
    sched = scheduler()
    policy = RoundPolicy(sched, confidence=True)
    calls = []

    def emitted():
        calls.append(1)
        return 8

    assert policy.skip(8, 0, never) is False
    decisions = [policy.skip(8, 7, emitted) for _ in range(6)]
    assert len(calls) == 6
    assert decisions[0] is False  # an unmeasured request count drafts first
    assert True in decisions  # ... and tries skipping before it has measured both

    class Always:  # the gate's answer is the skip's negation
        def __init__(self, draft):
            self.draft = draft

        def step(self, now, requests, tokens):
            return self.draft

    for draft in (True, False):
        sched.gate = Always(draft)
        assert policy.skip(8, 7, emitted) is (not draft)


class Ticks:
    """A timer that advances by ``step`` seconds at every read."""

    def __init__(self, step):
        self.now, self.step = 0.0, step

    def __call__(self):
        self.now += self.step
        return self.now


def test_rounds_are_counted_for_the_metrics():
    """RoundStats: every round with γ > 0 is drafted or skipped; a scheduled round's
    decision time is its gate + plan + lengths (one timer read before and after each),
    a skipped round's its gate alone; take() hands them over once."""
    policy = RoundPolicy()  # unscheduled: every round drafts, no decision to time
    assert policy.stats.take() is None
    policy.skip(8, 7, never)
    policy.skip(8, 0, never)  # nothing to draft: not a round
    assert policy.stats.take() == {"drafted": 1, "skipped": 0, "decision_seconds": []}
    assert policy.stats.take() is None

    sched = scheduler(draft_cost=0.004)
    policy = RoundPolicy(sched, confidence=True, timer=Ticks(0.5))

    class Always:
        def __init__(self, draft):
            self.draft = draft

        def step(self, now, requests, tokens):
            return self.draft

    sched.gate = Always(True)
    assert policy.skip(8, 7, lambda: 8) is False
    policy.plan(8, 7, "cpu")
    policy.finish(torch.full((8, 7), 0.5), 8, None)
    sched.gate = Always(False)
    assert policy.skip(8, 7, lambda: 8) is True
    stats = policy.stats.take()
    assert stats == {"drafted": 1, "skipped": 1, "decision_seconds": [1.5, 0.5]}
    # A replacement policy (the scheduler attached after warm-up) keeps counting.
    again = RoundPolicy(sched, confidence=True, stats=policy.stats)
    again.skip(8, 7, lambda: 8)
    assert policy.stats.take()["skipped"] == 1


def test_round_timings_are_capped_between_takes():
    policy = RoundPolicy(scheduler(draft_cost=0.004), confidence=True)
    policy.stats.max_kept = 3
    for _ in range(5):
        policy.skip(4, 7, never)
        policy.finish(torch.full((4, 7), 0.5), 4, None)
    stats = policy.stats.take()
    assert stats["drafted"] == 5 and len(stats["decision_seconds"]) == 3
    assert all(0 <= s < 1 for s in stats["decision_seconds"])
