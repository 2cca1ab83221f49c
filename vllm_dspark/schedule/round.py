"""One drafting round's scheduling policy, runner-neutral and engine-free (torch only).

What a runner's DSpark drafter asks the verification scheduler each step, in this
order (the V1 proposer, ``engine/v1/proposer.py``, is the reference caller):

1. ``skip(R, γ, emitted)``, before the step's context K/V writes: the draft gate's
   decision (``schedule/gate.py``). A skipped step defers its context writes and
   verifies nothing (ℓ_r = 0 for every request).
2. ``start(device)``, after the context writes, right before the block's forward:
   the drafting time d(R) counts from here (on CUDA after a synchronisation, so it
   is the drafting's alone).
3. ``plan(R, γ, device_type)``, after the backbone: which block positions to project
   onto the vocabulary and sample (``Plan.width``), or, on CPU with ``causal``, the
   survival floor at which each row stops (``Plan.floor``). Both come from earlier
   steps only (the last lengths, d(R), SPS), so they are lossless.
4. ``finish(confidence, R, started)``: the per-request lengths ℓ_r, then d(R) is
   observed. The lengths' host copy synchronises, so on a GPU the time observed is
   the drafting's; the policy's own work in 3 and 4 is part of it.

Without an active scheduler (none attached, ``fixed``, or a draft without a
confidence head) the round drafts and verifies all γ: ``skip`` is False, the plan is
the whole block and ``finish`` returns None.

Each round also lands in ``RoundPolicy.stats`` (``RoundStats``): whether it drafted or
the gate skipped it, and, when scheduled, the wall time of the scheduler's own
decisions in it (the gate in 1, the plan in 3, the lengths in 4). The runner hands
``stats.take()`` to the engine core with the step's output; the plugin's Prometheus
metrics (``engine/metrics.py``) count them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vllm_dspark.schedule.verification import VerificationScheduler


@dataclass(frozen=True)
class Plan:
    """How much of the drafted block to project and sample this round."""

    width: int  # block positions to project onto the vocabulary and sample (≤ γ)
    floor: float | None  # survival at which a row stops drafting; None = no per-row stop


@dataclass
class RoundStats:
    """The rounds since the last ``take()``: how many drafted, how many the draft gate
    skipped, and the scheduler's decision time (seconds) of each scheduled round."""

    drafted: int = 0
    skipped: int = 0
    decision_seconds: list[float] = field(default_factory=list)
    max_kept: int = 4096  # timings kept between takes (a runner that never takes them)

    def decided(self, seconds: float) -> None:
        if len(self.decision_seconds) < self.max_kept:
            self.decision_seconds.append(seconds)

    def take(self) -> dict | None:
        """The counts as a plain dict (they travel between processes), then zero; None
        when no round ran since the last take."""
        if not (self.drafted or self.skipped):
            return None
        out = {"drafted": self.drafted, "skipped": self.skipped,
               "decision_seconds": self.decision_seconds}
        self.drafted, self.skipped, self.decision_seconds = 0, 0, []
        return out


class RoundPolicy:
    """The verification scheduler's part in one drafting round (module docstring).

    ``confidence``: the draft has a confidence head (the schedulers need one).
    ``stats``: where the rounds are counted (a new ``RoundStats`` by default; pass the
    previous policy's to keep counting across a replacement). ``timer``: the clock of
    the decision times (``clock`` times the drafting)."""

    def __init__(self, scheduler: VerificationScheduler | None = None, *,
                 confidence: bool = False, clock: Callable[[], float] = time.perf_counter,
                 stats: RoundStats | None = None,
                 timer: Callable[[], float] = time.perf_counter):
        self.scheduler = scheduler
        self.confidence = confidence
        self.clock = clock
        self.stats = stats if stats is not None else RoundStats()
        self.timer = timer
        self._decision = 0.0  # the scheduler's time so far in this round

    @property
    def scheduled(self) -> bool:
        """The scheduler decides this round's lengths (else every request verifies γ)."""
        s = self.scheduler
        return s is not None and s.active and self.confidence

    def skip(self, batch_size: int, gamma: int, emitted: Callable[[], int | None]) -> bool:
        """Draft nothing this step (the gate measured that drafting does not pay at this
        request count). ``emitted()``: the tokens the target emitted in the step that
        just ran, None unless it was a pure decode step; called only with a gate.
        A round with γ = 0 drafts nothing and is not counted."""
        if gamma <= 0:
            return False
        if not self.scheduled:
            self.stats.drafted += 1
            return False
        t0 = self.timer()
        skip = not self.scheduler.should_draft(batch_size, emitted)
        self._decision = self.timer() - t0
        if skip:
            self.stats.skipped += 1
            self.stats.decided(self._decision)
        else:
            self.stats.drafted += 1
        return skip

    def start(self, device: torch.device) -> float:
        """The clock at the start of the drafting (after a CUDA synchronisation when
        scheduled, so that earlier queued work is not counted)."""
        if self.scheduled and device.type == "cuda":
            torch.cuda.synchronize(device)
        return self.clock()

    def plan(self, batch_size: int, gamma: int, device_type: str) -> Plan:
        """The positions worth drafting. On CPU with ``causal``: rows stop at Algorithm
        1's admission floor (exact: the lengths are those of the whole block). Elsewhere
        (a GPU, where per-row stops would cost a host sync per position, ``async``, or
        a floor of 0): the first ``draft_width`` positions for every row."""
        if not self.scheduled:
            return Plan(width=gamma, floor=None)
        t0 = self.timer()
        s = self.scheduler
        floor = (s.admission_floor(batch_size, gamma) if device_type == "cpu" else None) or None
        plan = Plan(width=gamma if floor is not None else s.draft_width(gamma), floor=floor)
        self._decision += self.timer() - t0
        return plan

    def finish(self, confidence: torch.Tensor | None, batch_size: int,
               started: float | None) -> list[int] | None:
        """The verification length of each request (None when not scheduled: verify
        every drafted token), then the drafting time since ``started`` is observed
        (``started`` None: the caller times the drafting itself and calls
        ``scheduler.observe``). The decision time counts ``lengths()`` alone: on CUDA
        after a synchronisation (the drafting's queued kernels are not the decision's)."""
        if not self.scheduled:
            return None
        if confidence is not None and confidence.device.type == "cuda":
            torch.cuda.synchronize(confidence.device)  # lengths() synchronises anyway
        t0 = self.timer()
        lengths = self.scheduler.lengths(confidence)
        self.stats.decided(self._decision + self.timer() - t0)
        self._decision = 0.0
        if started is not None:  # after lengths(): its .tolist() synchronised
            self.scheduler.observe(batch_size, self.clock() - started)
        return lengths
