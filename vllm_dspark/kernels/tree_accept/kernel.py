"""The tree acceptance walk as one Triton program per request (``ref.py`` is the spec).

Each program keeps its request's tree (tokens, parents; ≤ BLOCK_N nodes) in registers
and walks from the root: per visited row, a blocked argmax over the vocabulary of the
logits (greedy) or of l/T + g (a Gumbel-max draw from softmax(l/T)), then a match of x
against the admitted children of the current node. The loop runs N + 1 times with a
live flag instead of a break. Ties go to the lowest vocabulary index, as torch.argmax.
l/T + g is computed in float32 in the same order as the reference, so the draws match
exactly (the tests compare them under ``TRITON_INTERPRET=1`` on CPU).
"""

from __future__ import annotations

import torch

from vllm_dspark.decode.draft import GREEDY_EPS
from vllm_dspark.decode.tree_verify import TreeVerdict
from vllm_dspark.kernels.tree_accept.ref import check_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

MAX_NODES = 1024  # one program holds the whole tree
BLOCK_V = 1024  # vocabulary entries per argmax step

if triton is not None:

    @triton.jit
    def _load_tree(r, tokens_ptr, parents_ptr, admitted_ptr, N, stride_t, stride_p,
                   BLOCK_N: tl.constexpr):
        """Request r's admitted nodes in registers: (node offsets, live, tokens, parents)."""
        offs_n = tl.arange(0, BLOCK_N)
        admitted = tl.load(admitted_ptr + r)
        live = (offs_n < N) & (offs_n < admitted)
        toks = tl.load(tokens_ptr + r * stride_t + offs_n, mask=live, other=-1)
        pars = tl.load(parents_ptr + r * stride_p + offs_n, mask=live, other=-2)
        return offs_n, live, toks, pars

    @triton.jit
    def _visit(x, step, r, N, cur, num, offs_n, live, toks, pars, accepted_ptr, emitted_ptr,
               BLOCK_N: tl.constexpr):
        """One step of the walk at node ``cur`` (-1: the root) with the draw ``x``: emit
        x, then descend to the admitted child whose token is x (the lowest index if
        several). Returns (node, accepted count, 1 if descended else 0). At step N no
        child is left, so the accepted store never leaves the request's row."""
        child = live & (pars == cur) & (toks == x)
        found = tl.max(child.to(tl.int32), 0) > 0
        nxt = tl.min(tl.where(child, offs_n, BLOCK_N), 0)
        tl.store(emitted_ptr + r * (N + 1) + step, x.to(tl.int64))
        tl.store(accepted_ptr + r * N + step, nxt.to(tl.int64), mask=found)
        return tl.where(found, nxt, cur), num + found.to(tl.int32), found.to(tl.int32)

    @triton.jit
    def _tree_accept_kernel(
        logits_ptr, gumbel_ptr, tokens_ptr, parents_ptr, admitted_ptr, temp_ptr,
        accepted_ptr, emitted_ptr, num_ptr,
        N, V, stride_lr, stride_ln, stride_gr, stride_gn,
        HAS_GUMBEL: tl.constexpr, EPS: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        offs_n, live, toks, pars = _load_tree(r, tokens_ptr, parents_ptr, admitted_ptr, N,
                                              N, N, BLOCK_N)
        t = tl.load(temp_ptr + r)
        greedy = t < EPS
        t = tl.where(greedy, 1.0, t)
        cur = -1
        active = 1
        num = 0
        for step in range(0, N + 1):
            if active != 0:
                row = cur + 1
                base = logits_ptr + r * stride_lr + row * stride_ln
                best = float("-inf")
                best_i = 0
                for v0 in range(0, V, BLOCK_V):
                    offs_v = v0 + tl.arange(0, BLOCK_V)
                    in_v = offs_v < V
                    score = tl.load(base + offs_v, mask=in_v, other=float("-inf")).to(tl.float32)
                    if HAS_GUMBEL:
                        g = tl.load(gumbel_ptr + r * stride_gr + row * stride_gn + offs_v,
                                    mask=in_v, other=0.0)
                        score = tl.where(greedy, score, score / t + g)  # -inf stays -inf
                    blk_max = tl.max(score, 0)
                    blk_arg = tl.argmax(score, 0)
                    better = blk_max > best  # strict: ties stay with the earlier block
                    best_i = tl.where(better, v0 + blk_arg, best_i)
                    best = tl.maximum(best, blk_max)
                cur, num, active = _visit(best_i, step, r, N, cur, num, offs_n, live, toks,
                                          pars, accepted_ptr, emitted_ptr, BLOCK_N)
        tl.store(num_ptr + r, num.to(tl.int64))


if triton is not None:

    @triton.jit
    def _walk_draws_kernel(
        draws_ptr, tokens_ptr, parents_ptr, admitted_ptr, accepted_ptr, emitted_ptr, num_ptr,
        N, stride_dr, stride_tr, stride_pr, BLOCK_N: tl.constexpr,
    ):
        # The walk of _tree_accept_kernel over draws made beforehand (one per tree row):
        # no vocabulary pass, one program per request.
        r = tl.program_id(0).to(tl.int64)
        offs_n, live, toks, pars = _load_tree(r, tokens_ptr, parents_ptr, admitted_ptr, N,
                                              stride_tr, stride_pr, BLOCK_N)
        cur = -1
        active = 1
        num = 0
        for step in range(0, N + 1):
            if active != 0:
                x = tl.load(draws_ptr + r * stride_dr + cur + 1)
                cur, num, active = _visit(x, step, r, N, cur, num, offs_n, live, toks, pars,
                                          accepted_ptr, emitted_ptr, BLOCK_N)
        tl.store(num_ptr + r, num.to(tl.int64))


def available(device: torch.device) -> bool:
    """Whether the kernel can run for tensors on ``device`` (a GPU, or the interpreter)."""
    if triton is None:
        return False
    interpreted = type(_tree_accept_kernel).__name__ == "InterpretedFunction"
    return interpreted or device.type == "cuda"


def _outputs(r: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A verdict's buffers before the walk (accepted, emitted: -1; counts: 0)."""
    if n > MAX_NODES:
        raise ValueError(f"{n} nodes exceed one program ({MAX_NODES}); use the torch "
                         "reference")
    return (torch.full((r, n), -1, dtype=torch.long, device=device),
            torch.full((r, n + 1), -1, dtype=torch.long, device=device),
            torch.zeros(r, dtype=torch.long, device=device))


@torch.no_grad()
def tree_accept_triton(logits, tokens, parents, admitted, temperature, gumbel=None) -> TreeVerdict:
    """Same contract as ``ref.tree_accept_ref``; trees of at most MAX_NODES nodes."""
    check_inputs(logits, tokens, parents, admitted, temperature, gumbel)
    r, n = tokens.shape
    accepted, emitted, num = _outputs(r, n, logits.device)
    if r == 0:
        return TreeVerdict(accepted, num, emitted, num + 1)
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    g = logits if gumbel is None else gumbel.to(torch.float32).contiguous()
    v = logits.shape[-1]
    _tree_accept_kernel[(r,)](
        logits, g, tokens.long().contiguous(), parents.long().contiguous(),
        admitted.long().contiguous(), temperature.to(torch.float32).contiguous(),
        accepted, emitted, num, n, v, logits.stride(0), logits.stride(1),
        g.stride(0), g.stride(1),
        HAS_GUMBEL=gumbel is not None, EPS=GREEDY_EPS,
        BLOCK_N=triton.next_power_of_2(max(n, 1)),
        BLOCK_V=min(BLOCK_V, triton.next_power_of_2(v)),
    )
    return TreeVerdict(accepted, num, emitted, num + 1)


@torch.no_grad()
def walk_draws_triton(draws, tokens, parents, admitted) -> TreeVerdict:
    """Same contract as ``decode.tree_verify.walk_draws`` (its reference): one launch
    instead of the reference's ~15 small ops per depth. No check reads values back to
    the host: shapes only."""
    r, n = tokens.shape
    if draws.shape != (r, n + 1) or parents.shape != (r, n) or admitted.shape != (r,):
        raise ValueError(f"walk_draws needs draws [R, N+1], tokens/parents [R, N], "
                         f"admitted [R]; got {tuple(draws.shape)}, {tuple(tokens.shape)}, "
                         f"{tuple(parents.shape)}, {tuple(admitted.shape)}")
    accepted, emitted, num = _outputs(r, n, tokens.device)
    if r == 0:
        return TreeVerdict(accepted, num, emitted, num + 1)
    draws, tokens, parents = (x.long().contiguous() for x in (draws, tokens, parents))
    _walk_draws_kernel[(r,)](
        draws, tokens, parents, admitted.long().contiguous(), accepted, emitted, num, n,
        draws.stride(0), tokens.stride(0), parents.stride(0),
        BLOCK_N=triton.next_power_of_2(max(n, 1)),
    )
    return TreeVerdict(accepted, num, emitted, num + 1)
