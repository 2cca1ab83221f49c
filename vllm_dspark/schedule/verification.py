"""Confidence-scheduled verification (paper §3.2.2, §5.2): knobs and per-step lengths.

Engine-free (torch only). Each step the drafter drafts γ tokens per request with
confidences; ``VerificationScheduler`` turns them into per-request verification
lengths ℓ_r (``schedule.prefix``) and the runner hands vLLM's scheduler only those
prefixes, so vLLM verifies Σ ℓ_r draft tokens instead of R·γ. vLLM's own spec-decode
counters then export what was verified (``vllm:spec_decode_num_draft_tokens /
num_drafts`` = verified draft tokens per request per step) and the acceptance rate.
What needs vLLM (profiling SPS with the runner's forward passes, building the
scheduler after warm-up) is ``vllm_dspark.engine.sps_profile``; the per-round policy
a runner follows (gate, width, floor, lengths, timing) is ``schedule/round.py``.

Knobs (read in every process; checked at start-up, before workers exist):

- ``VLLM_DSPARK_SCHEDULER``: ``fixed`` (verify all γ), ``causal`` (Algorithm 1
  with the causal early stop; the default when the draft has a confidence head)
  or ``async`` (§5.2: budget from the confidences of two steps before).
- ``VLLM_DSPARK_SPS``: a table written by ``vllm-dspark profile`` (JSON), or
  ``profile`` (default): measure SPS(B) once after the engine's warm-up, cached
  on disk per (model, dtype, device, vLLM version).
- ``VLLM_DSPARK_DRAFT_COST``: ``measure`` (default): the measured drafting time per
  step is added to every step's time in Θ, and the draft gate (``schedule/gate.py``)
  skips drafting while steps without drafts are measured faster (e.g. under heavy
  load); ``0``: the paper's Algorithm 1 verbatim (target-only SPS, always draft); a
  number of seconds: that fixed drafting time in Θ, always draft (reproducible
  decisions, e.g. in tests).

On a GPU the decision is one CUDA-graphed Triton kernel (``schedule/triton_prefix``).

Shortening drafts needs the drafts on the host before vLLM schedules them; with
vLLM's async scheduling (GPU) the step's draft count is fixed, so the engine falls
back to ``fixed`` there and says so once (``engine/sps_profile.build``).
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass

import torch

from vllm_dspark.config import DSparkConfig, DSparkConfigError

SCHEDULER_ENV = "VLLM_DSPARK_SCHEDULER"
SPS_ENV = "VLLM_DSPARK_SPS"
DRAFT_COST_ENV = "VLLM_DSPARK_DRAFT_COST"
MODES = ("fixed", "causal", "async")


@dataclass
class Settings:
    mode: str  # fixed | causal | async
    sps: str  # "profile" or a table path
    table: object = None  # the loaded SPSTable when ``sps`` is a path
    draft_cost: float | None = None  # fixed drafting seconds per step; None = measure


def read_settings(cfg: DSparkConfig, environ=None) -> Settings:
    """The knobs, checked against the draft: one DSparkConfigError per bad value."""
    env = os.environ if environ is None else environ
    raw = env.get(SCHEDULER_ENV, "").strip().lower()
    if raw and raw not in MODES:
        raise DSparkConfigError(
            f"{SCHEDULER_ENV}={env.get(SCHEDULER_ENV)!r} is not a scheduler; use one of "
            f"{', '.join(MODES)} (or unset it for the default, causal).")
    mode = raw or ("causal" if cfg.enable_confidence_head else "fixed")
    if mode != "fixed" and not cfg.enable_confidence_head:
        raise DSparkConfigError(
            f"{SCHEDULER_ENV}={mode} needs confidences, but this draft has no confidence "
            "head (enable_confidence_head is false); use a draft trained with one, or set "
            f"{SCHEDULER_ENV}=fixed.")
    sps = env.get(SPS_ENV, "").strip() or "profile"
    table = None
    if mode != "fixed" and sps != "profile":
        from vllm_dspark.schedule.sps import SPSTable, user_fix

        if not os.path.isfile(sps):
            raise DSparkConfigError(
                f"{SPS_ENV}={sps!r}: no such file; give a table written by "
                "`vllm-dspark profile`, or 'profile' to measure one at start-up.")
        # A DSparkConfigError naming what is malformed, and the fix for a user's file.
        table = SPSTable.load(sps, fix=user_fix(sps))
    return Settings(mode=mode, sps=sps, table=table, draft_cost=_draft_cost(env))


def _draft_cost(env) -> float | None:
    raw = env.get(DRAFT_COST_ENV, "").strip().lower()
    if raw in ("", "measure"):
        return None  # default: measured (faster than the paper's variant at every
        # load of the CPU sweep, benchmarks/README.md)
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise DSparkConfigError(
            f"{DRAFT_COST_ENV}={env.get(DRAFT_COST_ENV)!r} is not 'measure' or a finite number "
            "of seconds ≥ 0; use 'measure' (the default: time it and gate drafting), 0 "
            "(ignore drafting time: the paper's Algorithm 1 verbatim), or e.g. 0.004.")
    return value


class VerificationScheduler:
    """Per-step ℓ_r for the proposer; keeps two steps of confidences for ``async``,
    the drafting time d(R) and the draft gate (``schedule/gate.py``)."""

    def __init__(self, settings: Settings, sps=None):
        from vllm_dspark.schedule.gate import DraftCost

        self.settings = settings
        self.mode = settings.mode
        self.sps = None
        self.cost = DraftCost(fixed=settings.draft_cost)
        self.gate = None
        self._deciders: dict = {}  # GPU: one CUDA-graphed kernel per stopping rule
        self.max_requests = 256  # set from max_num_seqs by ``engine.sps_profile.build``
        self._longest: int | None = None  # the longest ℓ_r of the last decision
        self.gamma: int | None = None  # the drafter's γ (the GPU decider's width), set by ``build``
        self._history: deque[torch.Tensor] = deque(maxlen=2)  # confidences, [R, γ] per step
        self.sps_source: str | None = None  # where the SPS table came from (start-up line)
        if sps is not None:
            self.set_sps(sps)

    def set_sps(self, sps) -> None:
        from vllm_dspark.schedule.gate import DraftGate

        self.sps = sps
        # Only "measure" gates; a fixed drafting time (0 = the paper's Algorithm 1
        # verbatim) always drafts, so decisions depend on the confidences alone.
        self.gate = DraftGate() if self.settings.draft_cost is None else None

    @property
    def active(self) -> bool:
        return self.mode != "fixed" and self.sps is not None

    def should_draft(self, requests: int, emitted) -> bool:
        """At the start of a step's drafting. ``emitted()`` gives what the target emitted
        in the step that just ran, None unless it was a pure decode step
        (schedule/gate.py); called only when there is a gate (it may synchronise)."""
        if self.gate is None:
            return True
        return self.gate.step(time.perf_counter(), requests, emitted())

    def draft_width(self, gamma: int) -> int:
        """Block positions worth projecting onto the vocabulary this step. With the
        measured drafting cost (``measure``): one more than the longest prefix verified
        last step, so under load, where Algorithm 1 verifies 0–1 tokens per request,
        drafting skips most of its vocabulary projections, and the width grows back by
        one per step as load falls. Lossless: it only shortens the drafts, from
        earlier decisions. The paper's variant (a fixed drafting time) keeps all γ."""
        if self.gate is None or self._longest is None:
            return gamma
        return max(1, min(gamma, self._longest + 1))

    def admission_floor(self, requests: int, gamma: int) -> float | None:
        """The survival at or below which this step's Algorithm 1 admits nothing, for the
        drafter to stop drafting a row there (``schedule.prefix.admission_floor``: same
        SPS, same drafting time as ``lengths``). None unless ``causal``: §5.2 ranks by a
        budget from older confidences, ``fixed`` verifies everything."""
        if self.mode != "causal" or self.sps is None:
            return None
        from vllm_dspark.schedule.prefix import admission_floor, with_drafting_time

        d = self.cost.seconds(requests) or 0.0
        return admission_floor(with_drafting_time(self.sps, d), requests, gamma)

    def observe(self, requests: int, seconds: float) -> None:
        """After a drafted step: its drafting time."""
        self.cost.observe(requests, seconds)

    def lengths(self, confidence: torch.Tensor) -> list[int]:
        lengths = self._lengths(confidence)
        self._longest = max(lengths, default=0)
        return lengths

    def _lengths(self, confidence: torch.Tensor) -> list[int]:
        from vllm_dspark.schedule.prefix import (
            async_schedule,
            causal_schedule,
            with_drafting_time,
        )

        c = confidence.float()
        r, gamma = c.shape
        d = self.cost.seconds(r) or 0.0
        old = None
        if self.mode == "async":
            # §5.2: the budget comes from the confidences of the step two back (the
            # requests then in the batch); until there is one, verify everything.
            old = self._history[0] if len(self._history) == 2 else None
            self._history.append(c)
            if old is None:
                return [gamma] * r
        width = self.gamma or gamma  # the GPU decider's, fixed; draft_width may be less
        decider = self._decider(c.device, width)
        if decider is not None:
            from vllm_dspark.schedule import triton_prefix as tp

            def pad(x):  # a narrower block: survival 0 past its width
                return torch.nn.functional.pad(x, (0, width - x.shape[1]))

            c, old = pad(c), (pad(old) if old is not None else None)
            if self.mode == "causal":
                return decider[tp.CAUSAL].decide(c, extra_seconds=d)
            budget = sum(decider[tp.CAPACITY].decide(old, extra_seconds=d))
            return decider[tp.TOPK].decide(c, budget=budget)
        sps = with_drafting_time(self.sps, d)
        sched = causal_schedule(c, sps) if self.mode == "causal" else async_schedule(c, old, sps)
        return sched.lengths.tolist()

    def _decider(self, device: torch.device, gamma: int):
        """The CUDA-graphed Triton kernels on a GPU (~40× faster than the torch path
        there, benchmarks/README.md); None on CPU, where torch is faster."""
        if device.type != "cuda":
            return None
        if device not in self._deciders:
            from vllm_dspark.schedule import triton_prefix as tp

            n = self.max_requests
            if not (tp.available(device) and tp.fits(n, gamma)):
                self._deciders[device] = None
            else:
                self._deciders[device] = {
                    m: tp.GraphedDecider(self.sps, gamma, n, device, m)
                    for m in ((tp.CAUSAL,) if self.mode == "causal" else (tp.CAPACITY, tp.TOPK))}
        return self._deciders[device]
