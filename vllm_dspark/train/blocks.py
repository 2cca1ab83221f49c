"""Anchored γ-blocks for training: many blocks per sequence in one drafter pass.

For an anchor at position p (the token the target just emitted), the drafter
sees the anchor and γ-1 mask tokens at positions p..p+γ-1 and predicts the
tokens at p+1..p+γ (output k predicts p+k). Its context is the target's hidden
states at positions < p. All blocks of a sequence are laid side by side in one
query row; a boolean mask lets block a see context positions < p_a and its own
block (bidirectionally), nothing else. This is the inference computation,
batched: the engine drafts one such block per request per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockBatch:
    block_ids: torch.Tensor  # [B, A*γ] anchor then mask ids, per block
    positions: torch.Tensor  # [B, A*γ]
    ctx_positions: torch.Tensor  # [B, S]
    mask: torch.Tensor  # [B, A*γ, S + A*γ] bool, True = may attend
    anchors: torch.Tensor  # [B, A] anchor positions p (0 where invalid)
    label_pos: torch.Tensor  # [B, A, γ] position of the token output k predicts (clamped)
    label_valid: torch.Tensor  # [B, A, γ] bool: a real, in-sequence label


def sample_anchors(
    prompt_lens: torch.Tensor,  # [B]
    lengths: torch.Tensor,  # [B]
    num_anchors: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``num_anchors`` distinct anchors per sequence in [prompt_len, length-2].

    Anchors are answer tokens with at least one answer token after them, as at
    inference, where the anchor is a token the target generated. Returns
    (anchors [B, A] sorted, valid [B, A]); short sequences get fewer valid ones.
    """
    b = prompt_lens.shape[0]
    anchors = torch.zeros(b, num_anchors, dtype=torch.long)
    valid = torch.zeros(b, num_anchors, dtype=torch.bool)
    for i in range(b):
        lo, hi = int(prompt_lens[i]), int(lengths[i]) - 1  # candidates lo..hi-1
        n = hi - lo
        if n <= 0:
            continue
        take = min(n, num_anchors)
        pick = torch.randperm(n, generator=generator)[:take].sort().values + lo
        anchors[i, :take] = pick
        valid[i, :take] = True
    return anchors, valid


def build_blocks(
    anchors: torch.Tensor,  # [B, A]
    anchor_valid: torch.Tensor,  # [B, A]
    input_ids: torch.Tensor,  # [B, S]
    lengths: torch.Tensor,  # [B]
    gamma: int,
    mask_token_id: int,
) -> BlockBatch:
    b, a = anchors.shape
    s = input_ids.shape[1]
    dev = input_ids.device
    anchors, anchor_valid, lengths = anchors.to(dev), anchor_valid.to(dev), lengths.to(dev)
    k = torch.arange(gamma, device=dev)
    positions = anchors[..., None] + k  # [B, A, γ]
    block_ids = torch.full((b, a, gamma), mask_token_id, dtype=torch.long, device=dev)
    block_ids[..., 0] = input_ids.gather(1, anchors)
    label_pos = positions + 1
    label_valid = anchor_valid[..., None] & (label_pos < lengths[:, None, None])
    label_pos = label_pos.clamp(max=s - 1)

    # Context: block a sees target states at positions < p_a.
    ctx_mask = torch.arange(s, device=dev) < anchors[..., None]  # [B, A, S]
    ctx_mask = ctx_mask[:, :, None, :].expand(b, a, gamma, s).reshape(b, a * gamma, s)
    # Block: bidirectional inside its own block only.
    blk = torch.arange(a, device=dev).repeat_interleave(gamma)
    own = (blk[:, None] == blk[None, :]).expand(b, a * gamma, a * gamma)
    mask = torch.cat([ctx_mask, own], dim=-1)
    return BlockBatch(
        block_ids=block_ids.reshape(b, a * gamma),
        positions=positions.reshape(b, a * gamma),
        ctx_positions=torch.arange(s, device=dev).expand(b, s),
        mask=mask,
        anchors=anchors,
        label_pos=label_pos,
        label_valid=label_valid,
    )
