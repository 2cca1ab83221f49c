"""A draft tree's verification step on vLLM's V2 runner, on V2's own buffers (issue 17;
vllm-internals §6.3). Plain torch, fixed shapes, no host sync: the runner's patches
call these around the target's forward.

V2 lays out a chain. Request b's query ends with its logits rows [root, d_1 .. d_K]
(``combine_sampled_and_draft_tokens`` splices the drafts in from
``req_states.draft_tokens``), positions run num_computed + i, the slot mapping is
computed from those positions, ``post_update`` advances num_computed by query length
minus ``num_rejected``, and the drafter reads the first 1 + accepted rows as context.
A tree keeps all of that and changes four things:

1. the drafts are the tree's nodes in tree order (parents first), so every admitted
   prefix is a subtree (``decode.tree``);
2. after the slot mapping, each node row's RoPE position becomes the root's + its
   depth (``set_tree_positions``). Slots stay per row;
3. the sampler is the acceptance walk (``kernels.tree_accept``): its path and bonus are
   V2's sampled tokens, num_sampled = 1 + accepted (``sampled_from_verdict``);
4. after the walk, the kept rows (root, then the accepted path) move to the front of
   the request's rows: their K/V to the contiguous slots (``compact_target_kv``), their
   hidden states to the first rows (``kept_rows_first``), and positions back to the
   chain's (``set_chain_positions``). ``post_update``, the scheduler's rollback by
   count and the drafter's context then see a chain of 1 + accepted tokens.

``tests/engine/test_v2_tree_step.py`` runs these between vLLM's own V2 input and
post-update kernels (under the Triton interpreter on CPU) and decodes a small paged
transformer with random trees to its exact greedy output.
"""

from __future__ import annotations

import torch

from vllm_dspark.decode.tree_verify import TreeVerdict, kept_rows
from vllm_dspark.kernels.kv_compact import compact_kv_layers
from vllm_dspark.kernels.tree_accept import walk_draws  # one launch on a GPU


def logits_owners(cu_num_logits: torch.Tensor, total_logits: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each of the step's ``total_logits`` logits rows: its batch row b and its index
    j within the request's logits (0 = the root)."""
    i = torch.arange(total_logits, device=cu_num_logits.device)
    cu = cu_num_logits.long()
    b = torch.searchsorted(cu[1:].contiguous(), i, right=True)
    return b, i - cu[b]


def logits_rows(query_start_loc: torch.Tensor, cu_num_logits: torch.Tensor,
                total_logits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``logits_owners`` (b, j), and each logits row's token row in the query: a
    request's logits rows are the last of its query."""
    b, j = logits_owners(cu_num_logits, total_logits)
    cu = cu_num_logits.long()
    row = query_start_loc.long()[b + 1] - (cu[b + 1] - cu[b]) + j
    return b, j, row


def set_tree_positions(positions: torch.Tensor, query_start_loc: torch.Tensor,
                       cu_num_logits: torch.Tensor, idx_mapping: torch.Tensor,
                       depth: torch.Tensor, total_logits: int, rows=None) -> None:
    """In place: node row j ≥ 1 of each request gets the root's position + the depth of
    node j - 1 (``depth`` [max_reqs, N] by request state, as ``draft_tokens``). Call
    after the slot mapping, which must keep the chain's per-row slots. ``rows``: this
    step's ``logits_rows`` where the caller keeps them (here and below)."""
    b, j, row = rows or logits_rows(query_start_loc, cu_num_logits, total_logits)
    node = j >= 1
    d = depth[idx_mapping.long()[b].clamp(min=0), (j - 1).clamp(min=0)]
    root = positions[row - j]
    positions[row] = torch.where(node, root + d.to(positions.dtype), positions[row])


def set_chain_positions(positions: torch.Tensor, query_start_loc: torch.Tensor,
                        cu_num_logits: torch.Tensor, total_logits: int, rows=None) -> None:
    """In place, after the forward: back to the chain's positions (root + j). The kept
    path is then where a chain would have been, positions included (node at depth i
    sits at row i after ``kept_rows_first``)."""
    b, j, row = rows or logits_rows(query_start_loc, cu_num_logits, total_logits)
    positions[row] = positions[row - j] + j.to(positions.dtype)


def kept_rows_first(tensors: list[torch.Tensor], query_start_loc: torch.Tensor,
                    cu_num_logits: torch.Tensor, verdict: TreeVerdict,
                    total_logits: int, rows=None) -> None:
    """In place on each [T, ...] tensor (hidden states, aux hidden states): request b's
    logits row j takes the row of its j-th kept tree row, for j < 1 + accepted. What V2's
    drafter reads as the accepted context is then the root and the path, in order."""
    b, j, row = rows or logits_rows(query_start_loc, cu_num_logits, total_logits)
    kept = kept_rows(verdict)  # [R, N+1], -1 after the path
    live = j < verdict.num_accepted[b] + 1
    src = torch.where(live, row - j + kept[b, j.clamp(max=kept.shape[1] - 1)].clamp(min=0),
                      row)
    for t in tensors:
        t[row] = t[src]  # the right side is gathered first: overlapping moves are safe


def sampled_from_verdict(verdict: TreeVerdict) -> tuple[torch.Tensor, torch.Tensor]:
    """V2's sampler output for tree rows: sampled tokens [R, N+1] (the path's tokens,
    then the bonus; only the first num_sampled are read) and num_sampled [R] int32."""
    return verdict.tokens.clamp(min=0), verdict.num_emitted.to(torch.int32)


def flash_attn_kv_views(kv_cache: torch.Tensor, head_size: int
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's K and V caches as views [blocks, block_size, kv_heads, head_dim] of
    vLLM 0.32's FlashAttention cache [blocks, kv_heads, block_size, 2·head_dim], split as
    its ``FlashAttentionImpl.forward`` splits it (strided views; our kernels take
    strides)."""
    k, v = kv_cache.transpose(1, 2).split(head_size, dim=-1)
    return k, v


def compact_target_kv(kv_views: list[tuple[torch.Tensor, torch.Tensor]],
                      block_table: torch.Tensor, context_lens: torch.Tensor,
                      verdict: TreeVerdict, offsets: torch.Tensor | None = None,
                      check: bool = True) -> None:
    """Each target layer's K/V of the kept rows into slots context_lens + 0, 1, ..
    (``kernels.kv_compact``), all layers in one launch. ``kv_views``: per layer (K, V)
    [blocks, block_size, kv_heads, head_dim] (``flash_attn_kv_views``); ``offsets``
    their ``layer_offsets`` where the caller keeps them; ``block_table``/``context_lens``
    by batch row; ``context_lens`` = num_computed before the step's update (the root's
    position). ``check`` reads the shared inputs back to the host once (a sync: the
    runner checks its first tree step only)."""
    kept = kept_rows(verdict).clamp(min=0)
    num_kept = verdict.num_accepted + 1
    compact_kv_layers(kv_views, block_table, context_lens.long(), kept, num_kept,
                      offsets=offsets, check=check)


def tree_sample(logits: torch.Tensor, cu_num_logits: torch.Tensor, idx_mapping: torch.Tensor,
                expanded_idx_mapping: torch.Tensor, pos: torch.Tensor,
                draft_tokens: torch.Tensor, parents: torch.Tensor, depth: torch.Tensor,
                draw) -> tuple[TreeVerdict, torch.Tensor, torch.Tensor]:
    """The rejection sampler's work for tree rows: (verdict, sampled [R, N+1],
    num_sampled [R]).

    ``logits`` [L, V]: the step's logits rows with the sampling parameters applied (V2's
    ``apply_sampling_params``), each request's last ``num_logits`` rows = [root, nodes];
    ``pos`` [L] their chain positions (the root's is its real one); ``draft_tokens``,
    ``parents``, ``depth`` [max_reqs, N] by request state. ``draw(logits, expanded_idx_
    mapping, pos)`` draws one token per row: V2's seeded Gumbel sampler (argmax on
    greedy rows). Each node row draws at the root's position + its depth, the position
    before the token it predicts, which is how a chain (and plain decoding) keys the
    draw of that token: the tokens a request emits are drawn as without speculation."""
    total = logits.shape[0]
    r = idx_mapping.shape[0]
    n = draft_tokens.shape[1]
    b, j = logits_owners(cu_num_logits, total)
    state = idx_mapping.long()[b].clamp(min=0)
    d = depth[state, (j - 1).clamp(min=0)]
    root_pos = pos[torch.arange(total, device=pos.device) - j]
    key = torch.where(j >= 1, root_pos + d.to(pos.dtype), pos)
    drawn = draw(logits, expanded_idx_mapping, key)  # [L]
    dense = torch.full((r, n + 1), -1, dtype=torch.long, device=logits.device)
    dense[b, j] = drawn.long()
    num_logits = (cu_num_logits[1:] - cu_num_logits[:-1]).long()
    states = idx_mapping.long().clamp(min=0)
    verdict = walk_draws(dense, draft_tokens[states], parents[states], num_logits - 1)
    sampled, num_sampled = sampled_from_verdict(verdict)
    return verdict, sampled, num_sampled
