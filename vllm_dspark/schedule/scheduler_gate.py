"""The draft gate where vLLM's scheduler fixes each step's draft count (the V2 runner).

On the V1 runner the gate runs in the worker: the proposer decides, before drafting,
whether to draft, and hands vLLM per-request lists (``schedule/gate.py``). On the V2
runner the drafts stay on the GPU and vLLM's scheduler decides, when it schedules a
step, how many draft tokens every request drafts in it (``num_spec_tokens_to_schedule``,
vLLM's dynamic speculative decoding): K = 0 runs a plain target step and, with our
speculator, only stores the drafter's context K/V. So the gate moves into the
scheduler: ``k(R)`` answers γ or 0 for the step being scheduled, and ``observe`` files
each step's wall time, taken where the engine core receives the step's output (no
device synchronisation: the engine core waits for that output anyway).

One step's time is not a clean sample of one choice. A step t verifies the drafts of
step t-1 (K_{t-1} decides its tokens and its verification cost) and drafts with K_t
(its drafting cost), so a step is a sample of choice c only when K_{t-1} = K_t = c.
Hence a decision that switches is held for one more step (``HOLD``): every
exploration of the other choice yields one clean sample, and the gate's bookkeeping
(``DraftGate``: per request count, explore now and then, follow the faster) is the
V1 gate's. Lossless: K only decides how many drafts are verified, never which tokens
are emitted.
"""

from __future__ import annotations

import json
import time
from typing import TextIO

from vllm_dspark.schedule.gate import DraftGate, same_load

HOLD = 2  # steps a switched decision lasts: one mixed step, then one clean sample


class SchedulerGate:
    def __init__(self, gamma: int, gate: DraftGate | None = None, trace: TextIO | None = None):
        if gamma < 1:
            raise ValueError(f"SchedulerGate needs γ ≥ 1 draft tokens, got {gamma}")
        self.gamma = gamma
        self.gate = gate if gate is not None else DraftGate()
        # Debugging (VLLM_DSPARK_GATE_TRACE): one JSON line per decision that changes K
        # ({"r", "k"}) and per timed sample ({"r", "drafted", "tokens", "s"}), each with
        # its wall-clock time ("wall", to line up with a benchmark's runs), to tell what
        # the gate measured from what it chose.
        self.trace = trace
        self._k: int | None = None  # the last decision
        self._held = 0  # steps the last decision has lasted
        # (time, requests, drafted) of the last output
        self._last: tuple[float, int, bool] | None = None

    def k(self, requests: int) -> int:
        """Draft tokens per request for the step being scheduled: γ or 0."""
        if self._k is None or self._held >= HOLD:
            k = self.gamma if self.gate.decide(requests) else 0
            self._held = 0 if k != self._k else HOLD - 1
            if self.trace is not None and k != self._k:
                self._write({"r": requests, "k": k})
            self._k = k
        self._held += 1
        return self._k

    def __getitem__(self, requests: int) -> int:
        """vLLM's scheduler reads its dynamic draft count as ``lookup[num_requests]``."""
        return self.k(requests)

    def observe(self, now: float, requests: int, tokens: int | None, verified: bool,
                drafted: bool) -> None:
        """A step's output arrived at ``now``: it ran ``requests`` requests, emitted
        ``tokens`` (None unless every request decoded: a prefill or a new request makes
        its time no sample), verified drafts (``verified``: the previous step drafted)
        and drafted (its K > 0)."""
        last, self._last = self._last, (now, requests, drafted)
        if last is None or tokens is None or last[2] != verified:
            return  # the previous output was not this step's predecessor's
        if verified == drafted and same_load(requests, last[1]):
            self.gate.observe(requests, drafted, tokens, now - last[0])
            if self.trace is not None:
                self._write({"r": requests, "drafted": drafted, "tokens": tokens,
                             "s": round(now - last[0], 7)})

    def _write(self, record: dict) -> None:
        self.trace.write(json.dumps(dict(record, wall=round(time.time(), 4))) + "\n")
        self.trace.flush()  # the engine core may be killed, not shut down


def draft_count_tiers(gamma: int, max_num_seqs: int) -> list[tuple[int, int, int]]:
    """vLLM's ``num_speculative_tokens_per_batch_size`` for a gated engine: both draft
    counts appear, so vLLM captures target CUDA graphs for both query lengths (1 and
    γ + 1). The counts it names are never used as such: the gate answers each lookup."""
    if max_num_seqs < 2:
        return [(1, 1, gamma)]
    return [(1, 1, gamma), (2, max_num_seqs, 0)]
