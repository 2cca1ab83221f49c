"""Algorithm 1 over draft-tree nodes (issue 17): how many of each request's nodes to verify.

A tree node's survival a_i = ∏ e along its path (``decode.tree``) estimates the chance
that verification accepts it, and siblings exclude each other, so the expected tokens
of a round are still Σ_r (1 + Σ_{admitted i} a_{r,i}) and the verified batch is
B = Σ_r (1 + ℓ_r) (the root row plus ℓ_r nodes): the chain's Θ = τ·SPS(B) with B
counting verified nodes. Nodes are stored by survival descending, parents first on
ties, so every row is nonincreasing and Algorithm 1's stably sorted path admits a prefix
of each row, which is a subtree (ancestor-closed). Its causal early stop keeps it
lossless as for the chain: node i is admitted only on the candidates ranked above it.

The chain is the case of one child per node: a = cumprod(c), ``causal_schedule``'s.
"""

from __future__ import annotations

import torch

from vllm_dspark.schedule.prefix import Schedule, SPSLike, causal_schedule_from_survival


def tree_schedule(node_survival: torch.Tensor, sps: SPSLike) -> Schedule:
    """``node_survival`` [R, N] (``DraftTree.survival``; padding 0) -> per-request node
    counts ``lengths`` [R]: verify nodes 0..ℓ_r-1 of row r. NaN → 0, clamped to [0, 1]."""
    a = node_survival.to(torch.float64).nan_to_num(0.0).clamp(0.0, 1.0)
    return causal_schedule_from_survival(a, sps)


def admitted_nodes(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """[R] prefix lengths -> [R, N] bool, True on the admitted nodes."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]
