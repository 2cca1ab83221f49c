"""The sequential stage of one DSpark round (paper eq. 4): sample a block left to right.

Given the backbone's base logits U_k and states h_k for γ positions, position k
samples from p_k(v) ∝ exp((U_k(v) + B_k(x_{<k}, v)) / T), where B_k is the
Markov head's bias from the token sampled at k-1 (x_0 is the anchor). The
confidence c_k is computed from [h_k; W1[x_{k-1}]] with the same x_{k-1}.

The returned ``probs`` are exactly the distributions the tokens were drawn from,
which is what the rejection sampler needs to stay lossless at T > 0.
Greedy rows (T == 0) take the argmax (their probs are unused by the verifier).
Without ``want_probs`` every row takes the argmax: the verifier then treats the
draft as one-hot, which is lossless only if the draft really is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vllm_dspark.model.confidence_head import ConfidenceHead
from vllm_dspark.model.markov_head import MarkovHead

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below are greedy


@dataclass
class DraftBlock:
    tokens: torch.Tensor  # [B, γ] int64
    probs: torch.Tensor | None  # [B, γ, V] float32, the q each token was drawn from
    confidence: torch.Tensor | None  # [B, γ] float32 in [0, 1]; None without a head
    # [B] int64: positions each row sampled, when an admission floor stopped rows early
    # (later positions hold token 0, q = 0 and confidence 0); None: all γ.
    drafted: torch.Tensor | None = None


BaseLogits = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def sample_block(
    base_logits: BaseLogits,  # [B, γ, V], or backbone states [n, H] -> U [n, V]
    hidden: torch.Tensor,  # [B, γ, H]
    anchor_ids: torch.Tensor,  # [B]
    temperature: torch.Tensor | None,  # [B]; None or all < GREEDY_EPS means greedy
    markov_head: MarkovHead | None,
    confidence_head: ConfidenceHead | None = None,
    sts_temperatures: list[float] | None = None,
    want_probs: bool = False,
    generator: torch.Generator | None = None,
    admission_floor: float | None = None,
) -> DraftBlock:
    """``base_logits`` as a function projects, per position, only the rows still
    drafting (the vocabulary projection is most of drafting's cost).

    ``admission_floor`` (needs the confidence head): a survival value at or below which
    the verification scheduler admits nothing (``schedule.prefix.admission_floor``). A
    row stops at the first position whose survival ∏_{i≤k} c_i falls to it: that
    position keeps its confidence (the scheduler's walk stops there), later ones get
    confidence 0, and none of them is projected or sampled. The lengths the scheduler
    then picks are those it would pick from the whole block."""
    b, gamma = hidden.shape[:2]
    if admission_floor is not None and confidence_head is None:
        raise ValueError("an admission floor needs the confidence head's survival")
    greedy_rows = None
    if not want_probs:
        # Without q, the verifier assumes one-hot drafts: sampling here would be lossy.
        temperature = None
    if temperature is not None:
        greedy_rows = temperature < GREEDY_EPS
        if bool(greedy_rows.all()):
            temperature = None
    sts = sts_per_position(sts_temperatures, gamma)
    dev = hidden.device
    tokens = torch.zeros(b, gamma, dtype=torch.long, device=dev)
    probs = None
    confidence = (torch.zeros(b, gamma, dtype=torch.float32, device=dev)
                  if confidence_head is not None else None)
    drafted = (torch.full((b,), gamma, dtype=torch.long, device=dev)
               if admission_floor is not None else None)
    # The rows still drafting (None: all, in order) and their per-row state, compacted.
    rows = None
    prev = anchor_ids.long()
    state = markov_head.init_state(prev.shape, hidden) if markov_head is not None else None
    survival = torch.ones(b, dtype=torch.float64, device=dev)
    temp, greedy = temperature, greedy_rows
    for k in range(gamma):
        h = hidden[:, k] if rows is None else hidden[rows, k]
        if confidence_head is not None:
            c = position_confidence(confidence_head, markov_head, h, prev, sts[k])
            _put(confidence, rows, k, c)
            if admission_floor is not None:
                survival = survival * c.double()
                keep = survival > admission_floor
                if not bool(keep.all()):
                    idx = torch.arange(b, device=dev) if rows is None else rows
                    drafted[idx[~keep]] = k
                    rows, h, prev, survival = idx[keep], h[keep], prev[keep], survival[keep]
                    state = state[keep] if state is not None else None
                    if temp is not None:
                        temp, greedy = temp[keep], greedy[keep]
                    if rows.numel() == 0:
                        break
        if callable(base_logits):
            logits = base_logits(h).float()
        else:
            logits = (base_logits[:, k] if rows is None else base_logits[rows, k]).float()
        if markov_head is not None:
            bias, state = markov_head.step(prev, h, state)
            logits = logits + bias.float()
        if temp is None:
            tok = logits.argmax(dim=-1)
        else:
            t = torch.where(greedy, torch.ones_like(temp), temp)
            p = torch.softmax(logits / t[:, None].float(), dim=-1)
            # Exponential race (Gumbel-max): argmax p/E with E ~ Exp(1) samples from p.
            e = torch.empty_like(p).exponential_(generator=generator)
            tok = torch.where(greedy, logits.argmax(-1), (p / e).argmax(-1))
            if probs is None:
                probs = p.new_zeros(b, gamma, p.shape[-1])
            _put(probs, rows, k, p)
        _put(tokens, rows, k, tok)
        prev = tok
    return DraftBlock(tokens, probs, confidence, drafted)


def sts_per_position(sts_temperatures: list[float] | None, gamma: int) -> list[float]:
    """The STS temperature of each of γ positions; past the calibrated ones, 1."""
    sts = [float(t) for t in (sts_temperatures or [])][:gamma]
    return sts + [1.0] * (gamma - len(sts))


def position_confidence(
    confidence_head: ConfidenceHead,
    markov_head: MarkovHead | None,
    hidden: torch.Tensor,  # [B, H], h_k
    prev: torch.Tensor,  # [B], x_{k-1}
    sts_temperature: float,
) -> torch.Tensor:  # [B] float32
    """c_k = σ(z_k / t_k): the calibrated chance that token k survives (eq. 7, §3.2.1).
    Fixed shapes, no host sync: the V2 speculator runs it inside a CUDA graph."""
    emb = markov_head.prev_embed(prev) if confidence_head.with_markov else None
    z = confidence_head(hidden, emb).float()
    if sts_temperature != 1.0:
        z = z / sts_temperature
    return torch.sigmoid(z)


def block_confidence(
    confidence_head: ConfidenceHead,
    markov_head: MarkovHead | None,
    hidden: torch.Tensor,  # [B, γ, H], h_1..h_γ
    prev: torch.Tensor,  # [B, γ], x_0..x_{γ-1} (anchor, then the block shifted by one)
    sts_temperatures: torch.Tensor,  # [γ] float32
) -> torch.Tensor:  # [B, γ] float32
    """Every position's c_k of a drafted block at once: ``position_confidence`` per k,
    in one batched pass once the block's tokens are known (fewer kernels in the graph)."""
    emb = markov_head.prev_embed(prev) if confidence_head.with_markov else None
    z = confidence_head(hidden, emb).float()
    return torch.sigmoid(z / sts_temperatures)


def _put(out: torch.Tensor, rows: torch.Tensor | None, k: int, value: torch.Tensor) -> None:
    """out[rows, k] = value (rows None: every row)."""
    if rows is None:
        out[:, k] = value
    else:
        out[rows, k] = value
