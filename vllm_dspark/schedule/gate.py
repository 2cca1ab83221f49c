"""Whether to draft at all this step, and what drafting costs (beyond the paper).

Algorithm 1 decides how much of a drafted block to verify; the drafting itself is
paid every step. When the target is compute bound (large batches, CPUs) the best
the scheduler can do is verify almost nothing, and the drafting time alone then
makes speculation slower than plain decoding. Two additions fix that:

1. The round's time is target + drafter: Θ = τ / (1/SPS(B) + d), d the measured
   drafting time of this batch (``DraftCost``). Once a block is drafted d is sunk,
   so the verification decision should count it (it admits a little more).
2. ``DraftGate`` measures, per request count R, the tokens/s of steps that followed
   a drafted step and of steps that followed a skipped one, and skips the drafter
   while skipping is faster (trying the other choice now and then).

Both are lossless: they use only earlier steps' timings and token counts, never the
draft being verified (skipping = verifying ℓ_r = 0 for every request).
"""

from __future__ import annotations

import math
from collections import deque


class DraftCost:
    """Drafting seconds per step as a function of the request count R: the minimum of
    the last ``window`` measurements per R (the first calls of a fresh engine and CPU
    contention only ever add time, so a mean would overstate d), or a fixed value
    (``fixed``, for tests and known setups). An unmeasured R borrows the nearest
    measured R's time until that R has been measured."""

    def __init__(self, fixed: float | None = None, window: int = 8):
        self.fixed = fixed
        self.window = window
        self._recent: dict[int, list[float]] = {}

    def observe(self, requests: int, seconds: float) -> None:
        if self.fixed is not None or requests <= 0:
            return
        recent = self._recent.setdefault(requests, [])
        recent.append(seconds)
        del recent[:-self.window]

    def seconds(self, requests: int) -> float | None:
        """d(R), or None while nothing has been measured."""
        if self.fixed is not None:
            return self.fixed
        if not self._recent:
            return None
        near = min(self._recent, key=lambda r: (abs(r - requests), r))
        return min(self._recent[near])


class DraftGate:
    """Before each step: draft or not, from the measured throughput of both choices.

    Each step's wall time (from one ``propose`` call to the next: the drafting of the
    previous step plus the target step that verified it) and the tokens that step
    emitted are one sample of the choice made the step before, filed under the request
    count R (exact up to 16, quarter octaves above). Per R the gate keeps the recent
    ``window`` samples of each choice and follows the one with the higher tokens/s
    (Σ tokens / Σ seconds). It tries the other one now and then, so that a change of
    workload is noticed: first after ``explore_min`` steps; while the answer holds the
    interval at least doubles, up to ``explore_max``, and is long enough that the
    explored steps cost at most ``budget`` of the throughput (an explored step costs
    rate_best / rate_other - 1 steps: drafting at 16 requests on the CPU, ~1.8× as slow,
    is retried only every 80+ steps).

    An R without ``min_samples`` samples of both choices follows a measured R where
    the answer carries over: drafting gains less the more requests share a step (the
    target grows compute bound and verification costs more), so it skips when a
    smaller R skips and drafts when a larger R drafts, and explores as above until it
    has its own samples (alternating as soon as those favour the other choice).
    Without such evidence it follows measured R within ``NEAR``× of it when they agree:
    at the tail of a batch, as requests finish, R passes through counts seen once per
    batch (15, 13, 11, …), which would otherwise each try drafting until measured.
    Otherwise it alternates between the choices: a few slow steps per request count
    once. It skips first when a larger measured R skips (drafts first otherwise): at a
    batch's tail the step after a visit usually has another R, so such a count is
    rarely measured and keeps its first choice; there drafting gains little at best
    (it already loses at the larger R) and a drafted step also pays for storing the
    context K/V that the skipped steps deferred. It never copies the other direction
    from further away: with 1 → 4 requests on the CPU sweep, following R = 1's "draft"
    cost most of a batch.

    Measuring instead of predicting: a prediction from the calibrated survival
    products and the SPS table (this gate's first version) refused drafting that paid
    at light load (benchmarks/README.md); wall time counts everything — drafting,
    verification, the scheduler itself — whatever the calibration.
    """

    def __init__(self, window: int = 16, min_samples: int = 3, explore_min: int = 8,
                 explore_max: int = 256, budget: float = 0.01):
        self.window = window
        self.min_samples = min_samples
        self.explore_min = explore_min
        self.explore_max = explore_max
        self.budget = budget
        self._buckets: dict[int, _Bucket] = {}
        self._last: tuple[float, int, bool] | None = None  # (time, R, drafted)
        self.drafted_steps = 0
        self.skipped_steps = 0

    def step(self, now: float, requests: int, tokens: int | None) -> bool:
        """At the start of a step's drafting: ``tokens`` = tokens the target emitted in
        the step that just ran, or None when it was not a pure decode step (a prefill
        or a request joining makes its time no sample of either choice). Records that
        step, then decides whether to draft this one."""
        last, self._last = self._last, None
        if last is not None and tokens is not None and same_load(requests, last[1]):
            self.observe(requests, last[2], tokens, now - last[0])
        draft = self.decide(requests)
        self._last = (now, requests, draft)
        return draft

    def observe(self, requests: int, drafted: bool, tokens: int, seconds: float) -> None:
        """One sample of a choice: a step at this request count that followed a drafted
        (or a skipped) step emitted ``tokens`` in ``seconds``."""
        if tokens > 0 and seconds > 0:
            self._record(requests, drafted, tokens, seconds)

    def decide(self, requests: int) -> bool:
        """Draft (True) or not at this request count, from the samples so far."""
        draft = self._decide(requests)
        if draft:
            self.drafted_steps += 1
        else:
            self.skipped_steps += 1
        return draft

    def rates(self, requests: int) -> tuple[float | None, float | None]:
        """Measured tokens/s (drafted, plain) at this request count's bucket."""
        b = self._buckets.get(_bucket_key(requests))
        return (None, None) if b is None else (b.rate(True), b.rate(False))

    def _bucket(self, key: int) -> _Bucket:
        if key not in self._buckets:
            self._buckets[key] = _Bucket(self.window, self.explore_min)
        return self._buckets[key]

    def _record(self, requests: int, drafted: bool, tokens: int, seconds: float) -> None:
        b = self._bucket(_bucket_key(requests))
        before = b.choice
        b.samples[drafted].append((tokens, seconds))
        if before is not None and drafted != before:  # an exploration came back
            after = b.best(self.min_samples)  # None: too few of its own samples yet
            if after == before or (after is None and not b.contradicts(before)):
                best, other = b.rate(before), b.rate(not before)
                cost = best / other - 1 if best and other else 0.0  # steps lost per try
                b.interval = min(max(2 * b.interval, math.ceil(cost / self.budget)),
                                 self.explore_max)
            else:
                b.interval = self.explore_min

    def _decide(self, requests: int) -> bool:
        key = _bucket_key(requests)
        b = self._bucket(key)
        best = b.best(self.min_samples)
        if best is None:
            measured = self._measured()
            best = _carried_over(key, measured)
            if best is not None and b.contradicts(best):
                best = None  # its own first samples disagree: measure it properly
        b.choice = best
        if best is None:  # nothing to go on at this R: alternate (skip first below a skip)
            drafted, skipped = len(b.samples[True]), len(b.samples[False])
            larger_skips = any(k > key and not answer for k, answer in measured.items())
            return drafted < skipped or (drafted == skipped and not larger_skips)
        b.since += 1
        if b.since >= b.interval:
            b.since = 0
            return not best
        return best

    def _measured(self) -> dict[int, bool]:
        """Each measured bucket's answer (draft or not), by bucket key."""
        answers = {k: b.best(self.min_samples) for k, b in self._buckets.items()}
        return {k: answer for k, answer in answers.items() if answer is not None}


def _carried_over(key: int, measured: dict[int, bool]) -> bool | None:
    """Skip if a smaller measured R skips, draft if a larger one drafts; None when the
    measurements disagree with that monotone rule. Without such evidence, the answer
    of close measured request counts (within ``NEAR``×), if they agree."""
    monotone, near = set(), set()
    here = _requests_of(key)
    for k, best in measured.items():
        if (k < key and best is False) or (k > key and best is True):
            monotone.add(best)
        there = _requests_of(k)
        if max(here, there) <= NEAR * min(here, there):
            near.add(best)
    answers = monotone or near
    return answers.pop() if len(answers) == 1 else None


# Request counts this close (ratio) share a carried-over answer in either direction.
NEAR = 1.5


def same_load(a: int, b: int) -> bool:
    """Whether two request counts share a bucket (one step's time is a sample of the
    choice made before it only when the load did not change in between)."""
    return _bucket_key(a) == _bucket_key(b)


def _bucket_key(requests: int) -> int:
    if requests <= 16:
        return requests
    return 16 + round(4 * math.log2(requests / 16))


def _requests_of(key: int) -> float:
    """The request count a bucket key stands for (the inverse of ``_bucket_key``)."""
    return key if key <= 16 else 16 * 2 ** ((key - 16) / 4)


class _Bucket:
    def __init__(self, window: int, interval: int):
        self.samples = {True: deque(maxlen=window), False: deque(maxlen=window)}
        self.interval = interval  # steps between explorations of the other choice
        self.since = 0
        self.choice: bool | None = None  # what the last decision followed (None: alternating)

    def rate(self, drafted: bool) -> float | None:
        s = self.samples[drafted]
        seconds = sum(t for _, t in s)
        return sum(n for n, _ in s) / seconds if s and seconds > 0 else None

    def contradicts(self, choice: bool) -> bool:
        """Whether the samples so far, however few, favour the other choice."""
        mine, other = self.rate(choice), self.rate(not choice)
        return mine is not None and other is not None and other > mine

    def best(self, min_samples: int) -> bool | None:
        """Drafting (True) or not (False), once both have ``min_samples`` samples."""
        if min(len(self.samples[True]), len(self.samples[False])) < min_samples:
            return None
        return self.rate(True) >= self.rate(False)
