"""Tree attention over a paged KV cache as a Triton kernel (``ref.py`` is the spec).

One program per (request, KV head, tile of query rows): the tile holds ``BLOCK_Q``
(query row, grouped head) pairs of one request — every query head that reads this KV
head — so each K/V tile is loaded once for all of them and scored with ``tl.dot``, as
FlashAttention does. (The first version ran one program per query row and head; on an
H200 it was 5–90× slower than vLLM's FlashAttention, ``benchmarks/README.md``.) The keys
come in two phases: the cached context, in tiles of ``BLOCK_N`` positions read through
the block table, always visible; then the tree's own rows (positions ctx + j, j < M) in
one tile of ``BLOCK_T``, visible where the request's ``tree_mask`` row allows. With few
requests that grid is a handful of programs on a GPU of 132 SMs (R = 1, 3 KV heads: 3),
so the context is split as flash-decoding does: ``splits`` programs per tile each take a
slice of the context (the last one also the tree rows) and write their unnormalised
partial softmax to a float32 workspace, which ``_combine_kernel`` merges. Online
softmax in float32; the running max starts finite, so a tile that the mask empties adds
nothing instead of a NaN. float32 inputs are multiplied in IEEE precision (no TF32), so
the kernel matches the reference to float32 rounding.
"""

from __future__ import annotations

import torch

from vllm_dspark.kernels.tree_attention.ref import check_inputs

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch reference still works
    triton = None

BLOCK_N = 64  # context key positions per tile
MAX_BLOCK_Q = 64  # (query row, grouped head) pairs per program
# Context splits (auto): enough programs to occupy a large GPU, at most MAX_SPLITS, and
# at least MIN_SPLIT_TILES context tiles per split. Measured on an H200 (2026-12-04,
# benchmarks/README.md): with one split per ≤ 2 tiles, 1–8 requests and contexts of 512
# and 2048, the split kernel plus its combine took 0.95–1.52× the single pass (the
# combine's launch and workspace traffic outweigh the idle SMs at ~0.1 ms a call), so a
# context of 32 tiles (2048 positions) still runs in one pass; longer ones split.
TARGET_PROGRAMS = 256
MAX_SPLITS = 16
MIN_SPLIT_TILES = 32


def auto_splits(programs: int, ctx_tiles: int) -> int:
    """Context splits for a grid of ``programs`` (request, KV head, query tile) and a
    block table of ``ctx_tiles`` context tiles, from the shapes alone (graph-safe)."""
    return max(1, min(MAX_SPLITS, -(-TARGET_PROGRAMS // programs), ctx_tiles // MIN_SPLIT_TILES))

if triton is not None:

    @triton.jit
    def _online_update(q, k, v, allowed, m_i, l_i, acc, scale, PRECISION: tl.constexpr,
                       UPCAST: tl.constexpr):
        """One key tile into the running softmax of every query row of the tile."""
        if UPCAST:  # the interpreter's dot mis-reads 16-bit floats: multiply in float32
            q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_Q, keys]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        return m_new, l_i, acc

    @triton.jit
    def _kv_tile(k_ptr, v_ptr, row_table_ptr, pos, valid, kvh, offs_d, dmask,
                 stride_kb, stride_ks, stride_kh, BLOCK_SIZE: tl.constexpr):
        """K and V [keys, BLOCK_D] of one request's cache positions, through its blocks."""
        block = tl.load(row_table_ptr + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        base = block * stride_kb + (pos % BLOCK_SIZE) * stride_ks + kvh * stride_kh
        kv_mask = valid[:, None] & dmask[None, :]
        k = tl.load(k_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + base[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        return k, v

    @triton.jit
    def _tree_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, ctx_ptr, start_ptr, mask_ptr,
        scale, D, M,
        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_tr, stride_mr,
        stride_ot, stride_oh,
        GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        m_ws_ptr, l_ws_ptr, acc_ws_ptr, T, H, SPLITS: tl.constexpr,
    ):
        r = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        tile = tl.program_id(2).to(tl.int64) // SPLITS
        split = tl.program_id(2) % SPLITS
        lo = tl.load(start_ptr + r)
        nq = tl.load(start_ptr + r + 1) - lo
        ctx = tl.load(ctx_ptr + r)
        flat = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (row, head in group) pairs
        row = flat // GROUP
        head = kvh * GROUP + flat % GROUP
        q_ok = row < nq
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        q = tl.load(q_ptr + (lo + row)[:, None] * stride_qt + head[:, None] * stride_qh
                    + offs_d[None, :], mask=q_ok[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
        l_i = tl.zeros([BLOCK_Q], tl.float32)
        acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
        # The cached context, this split's slice of it (whole tiles): visible to every row.
        chunk = tl.cdiv(tl.cdiv(ctx, SPLITS), BLOCK_N) * BLOCK_N
        begin = split * chunk
        end = tl.minimum(begin + chunk, ctx)
        for j0 in range(begin, end, BLOCK_N):
            pos = j0 + tl.arange(0, BLOCK_N)
            valid = pos < end
            k, v = _kv_tile(k_ptr, v_ptr, table_ptr + r * stride_tr, pos, valid, kvh, offs_d,
                            dmask, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
            m_i, l_i, acc = _online_update(q, k, v, valid[None, :], m_i, l_i, acc, scale,
                                           PRECISION, UPCAST)
        # The tree's own rows (the last split's): a node sees itself, its ancestors, the root.
        col = tl.arange(0, BLOCK_T)
        valid = col < tl.where(split == SPLITS - 1, nq, 0)
        pos = ctx + col
        k, v = _kv_tile(k_ptr, v_ptr, table_ptr + r * stride_tr, pos, valid, kvh, offs_d,
                        dmask, stride_kb, stride_ks, stride_kh, BLOCK_SIZE)
        pair_ok = q_ok[:, None] & valid[None, :]
        tree = tl.load(mask_ptr + r * stride_mr + row[:, None] * M + col[None, :],
                       mask=pair_ok, other=0)
        m_i, l_i, acc = _online_update(q, k, v, pair_ok & (tree != 0), m_i, l_i, acc, scale,
                                       PRECISION, UPCAST)
        if SPLITS == 1:
            out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(out_ptr + (lo + row)[:, None] * stride_ot + head[:, None] * stride_oh
                     + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=q_ok[:, None] & dmask[None, :])
        else:  # the partial softmax of this split, merged by _combine_kernel
            at = (split * T + lo + row) * H + head  # [SPLITS, T, H] flat
            tl.store(m_ws_ptr + at, m_i, mask=q_ok)
            tl.store(l_ws_ptr + at, l_i, mask=q_ok)
            tl.store(acc_ws_ptr + at[:, None] * D + offs_d[None, :], acc,
                     mask=q_ok[:, None] & dmask[None, :])

    @triton.jit
    def _combine_kernel(m_ws_ptr, l_ws_ptr, acc_ws_ptr, out_ptr, T, H, D, stride_ot,
                        stride_oh, SPLITS: tl.constexpr, BLOCK_S: tl.constexpr,
                        BLOCK_D: tl.constexpr):
        """out[t, h] = Σ_s e^{m_s − m} acc_s / Σ_s e^{m_s − m} l_s over the splits."""
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_ok = offs_s < SPLITS
        at = (offs_s * T + t) * H + h
        m_s = tl.load(m_ws_ptr + at, mask=s_ok, other=-1.0e30)
        l_s = tl.load(l_ws_ptr + at, mask=s_ok, other=0.0)
        acc = tl.load(acc_ws_ptr + at[:, None] * D + offs_d[None, :],
                      mask=s_ok[:, None] & (offs_d < D)[None, :], other=0.0)
        w = tl.exp(m_s - tl.max(m_s, axis=0))  # an empty split: m_s = -1e30, w = 0
        den = tl.sum(w * l_s, axis=0)
        out = tl.sum(w[:, None] * acc, axis=0) / tl.where(den > 0, den, 1.0)
        tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, out.to(
            out_ptr.dtype.element_ty), mask=offs_d < D)


def _interpreted() -> bool:
    return type(_tree_attention_kernel).__name__ == "InterpretedFunction"


def available(device: torch.device) -> bool:
    """Whether the kernel can run for tensors on ``device`` (a GPU, or the interpreter)."""
    if triton is None:
        return False
    return _interpreted() or device.type == "cuda"


@torch.no_grad()
def tree_attention_triton(q, k_cache, v_cache, block_table, context_lens, query_start,
                          tree_mask, scale: float, check: bool = True,
                          splits: int | None = None) -> torch.Tensor:
    """Same contract as ``ref.tree_attention_ref``. ``check=False`` skips the input
    checks, which read a few values back to the host (an engine's graphed path).
    ``splits``: context slices per (request, KV head, tile); None picks it from the
    shapes alone (no value read back), 1 is the single-pass kernel."""
    if check:
        check_inputs(q, k_cache, v_cache, block_table, context_lens, query_start, tree_mask)
    out = torch.empty_like(q)
    t, heads, d = q.shape
    if t == 0:
        return out
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        q, k_cache, v_cache = q.contiguous(), k_cache.contiguous(), v_cache.contiguous()
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    m = tree_mask.shape[1]
    mask = tree_mask if tree_mask.dtype == torch.int8 else tree_mask.to(torch.int8)
    mask = mask.contiguous()
    table = block_table.contiguous()
    block_q = max(16, min(MAX_BLOCK_Q, triton.next_power_of_2(m * group)))
    tiles = triton.cdiv(m * group, block_q)
    block_d = max(16, triton.next_power_of_2(d))
    if splits is None:
        splits = auto_splits(table.shape[0] * kv_heads * tiles,
                             triton.cdiv(table.shape[1] * k_cache.shape[1], BLOCK_N))
    if splits < 1:
        raise ValueError(f"splits must be at least 1, got {splits}")
    if splits > 1:
        m_ws = torch.empty(splits, t, heads, dtype=torch.float32, device=q.device)
        l_ws = torch.empty_like(m_ws)
        acc_ws = torch.empty(splits, t, heads, d, dtype=torch.float32, device=q.device)
    else:
        m_ws = l_ws = acc_ws = out  # not read
    grid = (table.shape[0], kv_heads, tiles * splits)
    _tree_attention_kernel[grid](
        q, k_cache, v_cache, out, table, context_lens.to(torch.int64).contiguous(),
        query_start.to(torch.int64).contiguous(), mask, float(scale), d, m,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        table.stride(0), mask.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_SIZE=k_cache.shape[1], BLOCK_Q=block_q, BLOCK_N=BLOCK_N,
        BLOCK_T=max(16, triton.next_power_of_2(m)), BLOCK_D=block_d,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        UPCAST=_interpreted() and q.dtype != torch.float32,
        m_ws_ptr=m_ws, l_ws_ptr=l_ws, acc_ws_ptr=acc_ws, T=t, H=heads, SPLITS=splits,
    )
    if splits > 1:
        _combine_kernel[(t, heads)](
            m_ws, l_ws, acc_ws, out, t, heads, d, out.stride(0), out.stride(1),
            SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d)
    return out
