"""Tree attention over a paged KV cache: the torch reference (the spec and the CPU path).

One verification pass of a draft tree (``decode.tree_attention``): request r's query
is its root and nodes, rows 0..n_r, whose K/V vLLM has already written into the
request's cache slots ``context_lens[r] + row`` (a step writes its K/V before its
attention). Row i attends to every cached context token (positions < context_lens[r])
and to the query rows j with ``tree_mask[r, i, j]`` (itself, its ancestors, the root),
never to other branches. The cache is vLLM's paged layout: ``[blocks, block_size,
kv_heads, head_dim]``, token p of request r in block ``block_table[r, p // block_size]``
at offset ``p % block_size``. Grouped-query attention: query head h reads KV head
``h // (heads / kv_heads)``.
"""

from __future__ import annotations

import torch


def check_inputs(q, k_cache, v_cache, block_table, context_lens, query_start, tree_mask):
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("tree attention expects q [T, H, D] and k/v caches "
                         "[blocks, block_size, kv_heads, D] of one shape")
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not fit the cache {tuple(k_cache.shape)}: "
                         "same head_dim, heads a multiple of kv_heads")
    r = block_table.shape[0]
    if context_lens.shape != (r,) or query_start.shape != (r + 1,) or tree_mask.dim() != 3 \
            or tree_mask.shape[0] != r or tree_mask.shape[1] != tree_mask.shape[2]:
        raise ValueError("need context_lens [R], query_start [R+1] and tree_mask [R, M, M] "
                         "for a block_table of R rows")
    if r:
        counts = (query_start[1:] - query_start[:-1]).long()
        need = -(-(context_lens.long() + counts) // k_cache.shape[1])
        # One read-back for every value checked (each costs a host sync on a GPU).
        lo, hi, end, widest = torch.stack([counts.min(), counts.max(),
                                           query_start[-1].long(), need.max()]).tolist()
    else:  # no request: only the end of query_start to check
        lo, hi, end, widest = 1, 1, int(query_start[-1]), 0
    if lo < 1 or hi > tree_mask.shape[1]:
        raise ValueError("every request needs 1..M query rows (root + nodes) for a "
                         "tree_mask of M rows")
    if end != q.shape[0]:
        raise ValueError(f"query_start ends at {end}, q has {q.shape[0]} rows")
    if widest > block_table.shape[1]:
        raise ValueError("block_table has too few columns for context + query tokens")


@torch.no_grad()
def tree_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       block_table: torch.Tensor, context_lens: torch.Tensor,
                       query_start: torch.Tensor, tree_mask: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """[T, H, D] attention outputs (module doc), in q's dtype; float32 inside."""
    check_inputs(q, k_cache, v_cache, block_table, context_lens, query_start, tree_mask)
    out = torch.empty_like(q)
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    bs = k_cache.shape[1]
    for r in range(block_table.shape[0]):
        lo, hi = int(query_start[r]), int(query_start[r + 1])
        ctx, nq = int(context_lens[r]), hi - lo
        pos = torch.arange(ctx + nq, device=q.device)
        blocks = block_table[r, pos // bs].long()
        k = k_cache[blocks, pos % bs].float()  # [L, kv_heads, D]
        v = v_cache[blocks, pos % bs].float()
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        allowed = torch.ones(nq, ctx + nq, dtype=torch.bool, device=q.device)
        allowed[:, ctx:] = tree_mask[r, :nq, :nq]
        s = torch.einsum("qhd,khd->hqk", q[lo:hi].float(), k) * scale
        s = s.masked_fill(~allowed, float("-inf"))
        out[lo:hi] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(q.dtype)
    return out
