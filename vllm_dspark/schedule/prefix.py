"""Per-request verification lengths from calibrated confidences (paper §3.2.2, §5.2).

Each request r drafted up to γ tokens with confidences c_{r,1..γ} (eq. 7, already
STS-calibrated); verifying a prefix of length ℓ_r costs ℓ_r + 1 target tokens and
yields in expectation 1 + Σ_{j≤ℓ_r} a_{r,j} tokens, with a_{r,j} = ∏_{i≤j} c_{r,i}.
The schedulers choose ℓ_r to maximise the batch throughput Θ = τ·SPS(B).

- ``causal_schedule``: Algorithm 1 with its early stop; lossless (Appendix A).
  ``causal_schedule_from_survival`` is the same on given survival values (tree nodes).
- ``async_schedule``: §5.2; the admission budget K comes from confidences two
  steps old (global argmax of Θ, no early stop), the admitted tokens are the
  current top-K. Lossless because K cannot depend on the current drafts.
- ``fixed_schedule``: verify every drafted token (the baseline).
- ``admission_floor``: a survival value below which Algorithm 1 admits nothing, so a
  drafter can stop drafting a row there (``decode.draft.sample_block``).

Why the sorted greedy path gives prefixes: a_{r,j} ≤ a_{r,j-1} (confidences lie in
[0, 1] and IEEE multiplication is monotone), and ties are broken by (r, j), so a
request's position j is always admitted after its position j-1.

Why the causal stop is lossless: whether (r, k) is admitted depends only on the
candidates ranked above it, i.e. other requests' drafts and a_{r,≤k}, which are
functions of x_{r,<k}; c_{r,k+1} (which sees x_{r,k}) is never looked at before the
decision about x_{r,k} is final. A global argmax over the whole path would look
at it (Appendix A's counterexample; ``tests/schedule`` measures the bias).

All functions are plain torch, run on the confidences' device, loop over nothing
and never synchronise with the host (diagnostics are 0-dim tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_dspark.schedule.sps import SPSTable

SPSLike = SPSTable | Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Schedule:
    lengths: torch.Tensor  # [R] int64, ℓ_r ∈ [0, cap_r]: draft tokens to verify
    tau: torch.Tensor  # 0-dim float64: expected tokens emitted, Σ_r (1 + Σ_{j≤ℓ_r} a_{r,j})
    batch: torch.Tensor  # 0-dim int64: B = Σ_r (1 + ℓ_r)
    theta: torch.Tensor  # 0-dim float64: τ·SPS(B), expected tokens per second
    admitted: torch.Tensor  # 0-dim int64: Σ_r ℓ_r, candidates admitted


def _sps_fn(sps: SPSLike) -> Callable[[torch.Tensor], torch.Tensor]:
    return sps.sps_many if isinstance(sps, SPSTable) else sps


def with_drafting_time(sps: SPSLike, d: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """SPS of a round whose target step is preceded by ``d`` seconds of drafting:
    1 / (1/SPS(B) + d). ``d = 0`` returns ``sps`` itself."""
    fn = _sps_fn(sps)
    if d == 0:
        return fn
    return lambda b: 1.0 / (1.0 / fn(b).to(torch.float64) + d)


def _caps(c: torch.Tensor, lengths_cap: torch.Tensor | None) -> torch.Tensor:
    r, gamma = c.shape
    if lengths_cap is None:
        return torch.full((r,), gamma, dtype=torch.long, device=c.device)
    return lengths_cap.to(device=c.device, dtype=torch.long).clamp(0, gamma)


def survival(c: torch.Tensor, lengths_cap: torch.Tensor | None = None) -> torch.Tensor:
    """a_{r,j} = ∏_{i≤j} c_{r,i} (Algorithm 1, line 2), float64 [R, γ]; positions past
    cap_r are set to 0 (not candidates). NaN → 0, values clamped to [0, 1]."""
    a = torch.cumprod(c.to(torch.float64).nan_to_num(0.0).clamp(0.0, 1.0), dim=1)
    j = torch.arange(1, c.shape[1] + 1, device=c.device)
    return torch.where(j[None, :] <= _caps(c, lengths_cap)[:, None], a, 0.0)


def _sorted_path(a: torch.Tensor):
    """Candidates E = {(r, j): a_{r,j} > 0} sorted by a descending (line 4).

    Returns (order, a_sorted, n_valid): ``order`` indexes the flattened [R·γ] grid;
    invalid candidates (a = 0) sort last. The stable sort keeps the row-major (r, j)
    order among equal values: the deterministic tie-break that keeps prefixes."""
    flat = a.reshape(-1)
    a_sorted, order = torch.sort(flat, descending=True, stable=True)
    return order, a_sorted, (flat > 0).sum()


def _theta_path(a: torch.Tensor, sps: SPSLike):
    """Θ_k for k = 0..R·γ admitted candidates along the sorted path (lines 5-9).

    Line 5-6: B ← R, τ* ← R (every request verifies its anchor and always emits one
    token, the bonus/correction), Θ_0 = R·SPS(R). Line 8: each admission adds 1 to B
    and a_{r,j} to τ*. Entries past the valid candidates are -inf."""
    r, gamma = a.shape
    order, a_sorted, n_valid = _sorted_path(a)
    k = torch.arange(r * gamma + 1, device=a.device)
    tau = torch.cat([a_sorted.new_zeros(1), torch.cumsum(a_sorted, 0)]) + r
    theta = tau * _sps_fn(sps)(k + r).to(torch.float64)
    theta = torch.where(k <= n_valid, theta, float("-inf"))
    return order, tau, theta, n_valid


def _finish(a: torch.Tensor, order: torch.Tensor, n_admit: torch.Tensor, tau_path, theta_path):
    """Scatter the first ``n_admit`` sorted candidates back to per-request lengths."""
    r, gamma = a.shape
    taken = (torch.arange(r * gamma, device=a.device) < n_admit).long()
    lengths = torch.zeros(r, dtype=torch.long, device=a.device)
    lengths.scatter_add_(0, torch.div(order, gamma, rounding_mode="floor"), taken)
    return Schedule(lengths=lengths, tau=tau_path[n_admit], batch=n_admit + r,
                    theta=theta_path[n_admit], admitted=n_admit)


def _empty(device) -> Schedule:
    z = torch.zeros((), dtype=torch.long, device=device)
    zf = torch.zeros((), dtype=torch.float64, device=device)
    return Schedule(torch.zeros(0, dtype=torch.long, device=device), zf, z, zf, z)


def causal_schedule(
    c: torch.Tensor, sps: SPSLike, lengths_cap: torch.Tensor | None = None
) -> Schedule:
    """Algorithm 1, vectorised: Θ for every prefix of the sorted path at once, then the
    first k with Θ_k ≤ Θ_{k-1} (line 10-13's break). Because the loop breaks at the
    first non-improvement, Θ_best is always the previous Θ, so "first k where the path
    stops increasing" is exactly the loop's stopping point."""
    if c.shape[0] == 0:
        return _empty(c.device)
    return causal_schedule_from_survival(survival(c, lengths_cap), sps)


def causal_schedule_from_survival(a: torch.Tensor, sps: SPSLike) -> Schedule:
    """Algorithm 1 on given survival values a [R, L] (float64 in [0, 1], 0 = no
    candidate), each row nonincreasing: lengths are then prefixes of the rows. The
    chain's a is ``survival(c)``; a draft tree's is its nodes' (``schedule.tree``)."""
    if a.shape[0] == 0:
        return _empty(a.device)
    order, tau, theta, _ = _theta_path(a, sps)
    improves = theta[1:] > theta[:-1]  # -inf past the valid candidates never improves
    n_admit = torch.cumprod(improves.long(), 0).sum()  # length of the leading run of True
    return _finish(a, order, n_admit, tau, theta)


def admission_floor(sps: SPSLike, requests: int, gamma: int) -> float:
    """A survival value at or below which Algorithm 1 admits no candidate of a batch of
    ``requests`` rows × ``gamma`` positions, whatever the other confidences are.

    Why: with n candidates admitted (B = R + n), admitting one of value a improves Θ iff
    (τ + a)·SPS(B+1) > τ·SPS(B), i.e. a > τ·g(B) with g(B) = SPS(B)/SPS(B+1) − 1. The n
    admitted candidates all rank above it, so τ ≥ R + n·a, and admission needs
    a·(1 − n·g) > R·g. The floor is the smallest bound R·g/(1 − n·g) over every reachable
    n (no bound where 1 − n·g ≤ 0: nothing is admitted there). A candidate at or below
    it fails wherever the walk meets it, so Algorithm 1 stops there; a drafter may leave
    such a row's later positions undrafted (survival 0) without changing any length.
    For a time per step linear in B the floor is R·slope / time(R) (less a 1e-9 relative
    margin, so rounding in Θ can never admit what the floor ruled out).

    0.0 when SPS(B+1) ≥ SPS(B) somewhere (a flat or noisy curve: every candidate may be
    worth verifying there) or the curve is not finite."""
    if requests <= 0 or gamma <= 0:
        return 0.0
    n = torch.arange(requests * gamma, dtype=torch.float64)
    s = _sps_fn(sps)(torch.arange(requests, requests * (gamma + 1) + 1)).to(torch.float64)
    g = s[:-1] / s[1:] - 1.0
    if not bool(torch.isfinite(g).all()) or bool((g <= 0).any()):
        return 0.0
    room = 1.0 - n * g
    bound = torch.where(room > 0, requests * g / room.clamp(min=1e-300), float("inf"))
    return float(bound.min()) * (1.0 - 1e-9)  # a margin for Θ's own rounding


def capacity_budget(
    c_old: torch.Tensor, sps: SPSLike, lengths_cap: torch.Tensor | None = None
) -> torch.Tensor:
    """§5.2's batch capacity K (0-dim int64): the number of draft tokens at the global
    argmax of Θ along Algorithm 1's sorted path, with no early stop (so the search is
    not trapped before a cliff of a jagged SPS curve). Ties → smallest K. Only valid
    for a scheduling decision if ``c_old`` is independent of the drafts being verified
    (two steps old); on the current confidences it is the lossy scheduler of App. A."""
    if c_old.shape[0] == 0:
        return torch.zeros((), dtype=torch.long, device=c_old.device)
    _, _, theta, _ = _theta_path(survival(c_old, lengths_cap), sps)
    return torch.argmax(theta)  # first maximum


def topk_schedule(
    c: torch.Tensor, budget: torch.Tensor | int, sps: SPSLike,
    lengths_cap: torch.Tensor | None = None,
) -> Schedule:
    """Admit the ``budget`` candidates with the largest current survival products
    (fewer if fewer have a > 0): §5.2's "dynamic top-K selection". ``sps`` is used only
    for the diagnostics."""
    if c.shape[0] == 0:
        return _empty(c.device)
    a = survival(c, lengths_cap)
    order, tau, theta, n_valid = _theta_path(a, sps)
    k = torch.as_tensor(budget, device=c.device).long().clamp(min=0)
    return _finish(a, order, torch.minimum(k, n_valid), tau, theta)


def async_schedule(
    c_now: torch.Tensor, c_old: torch.Tensor, sps: SPSLike,
    lengths_cap: torch.Tensor | None = None, old_lengths_cap: torch.Tensor | None = None,
) -> Schedule:
    """§5.2: K = capacity_budget(c_old) (confidences of the step two back, whose batch may
    hold other requests), then the current top-K by a_{r,j} from ``c_now``.

    Interpretation: K is a count of draft tokens (the truncation length of the sorted
    candidate list), not a total batch size, so it carries over unchanged when requests
    join or leave between the two steps. An engine running ahead of the GPU computes
    ``capacity_budget`` early and calls ``topk_schedule`` itself.

    Lossless: K does not depend on the current drafts, and (r, k) is in the top K iff
    fewer than K candidates rank above it, which are other requests' (independent) and
    r's positions < k (functions of x_{r,<k}); so admitting x_{r,k} never looks at it."""
    k = capacity_budget(c_old, sps, old_lengths_cap)
    return topk_schedule(c_now, k, sps, lengths_cap)


def fixed_schedule(
    cap: torch.Tensor, c: torch.Tensor | None = None, sps: SPSLike | None = None
) -> Schedule:
    """Verify every drafted token (ℓ_r = cap_r). τ and Θ are NaN unless c (and sps) given."""
    lengths = cap.to(torch.long).clamp(min=0)
    r = lengths.shape[0]
    batch = lengths.sum() + r
    nan = torch.full((), float("nan"), dtype=torch.float64, device=lengths.device)
    tau = theta = nan
    if c is not None:
        tau = survival(c, lengths).sum() + r
        if sps is not None:
            theta = tau * _sps_fn(sps)(batch.reshape(1)).to(torch.float64)[0]
    return Schedule(lengths=lengths, tau=tau, batch=batch, theta=theta, admitted=lengths.sum())


def causal_schedule_reference(c, sps_at: Callable[[int], float], lengths_cap=None) -> list[int]:
    """Algorithm 1 transcribed line by line in pure Python (for tests): ``c`` a nested
    list (or tensor) [R][γ], ``sps_at`` a scalar SPS(B). Same conventions as the
    vectorised one: positions past cap_r are no candidates, ties sorted by (r, j)."""
    c = c.tolist() if isinstance(c, torch.Tensor) else c
    R = len(c)
    if R == 0:
        return []
    caps = [len(row) for row in c] if lengths_cap is None else [int(x) for x in lengths_cap]
    a = {}
    for r in range(R):  # lines 1-3
        prod = 1.0
        for j in range(1, len(c[r]) + 1):
            prod *= min(max(float(c[r][j - 1]), 0.0), 1.0)
            a[r, j] = prod if j <= caps[r] else 0.0
    E = sorted((rj for rj, v in a.items() if v > 0), key=lambda rj: (-a[rj], rj))  # line 4
    ell, B, tau = [0] * R, R, float(R)  # line 5
    theta_best, ell_best = R * sps_at(R), [0] * R  # line 6
    for r, j in E:  # line 7
        ell[r] = j  # line 8
        B += 1
        tau += a[r, j]
        theta = tau * sps_at(B)  # line 9
        if theta > theta_best:  # line 10
            theta_best, ell_best = theta, list(ell)  # line 11
        else:
            break  # line 13
    return ell_best
