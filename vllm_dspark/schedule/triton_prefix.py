"""The prefix schedulers of ``prefix.py`` as two Triton kernels (one CUDA graph per R).

``causal_schedule`` in torch is ~40 tiny kernels; on a GPU their launch latency, not
the work, sets the cost (~0.6 ms on an H100 for 256 requests × γ=7). Here:

1. ``_rank_kernel`` (one program per block of candidates, spread over the SMs): each
   candidate (r, j) recomputes the survival products it needs and ranks itself
   against all candidates — rank = #{ranked before it}, S = Σ a of those — which
   gives its place on Algorithm 1's sorted path without sorting: τ after admitting
   it = R + S + a, Θ = τ·SPS(R + rank + 1), and whether admitting it improves Θ.
   (A single-program bitonic sort of 2 048 float64 values took ~30–40 µs; ranking is
   O(N²) comparisons but parallel, a few µs.)
2. ``_finish_kernel`` (one program): the stopping rule over the ranks, then
   ℓ_r = #{j : rank_{r,j} < n_admit}.

Same conventions as the torch reference (``tests/schedule`` checks them against each
other under ``TRITON_INTERPRET=1``, and on a GPU):

- a_{r,j} = cumprod of clamp(c, 0, 1) in float64, NaN → 0; positions past cap_r → 0;
  a = 0 is no candidate.
- order: a descending, ties by the row-major index r·γ + j (the stable sort's).
- Θ_k = (R + Σ_{i≤k} a_(i)) · SPS(R + k), SPS read from a dense per-B vector
  (``dense_sps``), so any SPS model is one gather; a fixed extra time per step (the
  drafting) is applied in-kernel: SPS → SPS / (1 + SPS·extra).

Stopping rules (``MODE``): 0 = Algorithm 1 (first k with Θ_k ≤ Θ_{k-1}); 1 = §5.2's
capacity K (first global argmax of Θ, no early stop); 2 = top-K with K given.
Sums are reduced in parallel, so Θ may differ from torch's sequential cumsum in the
last bits; lengths differ only when two Θ values tie to ~1e-16.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch schedulers still work
    triton = None

MAX_CANDIDATES = 16384  # the finishing program holds all ranks; above this use torch
BLOCK_I = 32  # candidates per ranking program
BLOCK_K = 256  # candidates compared per loop iteration

CAUSAL, CAPACITY, TOPK = 0, 1, 2
_BIG = tl.constexpr(1 << 30) if triton is not None else 1 << 30

if triton is not None:

    @triton.jit
    def _survival(c_ptr, cap_ptr, idx, valid, G, stride_r,
                  HAS_CAP: tl.constexpr, BLOCK_G: tl.constexpr):
        """a at flat indices ``idx`` (r·G + j): cumprod of the row up to j."""
        r = idx // G
        j = idx % G
        col = tl.arange(0, BLOCK_G)[None, :]
        row_mask = valid[:, None] & (col <= j[:, None])
        c = tl.load(c_ptr + r[:, None] * stride_r + col, mask=row_mask, other=1.0)
        c = c.to(tl.float64)
        c = tl.where(c == c, c, 0.0)  # NaN → 0
        c = tl.minimum(tl.maximum(c, 0.0), 1.0)
        a = tl.reduce(c, 1, _mul)  # product over columns ≤ j (others loaded as 1)
        if HAS_CAP:
            cap = tl.load(cap_ptr + r, mask=valid, other=0)
            a = tl.where(j < cap, a, 0.0)
        return tl.where(valid, a, 0.0)

    @triton.jit
    def _mul(x, y):
        return x * y

    @triton.jit
    def _rank_kernel(
        c_ptr, cap_ptr, sps_ptr, scal_ptr, rank_ptr, tau_ptr, theta_ptr, imp_ptr,
        R, G, stride_r, sps_len,
        HAS_CAP: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        n = R * G
        i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
        valid_i = i < n
        a_i = _survival(c_ptr, cap_ptr, i, valid_i, G, stride_r, HAS_CAP, BLOCK_G)
        rank = tl.zeros([BLOCK_I], dtype=tl.int32)
        before_sum = tl.zeros([BLOCK_I], dtype=tl.float64)
        for start in range(0, n, BLOCK_K):
            k = start + tl.arange(0, BLOCK_K)
            valid_k = k < n
            a_k = _survival(c_ptr, cap_ptr, k, valid_k, G, stride_r, HAS_CAP, BLOCK_G)
            ak = a_k[None, :]
            ai = a_i[:, None]
            first = (ak > ai) | ((ak == ai) & (k[None, :] < i[:, None]))
            first = first & (ak > 0)
            rank += tl.sum(first.to(tl.int32), axis=1)
            before_sum += tl.sum(tl.where(first, ak, 0.0), axis=1)

        cand = valid_i & (a_i > 0)
        extra = tl.load(scal_ptr)  # drafting seconds per step
        sps_now = tl.load(sps_ptr + R + rank + 1, mask=cand & (R + rank + 1 < sps_len),
                          other=0.0).to(tl.float64)
        sps_before = tl.load(sps_ptr + R + rank, mask=cand & (R + rank < sps_len),
                             other=0.0).to(tl.float64)
        sps_now = sps_now / (1.0 + sps_now * extra)  # = 1/(1/SPS + extra); 0 stays 0
        sps_before = sps_before / (1.0 + sps_before * extra)
        tau = before_sum + a_i + R
        theta = tau * sps_now
        improves = theta > (before_sum + R) * sps_before
        tl.store(rank_ptr + i, tl.where(cand, rank, _BIG), mask=valid_i)
        tl.store(tau_ptr + i, tau, mask=valid_i)
        tl.store(theta_ptr + i, theta, mask=valid_i)
        tl.store(imp_ptr + i, improves.to(tl.int8), mask=valid_i)

    @triton.jit
    def _finish_kernel(
        sps_ptr, scal_ptr, rank_ptr, tau_ptr, theta_ptr, imp_ptr, out_ptr, diag_ptr,
        R, G,
        MODE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        n = R * G
        i = tl.arange(0, BLOCK_N)
        inside = i < n
        rank = tl.load(rank_ptr + i, mask=inside, other=_BIG)
        valid = rank < _BIG
        n_valid = tl.sum(valid.to(tl.int32), axis=0)
        theta = tl.load(theta_ptr + i, mask=inside, other=0.0)
        tau = tl.load(tau_ptr + i, mask=inside, other=0.0)
        extra = tl.load(scal_ptr)
        sps_r = tl.load(sps_ptr + R).to(tl.float64)
        theta0 = R * (sps_r / (1.0 + sps_r * extra))  # Θ with nothing admitted
        if MODE == 0:  # Algorithm 1: stop at the first candidate that does not improve Θ
            imp = tl.load(imp_ptr + i, mask=inside, other=0)
            n_admit = tl.min(tl.where(valid & (imp == 0), rank, n_valid), axis=0)
        elif MODE == 1:  # §5.2 capacity: first global argmax of Θ over k = 0..n_valid
            theta_v = tl.where(valid, theta, float("-inf"))
            best = tl.max(theta_v, axis=0)
            first = tl.min(tl.where(valid & (theta_v == best), rank, _BIG), axis=0)
            n_admit = tl.where(best > theta0, first + 1, 0)
        else:  # top-K with K given
            budget = tl.load(scal_ptr + 1).to(tl.int32)
            n_admit = tl.minimum(tl.maximum(budget, 0), n_valid)

        rows = tl.arange(0, BLOCK_R)
        col = tl.arange(0, BLOCK_G)[None, :]
        in2 = (rows[:, None] < R) & (col < G)
        rank2 = tl.load(rank_ptr + rows[:, None] * G + col, mask=in2, other=_BIG)
        lengths = tl.sum((rank2 < n_admit).to(tl.int64), axis=1)
        tl.store(out_ptr + rows, lengths, mask=rows < R)

        last = valid & (rank == n_admit - 1)  # the last admitted candidate
        tau_n = tl.sum(tl.where(last, tau, 0.0), axis=0)
        theta_n = tl.sum(tl.where(last, theta, 0.0), axis=0)
        tl.store(diag_ptr, n_admit.to(tl.float64))
        tl.store(diag_ptr + 1, tl.where(n_admit > 0, tau_n, R * 1.0))
        tl.store(diag_ptr + 2, tl.where(n_admit > 0, theta_n, theta0))


def available(device: torch.device) -> bool:
    """Whether the kernels can run for tensors on ``device`` (a GPU, or the interpreter)."""
    if triton is None:
        return False
    interpreted = type(_rank_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1
    return interpreted or (device.type == "cuda")


def fits(requests: int, gamma: int) -> bool:
    return _pow2(requests) * _pow2(gamma) <= MAX_CANDIDATES


def _pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _scratch(n: int, device) -> dict[str, torch.Tensor]:
    """Per-candidate rank, τ, Θ and improvement flag, written by the ranking programs."""
    return dict(rank=torch.empty(n, dtype=torch.int32, device=device),
                tau=torch.empty(n, dtype=torch.float64, device=device),
                theta=torch.empty(n, dtype=torch.float64, device=device),
                imp=torch.empty(n, dtype=torch.int8, device=device))


def _launch(c, cap, dense_sps, scalars, out, diag, scratch, r, gamma, mode, has_cap):
    n = r * gamma
    _rank_kernel[(triton.cdiv(n, BLOCK_I),)](
        c, cap, dense_sps, scalars, scratch["rank"], scratch["tau"], scratch["theta"],
        scratch["imp"], r, gamma, c.stride(0), dense_sps.numel(),
        HAS_CAP=has_cap, BLOCK_G=_pow2(gamma), BLOCK_I=BLOCK_I, BLOCK_K=BLOCK_K,
        num_warps=8,  # H100, 256 × 7: 20.6 µs against 26.6 with 4 (block sizes swept too)
    )
    _finish_kernel[(1,)](
        dense_sps, scalars, scratch["rank"], scratch["tau"], scratch["theta"], scratch["imp"],
        out, diag, r, gamma,
        MODE=mode, BLOCK_N=_pow2(n), BLOCK_R=_pow2(r), BLOCK_G=_pow2(gamma),
        num_warps=4 if n <= 1024 else 8,
    )


def prefix_lengths(
    c: torch.Tensor,
    dense_sps: torch.Tensor,
    mode: int = CAUSAL,
    budget: int = 0,
    lengths_cap: torch.Tensor | None = None,
    extra_seconds: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decision: (lengths [R] int64, diag [3] float64 = n_admit, τ, Θ), on c's device.

    ``dense_sps[B]`` = SPS at batch size B, for B = 0 .. ≥ R·(γ+1) (``dense_sps_for``);
    ``extra_seconds`` is added to every step's time (SPS → 1/(1/SPS + extra)), so the
    round's fixed drafting cost needs no new vector each step."""
    r, gamma = c.shape
    if not fits(r, gamma):
        raise ValueError(f"{r}×{gamma} candidates exceed one program ({MAX_CANDIDATES}); "
                         "use the torch schedulers")
    if dense_sps.numel() < r * (gamma + 1) + 1:
        raise ValueError(f"dense_sps has {dense_sps.numel()} sizes, needs {r * (gamma + 1) + 1}")
    c = c.contiguous()
    out = torch.empty(r, dtype=torch.int64, device=c.device)
    diag = torch.empty(3, dtype=torch.float64, device=c.device)
    if r == 0:
        return out, diag.zero_()
    cap = lengths_cap.to(device=c.device, dtype=torch.int32) if lengths_cap is not None else out
    scalars = torch.tensor([float(extra_seconds), float(budget)], dtype=torch.float64,
                           device=c.device)
    _launch(c, cap, dense_sps, scalars, out, diag, _scratch(r * gamma, c.device), r, gamma,
            mode, lengths_cap is not None)
    return out, diag


def dense_sps_for(sps, max_batch: int, device) -> torch.Tensor:
    """SPS(B) for B = 0..max_batch as a float64 vector on ``device`` (B = 0 is unused)."""
    from vllm_dspark.schedule.prefix import _sps_fn

    b = torch.arange(max_batch + 1, device=device)
    return _sps_fn(sps)(b.clamp(min=1)).to(torch.float64).contiguous()


class GraphedDecider:
    """Repeated decisions on one GPU, each one CUDA-graph replay of the two kernels.

    Triton's Python launcher costs ~20 µs per call, more than the kernels; a graph per
    request count R (captured on first use) replays both for a few µs. Confidences go
    in through a static buffer; the two scalars (drafting time, budget) come from
    pinned host memory and the lengths go back to pinned host memory by copies
    captured in the same graph, so a decision is one D2D copy, one replay and one
    stream synchronisation. ``decide`` returns the lengths as a host list (the engine
    needs them there before vLLM schedules the drafts)."""

    def __init__(self, sps, gamma: int, max_requests: int, device, mode: int = CAUSAL):
        self.gamma, self.mode = gamma, mode
        self.max_requests = max_requests
        self.device = torch.device(device)
        self.dense = dense_sps_for(sps, max_requests * (gamma + 1), self.device)
        self.c = torch.zeros(max_requests, gamma, dtype=torch.float32, device=self.device)
        self.scalars = torch.zeros(2, dtype=torch.float64, device=self.device)
        self._scalars_host = torch.zeros(2, dtype=torch.float64).pin_memory()
        self._scalars_np = self._scalars_host.numpy()  # numpy views: µs cheaper than torch
        self.out = torch.zeros(max_requests, dtype=torch.int64, device=self.device)
        self._out_host = torch.zeros(max_requests, dtype=torch.int64).pin_memory()
        self._out_np = self._out_host.numpy()
        self.diag = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.scratch = _scratch(max_requests * gamma, self.device)
        self._graphs: dict[int, tuple] = {}  # R -> (graph, confidence view, lengths view)
        self._stream = None  # the stream of the last replay (fetching it costs ~6 µs)
        self._capture_stream = None

    def _launch(self, r: int) -> None:
        self.scalars.copy_(self._scalars_host, non_blocking=True)
        _launch(self.c[:r], self.out, self.dense, self.scalars, self.out, self.diag,
                self.scratch, r, self.gamma, self.mode, False)
        self._out_host[:r].copy_(self.out[:r], non_blocking=True)

    def _graph(self, r: int):
        entry = self._graphs.get(r)
        if entry is None:
            self._launch(r)  # compile outside the capture
            torch.cuda.synchronize(self.device)
            g = torch.cuda.CUDAGraph()
            # Captured on a side stream of our own (CUDA refuses the default stream).
            if self._capture_stream is None:
                self._capture_stream = torch.cuda.Stream(self.device)
            self._capture_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.graph(g, stream=self._capture_stream):
                self._launch(r)
            entry = self._graphs[r] = (g, self.c[:r], self._out_np[:r])
        return entry

    def _current_stream(self):
        """The current stream, cached by id (torch.cuda.current_stream costs ~6 µs)."""
        get_id = getattr(torch._C, "_cuda_getCurrentStream", None)
        if get_id is None:
            return torch.cuda.current_stream(self.device)
        sid = get_id(self.device.index if self.device.index is not None else
                     torch.cuda.current_device())[0]
        if self._stream is None or self._stream.stream_id != sid:
            self._stream = torch.cuda.current_stream(self.device)
        return self._stream

    def decide(self, c: torch.Tensor, extra_seconds: float = 0.0, budget: int = 0) -> list[int]:
        r = c.shape[0]
        if r == 0:
            return []
        graph, c_in, lengths = self._graph(r)
        c_in.copy_(c, non_blocking=True)
        # The previous replay has finished (we synchronised after it), so the pinned
        # scalars can be rewritten; the replay reads them when it runs.
        self._scalars_np[0], self._scalars_np[1] = extra_seconds, budget
        graph.replay()  # on the current stream, like the copy in
        self._current_stream().synchronize()
        return lengths.tolist()
