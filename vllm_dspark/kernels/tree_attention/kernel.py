"""Tree attention over a paged KV cache as a Triton kernel (``ref.py`` is the spec).

One program per (query row, query head): it walks the request's keys — the cached
context, then the tree's own rows — in tiles of ``BLOCK_N`` positions, each tile's
slots read through the block table, with an online softmax (running max, sum and
output in float32). A context key is always visible; a tree key only where the
request's ``tree_mask`` row allows it. The running max starts finite, so a tile that
the mask empties adds nothing instead of a NaN. A decode-style kernel: trees of tens
of nodes per request, one query row per program.
"""

from __future__ import annotations

import torch

from vllm_dspark.kernels.tree_attention.ref import check_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

BLOCK_N = 32  # key positions per tile

if triton is not None:

    @triton.jit
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, ctx_ptr, start_ptr, mask_ptr,
        req_ptr, scale, D, M,
        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_tr, stride_mr,
        stride_ot, stride_oh,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        r = tl.load(req_ptr + t).to(tl.int64)
        row = t - tl.load(start_ptr + r)
        nq = tl.load(start_ptr + r + 1) - tl.load(start_ptr + r)
        ctx = tl.load(ctx_ptr + r)
        kvh = h // GROUP
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        q = tl.load(q_ptr + t * stride_qt + h * stride_qh + offs_d, mask=dmask,
                    other=0.0).to(tl.float32)
        m_i = tl.max(tl.full([BLOCK_N], -1.0e30, tl.float32), axis=0)  # fp32 scalars
        l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), axis=0)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j0 in range(0, ctx + nq, BLOCK_N):
            pos = j0 + tl.arange(0, BLOCK_N)
            valid = pos < ctx + nq
            col = pos - ctx
            tree = tl.load(mask_ptr + r * stride_mr + row * M + col,
                           mask=valid & (col >= 0), other=0)
            allowed = valid & ((col < 0) | (tree != 0))
            block = tl.load(table_ptr + r * stride_tr + pos // BLOCK_SIZE, mask=valid,
                            other=0).to(tl.int64)
            base = block * stride_kb + (pos % BLOCK_SIZE) * stride_ks + kvh * stride_kh
            kv_mask = valid[:, None] & dmask[None, :]
            k = tl.load(k_ptr + base[:, None] + offs_d[None, :], mask=kv_mask,
                        other=0.0).to(tl.float32)
            s = tl.sum(k * q[None, :], axis=1) * scale
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=0))
            p = tl.exp(s - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + base[:, None] + offs_d[None, :], mask=kv_mask,
                        other=0.0).to(tl.float32)
            acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        out = acc / l_i
        tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d,
                 out.to(out_ptr.dtype.element_ty), mask=dmask)


def available(device: torch.device) -> bool:
    """Whether the kernel can run for tensors on ``device`` (a GPU, or the interpreter)."""
    if triton is None:
        return False
    interpreted = type(_tree_attention_kernel).__name__ == "InterpretedFunction"
    return interpreted or device.type == "cuda"


@torch.no_grad()
def tree_attention_triton(q, k_cache, v_cache, block_table, context_lens, query_start,
                          tree_mask, scale: float) -> torch.Tensor:
    """Same contract as ``ref.tree_attention_ref``."""
    check_inputs(q, k_cache, v_cache, block_table, context_lens, query_start, tree_mask)
    out = torch.empty_like(q)
    t, heads, d = q.shape
    if t == 0:
        return out
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    counts = (query_start[1:] - query_start[:-1]).long()
    req = torch.repeat_interleave(torch.arange(len(counts), device=q.device), counts)
    mask = tree_mask.to(torch.int8).contiguous()
    table = block_table.contiguous()
    _tree_attention_kernel[(t, heads)](
        q, k_cache, v_cache, out, table, context_lens.to(torch.int64).contiguous(),
        query_start.to(torch.int64).contiguous(), mask, req.to(torch.int32), float(scale),
        d, mask.shape[1],
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        table.stride(0), mask.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // k_cache.shape[2], BLOCK_SIZE=k_cache.shape[1],
        BLOCK_N=BLOCK_N, BLOCK_D=triton.next_power_of_2(d),
    )
    return out
