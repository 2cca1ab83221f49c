"""KV compaction after tree verification as a Triton kernel (``ref.py`` is the spec).

One program per (request, KV head, layer): it walks the kept rows in path order and
copies each row's K and V vectors (head_dim wide) from position ``ctx + kept[i]`` to
``ctx + i`` through the block table. The order inside a program is what keeps it
correct (k_i ≥ i: a row is read before any copy overwrites it); requests, heads and
layers touch disjoint slots, so programs run in parallel.

Every target layer of a step shares the block table, lengths and kept rows, and its
caches have one shape, dtype and layout, so all layers go in one launch: the kernel
gets the first layer's K cache as its base and each layer's K and V as element
offsets from it (``layer_offsets``, built once: vLLM's caches stay the same tensors
from step to step). A launch per layer cost the tree step 30 host launches (SmolLM2).
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
        base_ptr, offsets_ptr, table_ptr, ctx_ptr, kept_ptr, num_ptr, D,
        stride_b, stride_s, stride_h, stride_tr, stride_kr,
        BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        layer = tl.program_id(2).to(tl.int64)
        k_ptr = base_ptr + tl.load(offsets_ptr + 2 * layer)
        v_ptr = base_ptr + tl.load(offsets_ptr + 2 * layer + 1)
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


def layer_offsets(kv_views: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """[L, 2] int64 on the caches' device: each layer's K and V as element offsets from
    the first layer's K (the kernel's base). The views must share shape, strides, dtype
    and device; an address gap that is not a whole number of elements is refused."""
    if not kv_views:
        raise ValueError("kv compaction needs at least one layer's (K, V) caches")
    k0 = kv_views[0][0]
    size, base = k0.element_size(), k0.data_ptr()
    offsets = []
    for i, (k, v) in enumerate(kv_views):
        for t in (k, v):
            if (t.shape != k0.shape or t.stride() != k0.stride() or t.dtype != k0.dtype
                    or t.device != k0.device):
                raise ValueError(
                    f"kv compaction: layer {i}'s caches differ from layer 0's in shape, "
                    "strides, dtype or device; compact such layers in separate calls")
            gap = t.data_ptr() - base
            if gap % size:
                raise ValueError(f"kv compaction: layer {i}'s cache is not element-aligned "
                                 "with layer 0's")
            offsets.append(gap // size)
    if k0.stride(-1) != 1:
        raise ValueError("compact_kv_triton needs k/v caches with head_dim contiguous "
                         "(vLLM's layout)")
    return torch.tensor(offsets, dtype=torch.int64).view(-1, 2).to(k0.device)


@torch.no_grad()
def compact_kv_layers_triton(kv_views, block_table, context_lens, kept, num_kept,
                             offsets: torch.Tensor | None = None,
                             check: bool = True) -> None:
    """``ref.compact_kv_ref`` on every layer's (K, V) of ``kv_views``, in one launch.
    ``offsets``: ``layer_offsets(kv_views)``, kept by a caller that compacts the same
    caches every step (building it copies to the device). ``check=False`` skips the
    input checks, which read values back to the host."""
    if check:
        check_inputs(kv_views[0][0], kv_views[0][1], block_table, context_lens, kept,
                     num_kept)
    if offsets is None:
        offsets = layer_offsets(kv_views)
    r = block_table.shape[0]
    if r == 0:
        return
    k0 = kv_views[0][0]
    table, kept = block_table.contiguous(), kept.to(torch.int64).contiguous()
    _compact_kv_kernel[(r, k0.shape[2], offsets.shape[0])](
        k0, offsets, table, context_lens.to(torch.int64).contiguous(), kept,
        num_kept.to(torch.int64).contiguous(), k0.shape[3],
        k0.stride(0), k0.stride(1), k0.stride(2), table.stride(0),
        kept.stride(0), BLOCK_SIZE=k0.shape[1],
        BLOCK_D=triton.next_power_of_2(k0.shape[3]),
    )


def compact_kv_triton(k_cache, v_cache, block_table, context_lens, kept, num_kept,
                      check: bool = True) -> None:
    """Same contract as ``ref.compact_kv_ref`` (in place), one layer."""
    if k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("compact_kv_triton needs k/v caches of one layout, head_dim "
                         "contiguous (vLLM's)")
    compact_kv_layers_triton([(k_cache, v_cache)], block_table, context_lens, kept,
                             num_kept, check=check)
