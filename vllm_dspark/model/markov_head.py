"""Sequential heads of DSpark (paper §3.1, eq. 5-6): the prefix-dependent bias B_k.

Three variants, named as DeepSpec's ``markov_head_type``:

- ``vanilla``: B(x_{k-1}) = W2 · W1[x_{k-1}]                         (eq. 5)
- ``gated``:   B = W2 · (σ(Wg [h_k; W1[x_{k-1}]]) ⊙ W1[x_{k-1}])
- ``rnn``:     z_k = [s_{k-1}; W1[x_{k-1}]; h_k],
               s_k = g ⊙ s_{k-1} + (1-g) ⊙ tanh(Wc z_k),  g = σ(Wg z_k),
               B_k = W2 · tanh(Wo z_k)                                (eq. 6)

Each head exposes the two APIs training and serving share:

- ``step(prev_ids, hidden, state) -> (bias, state)``: one left-to-right step at
  inference, after the previous token has been sampled;
- ``block_logits(base_logits, prev_ids, hidden)``: teacher-forced over a block.

Weight names follow DeepSpec checkpoints: ``markov_w1`` [V, r] (an embedding),
``markov_w2`` [V, r] (a linear r -> V), ``gate_proj`` [r, H + r] (+bias) for
gated, ``joint_proj`` [3r, 2r + H] (+bias) for rnn, split gate|candidate|output.
"""

from __future__ import annotations

import torch
from torch import nn

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


class MarkovHead(nn.Module):
    """Vanilla low-rank Markov transition bias; the base of the other two."""

    head_type = "vanilla"

    def __init__(self, *, vocab_size: int, rank: int, hidden_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.rank = rank
        self.hidden_size = hidden_size
        self.markov_w1 = nn.Embedding(vocab_size, rank)
        self.markov_w2 = nn.Linear(rank, vocab_size, bias=False)

    def prev_embed(self, prev_ids: torch.Tensor) -> torch.Tensor:
        """W1[x_{k-1}]: [...] -> [..., r]. Also the confidence head's Markov feature."""
        return self.markov_w1(prev_ids.long())

    def init_state(self, batch_shape: torch.Size, ref: torch.Tensor) -> torch.Tensor | None:
        return None

    def step(
        self,
        prev_ids: torch.Tensor,  # [...]
        hidden: torch.Tensor,  # [..., H]
        state: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bias [..., V] for the position after ``prev_ids``, and the next state."""
        return self.markov_w2(self.prev_embed(prev_ids).to(self.markov_w2.weight.dtype)), state

    def block_logits(
        self,
        base_logits: torch.Tensor,  # [..., γ, V]
        prev_ids: torch.Tensor,  # [..., γ]: anchor, then the block's tokens shifted by one
        hidden: torch.Tensor,  # [..., γ, H]
    ) -> torch.Tensor:
        """Teacher-forced corrected logits over whole blocks (training, evaluation)."""
        state = self.init_state(prev_ids.shape[:-1], hidden)
        out = []
        for k in range(base_logits.shape[-2]):
            bias, state = self.step(prev_ids[..., k], hidden[..., k, :], state)
            out.append(base_logits[..., k, :] + bias.to(base_logits.dtype))
        return torch.stack(out, dim=-2)


class GatedMarkovHead(MarkovHead):
    """The previous-token embedding is gated by the backbone state h_k."""

    head_type = "gated"

    def __init__(self, *, vocab_size: int, rank: int, hidden_size: int):
        super().__init__(vocab_size=vocab_size, rank=rank, hidden_size=hidden_size)
        self.gate_proj = nn.Linear(hidden_size + rank, rank)

    def step(self, prev_ids, hidden, state):
        emb = self.prev_embed(prev_ids).to(self.gate_proj.weight.dtype)
        gate = torch.sigmoid(self.gate_proj(torch.cat([hidden.to(emb.dtype), emb], dim=-1)))
        return self.markov_w2(gate * emb), state


class RNNMarkovHead(MarkovHead):
    """A gated recurrent state carries the whole in-block prefix (eq. 6); s_0 = 0."""

    head_type = "rnn"

    def __init__(self, *, vocab_size: int, rank: int, hidden_size: int):
        super().__init__(vocab_size=vocab_size, rank=rank, hidden_size=hidden_size)
        self.joint_proj = nn.Linear(2 * rank + hidden_size, 3 * rank)

    def init_state(self, batch_shape, ref):
        return ref.new_zeros(*batch_shape, self.rank, dtype=self.joint_proj.weight.dtype)

    def step(self, prev_ids, hidden, state):
        emb = self.prev_embed(prev_ids).to(self.joint_proj.weight.dtype)
        if state is None:
            state = torch.zeros_like(emb)
        z = torch.cat([state, emb, hidden.to(emb.dtype)], dim=-1)
        gate_raw, cand_raw, out_raw = self.joint_proj(z).chunk(3, dim=-1)
        gate = torch.sigmoid(gate_raw)
        new_state = gate * state + (1.0 - gate) * torch.tanh(cand_raw)
        return self.markov_w2(torch.tanh(out_raw)), new_state


_HEADS = {cls.head_type: cls for cls in (MarkovHead, GatedMarkovHead, RNNMarkovHead)}


def build_markov_head(
    head_type: str, *, vocab_size: int, rank: int, hidden_size: int
) -> MarkovHead | None:
    """The head named by ``markov_head_type``; None when rank is 0 (DFlash-like drafter)."""
    if rank <= 0:
        return None
    if head_type not in _HEADS:
        raise ValueError(
            f"unknown markov_head_type {head_type!r}; expected one of {MARKOV_HEAD_TYPES}"
        )
    return _HEADS[head_type](vocab_size=vocab_size, rank=rank, hidden_size=hidden_size)
