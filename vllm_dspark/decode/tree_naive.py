"""Best-first tree drafting, one request at a time: the readable reference of ``tree.py``.

A heap of candidate children keyed by the global node order (survival descending, then
depth, then parent's rank, then child rank). Popping a candidate makes it the next
node and pushes its children. Every child ranks after its parent (survival ≤ the
parent's, depth + 1), so the pops come out in the global order: the first N pops are
the N best nodes the branching rule reaches, the tree ``tree.draft_tree`` builds level
by level. The branching rule itself (``tree.children``) is shared.
"""

from __future__ import annotations

import heapq

import torch

from vllm_dspark.decode.draft import GREEDY_EPS, position_confidence, sts_per_position
from vllm_dspark.decode.tree import DraftTree, TreeSpec, children, without_earlier_siblings
from vllm_dspark.model.confidence_head import ConfidenceHead
from vllm_dspark.model.markov_head import MarkovHead


@torch.no_grad()
def draft_tree_naive(
    base_logits: torch.Tensor,  # [γ, V]
    hidden: torch.Tensor,  # [γ, H]
    anchor_id: int,
    temperature: float | None,  # None or < GREEDY_EPS: greedy
    markov_head: MarkovHead | None,
    confidence_head: ConfidenceHead | None,
    sts_temperatures: list[float] | None,
    spec: TreeSpec,
    generator: torch.Generator | None = None,
) -> DraftTree:  # one request: R = 1
    gamma, v = base_logits.shape
    stochastic = temperature is not None and temperature >= GREEDY_EPS
    temp = torch.tensor(temperature if stochastic else 1.0, dtype=torch.float32)
    sample = torch.tensor(stochastic and spec.sample_children)
    sts = sts_per_position(sts_temperatures, gamma)
    nodes, heap = [], []

    def expand(rank: int, token: int, state, survival: float, depth: int) -> None:
        """Push the children of the node at ``rank`` (-1: the root) at depth + 1."""
        if depth == gamma:
            return
        prev, h = torch.tensor(token), hidden[depth]
        logits = base_logits[depth].float()
        if markov_head is not None:
            bias, state = markov_head.step(prev, h, state)
            logits = logits + bias.float()
        c = (position_confidence(confidence_head, markov_head, h, prev, sts[depth])
             if confidence_head is not None else None)
        tokens, e, valid, q = children(logits, temp, c, sample, spec, generator)
        for j in range(tokens.shape[0]):
            if valid[j]:
                s = survival * float(e[j])
                qj = without_earlier_siblings(q, tokens, j) if bool(sample) else q
                payload = (int(tokens[j]), float(e[j]), s, qj, state)
                heapq.heappush(heap, (-s, depth + 1, rank, j, payload))

    init = markov_head.init_state((), hidden) if markov_head is not None else None
    expand(-1, int(anchor_id), init, 1.0, 0)
    while heap and len(nodes) < spec.budget:
        _, depth, parent, j, (token, e, s, q, state) = heapq.heappop(heap)
        nodes.append((token, parent, depth, j, e, s, q))
        expand(len(nodes) - 1, token, state, s, depth)
    return _as_tree(nodes, spec.budget, v, stochastic, bool(sample))


def _as_tree(nodes, n: int, v: int, stochastic: bool, sampled: bool) -> DraftTree:
    pad = n - len(nodes)
    col = lambda i, fill, dtype: torch.tensor(  # noqa: E731
        [[x[i] for x in nodes] + [fill] * pad], dtype=dtype)
    probs = None
    if stochastic:
        probs = torch.zeros(1, n, v, dtype=torch.float32)
        for i, node in enumerate(nodes):
            probs[0, i] = node[6]
    return DraftTree(
        tokens=col(0, 0, torch.long), parents=col(1, -1, torch.long),
        depth=col(2, 0, torch.long), sibling=col(3, 0, torch.long),
        confidence=col(4, 0.0, torch.float32), survival=col(5, 0.0, torch.float64),
        count=torch.tensor([len(nodes)]), probs=probs, sampled=sampled,
    )
