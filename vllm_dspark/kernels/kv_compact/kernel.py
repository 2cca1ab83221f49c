"""KV compaction after tree verification as a Triton kernel (``ref.py`` is the spec).

One program per (request, KV head): it walks the kept rows in path order and copies
each row's K and V vectors (head_dim wide) from position ``ctx + kept[i]`` to ``ctx +
i`` through the block table. The order inside a program is what keeps it correct
(k_i ≥ i: a row is read before any copy overwrites it); requests and heads touch
disjoint slots, so programs run in parallel.
"""

from __future__ import annotations

import torch

from vllm_dspark.kernels.kv_compact.ref import check_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

if triton is not None:

    @triton.jit
    def _compact_kv_kernel(
        k_ptr, v_ptr, table_ptr, ctx_ptr, kept_ptr, num_ptr, D,
        stride_b, stride_s, stride_h, stride_tr, stride_kr,
        BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        ctx = tl.load(ctx_ptr + r)
        num = tl.load(num_ptr + r)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        for i in range(0, num):
            src = ctx + tl.load(kept_ptr + r * stride_kr + i)
            dst = ctx + i
            sb = tl.load(table_ptr + r * stride_tr + src // BLOCK_SIZE).to(tl.int64)
            db = tl.load(table_ptr + r * stride_tr + dst // BLOCK_SIZE).to(tl.int64)
            s_off = sb * stride_b + (src % BLOCK_SIZE) * stride_s + h * stride_h + offs_d
            d_off = db * stride_b + (dst % BLOCK_SIZE) * stride_s + h * stride_h + offs_d
            # src == dst (the root, a path of first children) copies a row onto itself
            tl.store(k_ptr + d_off, tl.load(k_ptr + s_off, mask=dmask), mask=dmask)
            tl.store(v_ptr + d_off, tl.load(v_ptr + s_off, mask=dmask), mask=dmask)


def available(device: torch.device) -> bool:
    """Whether the kernel can run for tensors on ``device`` (a GPU, or the interpreter)."""
    if triton is None:
        return False
    interpreted = type(_compact_kv_kernel).__name__ == "InterpretedFunction"
    return interpreted or device.type == "cuda"


@torch.no_grad()
def compact_kv_triton(k_cache, v_cache, block_table, context_lens, kept, num_kept,
                      check: bool = True) -> None:
    """Same contract as ``ref.compact_kv_ref`` (in place). ``check=False`` skips the
    input checks, which read values back to the host."""
    if check:
        check_inputs(k_cache, v_cache, block_table, context_lens, kept, num_kept)
    r = block_table.shape[0]
    if r == 0:
        return
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("compact_kv_triton needs k/v caches of one layout, head_dim "
                         "contiguous (vLLM's)")
    table, kept = block_table.contiguous(), kept.to(torch.int64).contiguous()
    _compact_kv_kernel[(r, k_cache.shape[2])](
        k_cache, v_cache, table, context_lens.to(torch.int64).contiguous(), kept,
        num_kept.to(torch.int64).contiguous(), k_cache.shape[3],
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), table.stride(0),
        kept.stride(0), BLOCK_SIZE=k_cache.shape[1],
        BLOCK_D=triton.next_power_of_2(k_cache.shape[3]),
    )
