"""The V2 runner's draft budget rule (schedule/budget.py) against Algorithm 1 and §5.2."""

import numpy as np
import pytest
import torch

from vllm_dspark.schedule.budget import draft_budget
from vllm_dspark.schedule.prefix import capacity_budget, causal_schedule


def _case(seed: int, r: int = 5, gamma: int = 7):
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(r, gamma, generator=g, dtype=torch.float64) ** 0.5
    # A step-time curve t(B) = a + b·B with small noise (not monotone in Θ).
    a, b = 1.0 + torch.rand(1, generator=g).item(), 0.02 + 0.2 * torch.rand(1, generator=g).item()
    noise = 0.05 * torch.rand(r * gamma + r + 1, generator=g, dtype=torch.float64)
    t = a + b * torch.arange(r * gamma + r + 1, dtype=torch.float64) + noise
    return c, t


@pytest.mark.parametrize("seed", range(40))
def test_causal_rule_admits_what_algorithm_1_admits(seed):
    """Same survival path and costs: the budget equals Algorithm 1's admitted count, and
    the global rule equals §5.2's capacity K."""
    c, t = _case(seed)
    r, gamma = c.shape
    sps = lambda b: 1.0 / t[b]  # noqa: E731  B = R + k tokens
    survival = torch.cumprod(c, 1).reshape(-1)
    scores = np.sort(survival.numpy())[::-1]
    cost = t[r:].numpy()  # k drafts cost t(R + k)
    assert draft_budget(scores, r, cost, "causal") == int(causal_schedule(c, sps).admitted)
    assert draft_budget(scores, r, cost, "global") == int(capacity_budget(c, sps))


def test_causal_stops_at_the_first_dip_and_global_looks_past_it():
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    cost = np.array([1.0, 1.1, 1.6, 1.62, 1.64])  # a cliff after one draft token
    assert draft_budget(scores, 1.0, cost, "causal") == 1
    assert draft_budget(scores, 1.0, cost, "global") == 4  # Θ: 1, 1.73, 1.63, 1.98, 2.32


def test_edge_cases():
    assert draft_budget(np.array([]), 3.0, np.array([1.0]), "causal") == 0
    assert draft_budget(np.array([0.5, 0.4]), 1.0, np.array([1.0, 1.0, 1.0])) == 2  # free
    with pytest.raises(ValueError, match="unknown budget rule"):
        draft_budget(np.array([0.5]), 1.0, np.array([1.0, 1.0]), "topk")
