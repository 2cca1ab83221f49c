"""Whether to draft at all this step, and what drafting costs (beyond the paper).

Algorithm 1 decides how much of a drafted block to verify; the drafting itself is
paid every step. When the target is compute bound (large batches, CPUs) the best
the scheduler can do is verify almost nothing, and the drafting time alone then
makes speculation slower than plain decoding. Two additions fix that:

1. The round's time is target + drafter: Θ = τ / (1/SPS(B) + d), d the measured
   drafting time of this batch (``DraftCost``). Once a block is drafted d is sunk,
   so the verification decision should count it (it admits a little more).
2. ``DraftGate`` predicts, before drafting, the best Θ a drafted step could reach
   — from the survival curves of recently drafted requests, the current request
   count R and d(R) — against R·SPS(R) for a plain step, and skips the drafter when
   drafting cannot pay. Every ``probe_every``-th skipped step drafts anyway, so the
   curves stay fresh when the workload changes.

Both are lossless: they use only earlier steps' confidences and timings, never the
draft being verified (skipping = verifying ℓ_r = 0 for every request).
"""

from __future__ import annotations

import torch

from vllm_dspark.schedule.prefix import SPSLike, _sps_fn, _theta_path, with_drafting_time


class DraftCost:
    """Drafting seconds per step as a function of the request count R: the minimum of
    the last ``window`` measurements per R (the first calls of a fresh engine and CPU
    contention only ever add time, and a mean of them made the gate refuse drafting
    that paid), or a fixed value (``fixed``, for tests and known setups). An
    unmeasured R borrows the nearest measured R's time; if that is wrong the gate errs
    for a step or two until the R has been measured."""

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
    """Before each step: draft or not (see the module docstring)."""

    def __init__(self, sps: SPSLike, cost: DraftCost, pool_rows: int = 512,
                 probe_every: int = 32):
        self.sps = sps
        self.cost = cost
        self.pool_rows = pool_rows
        self.probe_every = probe_every
        self._pool: torch.Tensor | None = None  # [≤ pool_rows, γ] recent survival rows
        self._skipped = 0
        self.drafted_steps = 0
        self.skipped_steps = 0

    def observe(self, survival: torch.Tensor) -> None:
        """Survival products a_{r,j} of a drafted step (calibrated), any device."""
        rows = survival.detach().to("cpu", torch.float64)
        pool = rows if self._pool is None else torch.cat([self._pool, rows])
        self._pool = pool[-self.pool_rows:]

    def predicted_gain(self, requests: int) -> float | None:
        """max over verification budgets of Θ(drafted) / Θ(plain), for R requests whose
        survival curves look like the most recent ones; None when unknown."""
        d = self.cost.seconds(requests)
        if self._pool is None or d is None or requests <= 0:
            return None
        idx = torch.arange(requests) % self._pool.shape[0]  # the most recent rows, cycled
        rows = self._pool.flip(0)[idx]
        # Θ along Algorithm 1's sorted path, each step paying d of drafting on top
        _, _, theta, _ = _theta_path(rows, with_drafting_time(self.sps, d))
        best = float(theta.max())
        plain = requests * float(_sps_fn(self.sps)(torch.tensor([requests]))[0])
        return best / plain

    def should_draft(self, requests: int) -> bool:
        gain = self.predicted_gain(requests)
        draft = gain is None or gain > 1.0 or self._skipped >= self.probe_every
        self._skipped = 0 if draft else self._skipped + 1
        if draft:
            self.drafted_steps += 1
        else:
            self.skipped_steps += 1
        return draft
