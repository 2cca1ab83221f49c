"""The tree acceptance walk in torch, batched over requests: the kernel's specification.

At the current node (the root first) the target's token is x = argmax of the logits row
(greedy rows, T < GREEDY_EPS) or x = argmax(l/T + g) with Gumbel noise g (a draw from
softmax(l/T)); the walk descends to the admitted child whose token is x, else x is the
bonus and the walk ends. Exact for any tree at any temperature (``decode.tree_verify``
explains why), and the same draws as ``decode.tree_verify.verify_tree`` for trees
with deterministic children. One step per tree level, every request at once.
"""

from __future__ import annotations

import torch

from vllm_dspark.decode.draft import GREEDY_EPS
from vllm_dspark.decode.tree_verify import TreeVerdict, walk_draws


def check_inputs(logits, tokens, parents, admitted, temperature, gumbel) -> None:
    r, n = tokens.shape
    if logits.dim() != 3 or logits.shape[:2] != (r, n + 1):
        raise ValueError(f"logits must be [R, N+1, V] = [{r}, {n + 1}, V], got "
                         f"{tuple(logits.shape)}")
    if parents.shape != tokens.shape or admitted.shape != (r,) or temperature.shape != (r,):
        raise ValueError("parents [R, N], admitted [R] and temperature [R] must match tokens")
    if gumbel is not None and gumbel.shape != logits.shape:
        raise ValueError(f"gumbel must be shaped like logits, got {tuple(gumbel.shape)}")
    if gumbel is None and bool((temperature >= GREEDY_EPS).any()):
        raise ValueError("rows with T > 0 need gumbel noise")


@torch.no_grad()
def tree_accept_ref(
    logits: torch.Tensor,  # [R, N+1, V]: row 0 at the root, row 1 + i at node i
    tokens: torch.Tensor,  # [R, N] int64
    parents: torch.Tensor,  # [R, N] int64, -1 = root
    admitted: torch.Tensor,  # [R] int64: nodes 0..admitted-1 take part
    temperature: torch.Tensor,  # [R] float32; < GREEDY_EPS = greedy
    gumbel: torch.Tensor | None = None,  # [R, N+1, V] float32, for rows with T > 0
) -> TreeVerdict:
    check_inputs(logits, tokens, parents, admitted, temperature, gumbel)
    t = temperature.to(torch.float32)
    greedy = t < GREEDY_EPS
    t = torch.where(greedy, torch.ones_like(t), t)
    scores = logits.float()
    if gumbel is not None:
        scores = torch.where(greedy[:, None, None], scores, scores / t[:, None, None] + gumbel)
    # Every row's draw, then the walk: it reads only the rows on the walked path.
    return walk_draws(scores.argmax(-1), tokens, parents, admitted)
