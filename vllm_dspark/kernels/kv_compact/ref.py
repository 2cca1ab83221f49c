"""After a tree's verification: the kept rows' K/V into the request's contiguous slots.

The target's pass over a draft tree wrote row j's K/V (0 = root, 1 + i = node i) at
the request's cache position ``context_lens[r] + j``. Of those rows only the root and
the accepted path become context (``decode.tree_verify.kept_rows``: rows k_0 = 0 < k_1
< ... in path order), and the next step expects them at ``context_lens[r] + 0, 1, ...``.
So position ``ctx + i`` receives row ``kept[r, i]``'s K/V, for i < ``num_kept[r]``. As
kept rows only grow (k_i ≥ i), copying in order of i never reads a slot already
overwritten; the positions past the kept ones are left as they are (the next step
overwrites them). Paged layout as in ``kernels.tree_attention``: ``[blocks,
block_size, kv_heads, head_dim]`` through the request's block table.
"""

from __future__ import annotations

import torch


def check_inputs(k_cache, v_cache, block_table, context_lens, kept, num_kept):
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError("kv compaction expects k/v caches [blocks, block_size, kv_heads, D] "
                         "of one shape")
    r = block_table.shape[0]
    if context_lens.shape != (r,) or num_kept.shape != (r,) or kept.dim() != 2 \
            or kept.shape[0] != r:
        raise ValueError("need context_lens [R], kept [R, N+1] and num_kept [R] for a "
                         "block_table of R rows")
    if r == 0:
        return
    live = torch.arange(kept.shape[1], device=kept.device)[None, :] < num_kept[:, None]
    steps = torch.arange(kept.shape[1], device=kept.device).expand_as(kept)
    last = torch.where(live, kept, -1).amax(1).clamp(min=0)
    need = -(-(context_lens + last + 1) // k_cache.shape[1])
    # One read-back for every value checked (each costs a host sync on a GPU).
    lo, hi, unordered, widest = torch.stack([
        num_kept.min().long(), num_kept.max().long(), (live & (kept < steps)).any().long(),
        need.max().long()]).tolist()
    if lo < 0 or hi > kept.shape[1]:
        raise ValueError("num_kept must lie in 0..N+1")
    if unordered:
        raise ValueError("kept rows must be in path order with kept[r, i] >= i (the root, "
                         "then the accepted nodes' rows)")
    if widest > block_table.shape[1]:
        raise ValueError("block_table has too few columns for the tree's rows")


@torch.no_grad()
def compact_kv_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   context_lens: torch.Tensor, kept: torch.Tensor,
                   num_kept: torch.Tensor) -> None:
    """In place (module doc)."""
    check_inputs(k_cache, v_cache, block_table, context_lens, kept, num_kept)
    bs = k_cache.shape[1]
    for r in range(block_table.shape[0]):
        ctx = int(context_lens[r])
        for i in range(int(num_kept[r])):
            src, dst = ctx + int(kept[r, i]), ctx + i
            if src == dst:
                continue
            sb, db = int(block_table[r, src // bs]), int(block_table[r, dst // bs])
            k_cache[db, dst % bs] = k_cache[sb, src % bs]
            v_cache[db, dst % bs] = v_cache[sb, src % bs]
