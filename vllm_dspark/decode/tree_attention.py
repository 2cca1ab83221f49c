"""What the target needs to verify a draft tree in one forward pass: masks and positions.

The query of one request is [root, node 0, ..., node N-1]: the root is the token the
target emitted last (the anchor, not yet in the KV cache) and nodes follow in the tree's
order. Row/column 0 is the root, 1 + i is node i. A node attends to the whole context,
to its ancestors and to itself, never to other branches, and sits at RoPE position
``num_computed + depth`` (the root at ``num_computed``). Each node's logits are then
exactly those of the chain context + root + its path (``tests/decode`` checks it on an
HF Qwen3), so its row predicts its children.
"""

from __future__ import annotations

import torch


def ancestor_mask(parents: torch.Tensor) -> torch.Tensor:
    """[R, N] parents (-1 = root; an earlier node otherwise) -> [R, N+1, N+1] bool,
    True where row may attend to column: itself, its ancestors and the root. Padding
    nodes (parent -1) see the root and themselves. One step per level of the deepest
    possible tree (N), fixed shapes and no host sync: the engine builds it every step,
    and a CUDA graph can hold it."""
    r, n = parents.shape
    dev = parents.device
    mask = torch.eye(n + 1, dtype=torch.bool, device=dev).expand(r, -1, -1).clone()
    mask[:, :, 0] = True  # everyone sees the root
    nodes = mask[:, 1:, :]  # node i's row is 1 + i (a view: written in place)
    up = parents.long()  # walk each node's ancestors, one level per step
    for _ in range(n):
        hit = up >= 0
        # Column 1 + ancestor; a finished walk writes the root's column, already True.
        nodes.scatter_(2, torch.where(hit, up + 1, 0)[..., None], True)
        up = torch.where(hit, parents.gather(1, up.clamp(min=0)), -1)
    return mask


def tree_positions(depth: torch.Tensor, num_computed: torch.Tensor) -> torch.Tensor:
    """[R, N] node depths, [R] tokens already in the cache -> [R, N+1] RoPE positions
    (root first). Slots in the KV cache stay per row (num_computed + row); only RoPE
    follows depth, so an accepted node's K equals the chain's after compaction."""
    zero = torch.zeros_like(depth[:, :1])
    return num_computed.long()[:, None] + torch.cat([zero, depth.long()], 1)


def attention_mask_with_context(
    parents: torch.Tensor,  # [R, N]
    context_len: int,  # C: tokens before the root, all visible
) -> torch.Tensor:  # [R, N+1, C+N+1] bool
    """The tree rows' mask over [context, root, nodes] for a dense attention."""
    anc = ancestor_mask(parents)
    r, q, _ = anc.shape
    ctx = torch.ones(r, q, context_len, dtype=torch.bool, device=anc.device)
    return torch.cat([ctx, anc], 2)
