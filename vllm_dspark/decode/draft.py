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

from dataclasses import dataclass

import torch

from vllm_dspark.model.confidence_head import ConfidenceHead
from vllm_dspark.model.markov_head import MarkovHead

GREEDY_EPS = 1e-5  # vLLM's _SAMPLING_EPS: temperatures below are greedy


@dataclass
class DraftBlock:
    tokens: torch.Tensor  # [B, γ] int64
    probs: torch.Tensor | None  # [B, γ, V] float32, the q each token was drawn from
    confidence: torch.Tensor | None  # [B, γ] float32 in (0, 1); None without a head


@torch.no_grad()
def sample_block(
    base_logits: torch.Tensor,  # [B, γ, V]
    hidden: torch.Tensor,  # [B, γ, H]
    anchor_ids: torch.Tensor,  # [B]
    temperature: torch.Tensor | None,  # [B]; None or all < GREEDY_EPS means greedy
    markov_head: MarkovHead | None,
    confidence_head: ConfidenceHead | None = None,
    sts_temperatures: list[float] | None = None,
    want_probs: bool = False,
    generator: torch.Generator | None = None,
) -> DraftBlock:
    b, gamma, _ = base_logits.shape
    greedy_rows = None
    if not want_probs:
        # Without q, the verifier assumes one-hot drafts: sampling here would be lossy.
        temperature = None
    if temperature is not None:
        greedy_rows = temperature < GREEDY_EPS
        if bool(greedy_rows.all()):
            temperature = None
    tokens = torch.empty(b, gamma, dtype=torch.long, device=base_logits.device)
    probs = [] if temperature is not None else None
    conf_logits = []
    prev = anchor_ids.long()
    state = markov_head.init_state(prev.shape, hidden) if markov_head is not None else None
    for k in range(gamma):
        logits = base_logits[:, k].float()
        if markov_head is not None:
            bias, state = markov_head.step(prev, hidden[:, k], state)
            logits = logits + bias.float()
        if confidence_head is not None:
            emb = markov_head.prev_embed(prev) if confidence_head.with_markov else None
            conf_logits.append(confidence_head(hidden[:, k], emb).float())
        if temperature is None:
            tok = logits.argmax(dim=-1)
        else:
            t = torch.where(greedy_rows, torch.ones_like(temperature), temperature)
            p = torch.softmax(logits / t[:, None].float(), dim=-1)
            # Exponential race (Gumbel-max): argmax p/E with E ~ Exp(1) samples from p.
            e = torch.empty_like(p).exponential_(generator=generator)
            tok = torch.where(greedy_rows, logits.argmax(-1), (p / e).argmax(-1))
            if probs is not None:
                probs.append(p)
        tokens[:, k] = tok
        prev = tok
    confidence = None
    if conf_logits:
        z = torch.stack(conf_logits, dim=1)
        if sts_temperatures is not None:
            # Positions past the calibrated ones keep temperature 1.
            temps = list(sts_temperatures[:gamma]) + [1.0] * (gamma - len(sts_temperatures))
            z = z / torch.tensor(temps, device=z.device, dtype=z.dtype)
        confidence = torch.sigmoid(z)
    return DraftBlock(tokens, torch.stack(probs, 1) if probs is not None else None, confidence)
