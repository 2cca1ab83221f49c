"""The draft gate where vLLM's scheduler fixes the draft count (schedule/scheduler_gate.py):
decisions held long enough to measure, only clean steps filed, the faster choice found."""

import pytest

from vllm_dspark.schedule.gate import DraftGate
from vllm_dspark.schedule.scheduler_gate import HOLD, SchedulerGate, draft_count_tiers


class _Spy(DraftGate):
    def __init__(self):
        super().__init__()
        self.samples = []

    def observe(self, requests, drafted, tokens, seconds):
        self.samples.append((requests, drafted, tokens, seconds))
        super().observe(requests, drafted, tokens, seconds)


def _run(gate, steps, requests, plain_s, verify_s, draft_s, tau):
    """A simulated engine: step t verifies the drafts of step t-1 (costing ``verify_s``
    instead of ``plain_s`` and emitting τ tokens per request instead of 1) and drafts
    with its own K (costing ``draft_s``). Returns the K of every step."""
    now, prev_k, ks = 0.0, 0, []
    for _ in range(steps):
        k = gate.k(requests)
        now += (verify_s if prev_k else plain_s) + (draft_s if k else 0.0)
        tokens = round(requests * (tau if prev_k else 1.0))
        gate.observe(now, requests, tokens, verified=prev_k > 0, drafted=k > 0)
        ks.append(k)
        prev_k = k
    return ks


@pytest.mark.parametrize("pays", [True, False])
def test_the_gate_follows_the_faster_choice(pays):
    # Drafted rounds: (1.3 + 0.3) s for τ = 2.2 tokens against 1 s per token plain.
    tau = 2.2 if pays else 1.2
    gate = SchedulerGate(gamma=7)
    ks = _run(gate, 600, requests=4, plain_s=1.0, verify_s=1.3, draft_s=0.3, tau=tau)
    late = ks[200:]
    drafted = sum(k == 7 for k in late) / len(late)
    assert set(ks) <= {0, 7}
    assert drafted > 0.9 if pays else drafted < 0.1


def test_only_steps_between_equal_decisions_are_filed():
    spy = _Spy()
    gate = SchedulerGate(gamma=4, gate=spy)
    ks = _run(gate, 300, requests=2, plain_s=1.0, verify_s=1.2, draft_s=0.2, tau=1.5)
    assert spy.samples, "no sample was filed"
    # A drafted sample paid verification and drafting, a plain one neither: nothing mixed.
    for _, drafted, tokens, seconds in spy.samples:
        assert (tokens, seconds) == ((3, pytest.approx(1.4)) if drafted
                                     else (2, pytest.approx(1.0)))
    # Every switch of K is held for HOLD steps, so each exploration gives a clean sample.
    runs, n = [], 1
    for a, b in zip(ks, ks[1:]):
        if a == b:
            n += 1
        else:
            runs.append(n)
            n = 1
    assert min(runs) >= HOLD


def test_a_step_after_a_missing_output_or_a_load_change_is_no_sample():
    spy = _Spy()
    gate = SchedulerGate(gamma=3, gate=spy)
    gate.observe(1.0, 4, 4, verified=False, drafted=False)
    gate.observe(2.0, 5, 5, verified=False, drafted=False)  # 4 → 5 requests
    gate.observe(3.0, 5, None, verified=False, drafted=False)  # a prefill ran
    gate.observe(4.0, 5, 5, verified=True, drafted=True)  # its predecessor did not draft
    assert spy.samples == []
    gate.observe(5.0, 5, 9, verified=True, drafted=True)
    assert spy.samples == [(5, True, 9, 1.0)]


def test_vllms_lookup_is_the_gate():
    gate = SchedulerGate(gamma=5)
    assert gate[3] in (0, 5)
    with pytest.raises(ValueError, match="γ ≥ 1"):
        SchedulerGate(gamma=0)


def test_the_schedule_names_both_draft_counts():
    assert draft_count_tiers(7, 64) == [(1, 1, 7), (2, 64, 0)]
    assert draft_count_tiers(7, 1) == [(1, 1, 7)]


def test_the_trace_holds_each_change_of_k_and_each_timed_sample():
    import io
    import json

    trace = io.StringIO()
    spy = _Spy()
    gate = SchedulerGate(gamma=4, gate=spy, trace=trace)
    ks = _run(gate, 60, requests=2, plain_s=1.0, verify_s=1.2, draft_s=0.2, tau=1.5)
    lines = [json.loads(x) for x in trace.getvalue().splitlines()]
    changes = [x["k"] for x in lines if "k" in x]
    samples = [(x["r"], x["drafted"], x["tokens"], x["s"]) for x in lines if "drafted" in x]
    assert changes == [k for i, k in enumerate(ks) if i == 0 or k != ks[i - 1]]
    assert samples == [(r, d, t, pytest.approx(s)) for r, d, t, s in spy.samples]
    assert len(samples) > 10


def test_the_gate_turns_soon_after_drafting_stops_paying():
    # The H100 sweep's C = 128 cells on a made-up clock: at T = 0 drafting pays (τ 1.77:
    # 1.15× plain); then at T = 1 (τ 1.46) the same step costs lose 5 % to plain. The gate
    # must follow within a few dozen steps, not the ~350 steps a sweep cell lasts.
    gate = SchedulerGate(gamma=7)

    def run(steps, tau, clock):
        ks = []
        for _ in range(steps):
            k = gate.k(128)
            clock["now"] += (1.3 if clock["k"] else 1.0) + (0.24 if k else 0.0)
            tokens = round(128 * (tau if clock["k"] else 1.0))
            gate.observe(clock["now"], 128, tokens, verified=clock["k"] > 0, drafted=k > 0)
            ks.append(k)
            clock["k"] = k
        return ks

    clock = {"now": 0.0, "k": 0}
    paying = run(600, 1.77, clock)
    assert sum(k > 0 for k in paying[100:]) / 500 > 0.95
    losing = run(400, 1.46, clock)
    assert losing.index(0) < 40
    assert sum(k == 0 for k in losing[40:]) / 360 > 0.95
