"""Confidence head (paper eq. 7): c_k = σ(wᵀ[h_k; W1[x_{k-1}]]).

c_k estimates the probability that draft token k survives verification given
that tokens 1..k-1 did. The head returns logits; the caller applies the
(optionally STS-calibrated, per-position) temperature and the sigmoid, so the
calibration never touches the weights.
"""

from __future__ import annotations

import torch
from torch import nn


class ConfidenceHead(nn.Module):
    def __init__(self, *, hidden_size: int, markov_rank: int, with_markov: bool):
        super().__init__()
        self.with_markov = with_markov
        in_dim = hidden_size + (markov_rank if with_markov else 0)
        self.proj = nn.Linear(in_dim, 1)

    def forward(
        self,
        hidden: torch.Tensor,  # [..., H]
        prev_embed: torch.Tensor | None,  # [..., r], W1[x_{k-1}]; used when with_markov
    ) -> torch.Tensor:  # [...] logits
        x = hidden
        if self.with_markov:
            x = torch.cat([hidden, prev_embed.to(hidden.dtype)], dim=-1)
        return self.proj(x.to(self.proj.weight.dtype)).squeeze(-1)
