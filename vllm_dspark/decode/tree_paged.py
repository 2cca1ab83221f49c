"""A draft tree's verification pass over a paged KV cache: its inputs, and what it commits.

This is what an engine's runner does around the target's forward when it verifies a
tree instead of a chain (vLLM's V2 runner prepares the same fields for a chain):

1. ``tree_pass_inputs``: request r's query rows are [root, node 0 .. node a_r - 1] (the
   first ``admitted`` nodes in tree order, so every admitted node's parent is admitted
   too). Row j goes to cache slot ``num_computed + j`` through the block table, as a
   chain's would; only its RoPE position follows the node's depth
   (``decode.tree_attention.tree_positions``). The tree mask lets a row see the
   context, its ancestors and itself (``kernels.tree_attention`` reads it).
2. The target's forward writes each row's K/V to its slot and attends with the tree
   mask; its logits go to the acceptance walk (``kernels.tree_accept``).
3. ``commit_tree``: the root and the accepted path become context. Their K/V move to
   slots ``num_computed + 0, 1, ..`` (``kernels.kv_compact``), ``num_computed`` grows
   by 1 + accepted, and the bonus token is the next root. The rows left behind past the
   new end are overwritten by the next pass.

Plain torch over the kernels' dispatchers (Triton on a GPU or under the interpreter,
the torch references otherwise); ``tests/decode/test_tree_paged.py`` decodes a small
paged transformer this way and gets its greedy output exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_dspark.decode.tree_attention import ancestor_mask, tree_positions
from vllm_dspark.decode.tree_verify import TreeVerdict, kept_rows
from vllm_dspark.kernels.kv_compact import compact_kv_layers


@dataclass
class TreePass:
    input_ids: torch.Tensor  # [T] int64: every request's rows, packed
    positions: torch.Tensor  # [T] int64: RoPE positions (num_computed + depth)
    slots: torch.Tensor  # [T] int64: cache slot of each row (block * block_size + offset)
    query_start: torch.Tensor  # [R+1] int64: request r's rows are query_start[r]..[r+1]
    context_lens: torch.Tensor  # [R] int64: tokens already in the cache (num_computed)
    tree_mask: torch.Tensor  # [R, N+1, N+1] bool: row may attend to column


def tree_pass_inputs(roots: torch.Tensor,  # [R] the tokens to verify from (not cached yet)
                     tokens: torch.Tensor,  # [R, N] the tree's node tokens
                     parents: torch.Tensor,  # [R, N] -1 = the root
                     depth: torch.Tensor,  # [R, N] 1.. for nodes in use
                     admitted: torch.Tensor,  # [R] nodes verified (a prefix in tree order)
                     num_computed: torch.Tensor,  # [R] tokens in the cache
                     block_table: torch.Tensor,  # [R, B] cache blocks of each request
                     block_size: int) -> TreePass:
    r, n = tokens.shape
    dev = tokens.device
    rows = admitted.long() + 1
    j = torch.arange(n + 1, device=dev)
    live = j[None, :] < rows[:, None]  # [R, N+1]
    ids = torch.cat([roots.long()[:, None], tokens.long()], 1)
    pos = tree_positions(depth, num_computed)
    cache_pos = num_computed.long()[:, None] + j[None, :]
    blocks = block_table.long().gather(1, (cache_pos // block_size).clamp(
        max=block_table.shape[1] - 1))
    slots = blocks * block_size + cache_pos % block_size
    start = torch.zeros(r + 1, dtype=torch.long, device=dev)
    start[1:] = rows.cumsum(0)
    return TreePass(ids[live], pos[live], slots[live], start, num_computed.long(),
                    ancestor_mask(parents))


def commit_tree(verdict: TreeVerdict, num_computed: torch.Tensor, k_caches, v_caches,
                block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """After the walk: compact every layer's K/V (the root and the accepted path into
    contiguous slots) and return (the new num_computed, the next roots = the bonus)."""
    kept = kept_rows(verdict)
    num_kept = verdict.num_accepted + 1
    compact_kv_layers(list(zip(k_caches, v_caches)), block_table, num_computed.long(),
                      kept.clamp(min=0), num_kept)  # every layer in one launch
    bonus = verdict.tokens.gather(1, verdict.num_accepted[:, None]).squeeze(1)
    return num_computed.long() + num_kept, bonus
