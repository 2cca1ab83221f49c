"""The batch's draft-token budget from survival probabilities and step costs (numpy).

vLLM's V2 runner fixes each step's token count on the host, before the drafts being
verified exist on the host (async scheduling), from confidences one or two steps old;
the device then admits the budget's best current drafts (``engine/v2/budget.py``).
This module is the host's choice of that budget K, given the sorted survival scores
s_1 ≥ s_2 ≥ … of the schedulable draft slots and the cost of a step with k drafts:

    Θ_k = (n + Σ_{i≤k} s_i) / cost_k      (n: requests that emit a token anyway)

- ``causal``: Algorithm 1's rule, the first k whose next admission does not improve
  Θ (paper §3.2.2, lines 10-13);
- ``global``: the first argmax of Θ over all k (§5.2 and upstream vLLM's rule).

Either is lossless here: the scores are older than the drafts they budget for.
"""

from __future__ import annotations

import numpy as np

RULES = ("causal", "global")


def draft_budget(scores: np.ndarray, base_tokens: float, cost: np.ndarray,
                 rule: str = "causal") -> int:
    """K ∈ [0, len(scores)]: how many of the best draft slots to verify.

    ``scores``: survival products sorted descending; ``cost``: [len(scores) + 1] step
    cost (any unit) with k = 0..len(scores) drafts."""
    if rule not in RULES:
        raise ValueError(f"unknown budget rule {rule!r}; expected one of {RULES}")
    scores = np.asarray(scores, dtype=np.float64)
    tau = base_tokens + np.concatenate(([0.0], np.cumsum(scores)))
    theta = tau / np.asarray(cost, dtype=np.float64)[: len(tau)]
    if rule == "global":
        return int(np.argmax(theta))
    improves = theta[1:] > theta[:-1]
    return int(len(improves) if improves.all() else np.argmin(improves))
