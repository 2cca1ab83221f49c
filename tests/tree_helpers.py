"""Shared pieces of the tree tests: a small drafter, random trees, an HF target in float64
run over [sequence, tree nodes] with the tree mask (engine-free)."""

from __future__ import annotations

import torch

from vllm_dspark.checkpoint import build_draft_config
from vllm_dspark.config import DSparkConfig
from vllm_dspark.decode.tree_attention import attention_mask_with_context, tree_positions
from vllm_dspark.model.drafter import DSparkDrafter

TARGET = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=12, vocab_size=53, rms_norm_eps=1e-6,
              rope_theta=10000.0)


def small_drafter(head_type="vanilla", rank=8, gamma=5, confidence=True, with_markov=False,
                  seed=0) -> DSparkDrafter:
    cfg = build_draft_config(TARGET, num_hidden_layers=1, target_layer_ids=[-1, 1],
                             block_size=gamma, mask_token_id=52, markov_rank=rank,
                             markov_head_type=head_type, enable_confidence_head=confidence,
                             confidence_head_with_markov=with_markov)
    torch.manual_seed(seed)
    model = DSparkDrafter(DSparkConfig.from_dict(cfg)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def block_inputs(model: DSparkDrafter, r: int, gamma: int, seed: int = 0):
    """Random backbone states [R, γ, H] (float64), their base logits and anchors."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(r, gamma, model.cfg.hidden_size, generator=g, dtype=torch.float64)
    anchors = torch.randint(0, model.cfg.vocab_size, (r,), generator=g)
    return model.base_logits(hidden), hidden, anchors


def tree_forward(target, seq: list[int], tree_tokens: torch.Tensor, parents: torch.Tensor,
                 depth: torch.Tensor, **kw):
    """One HF forward over [seq, nodes] for one request: the last token of ``seq`` is the
    root; rows before it are causal, tree rows see the context and their ancestors.
    Returns the HF output; rows len(seq)-1 .. are the tree's [N+1]."""
    p = len(seq) - 1
    ids = torch.tensor([seq + tree_tokens.tolist()])
    length = ids.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[p:] = attention_mask_with_context(parents[None], p)[0]  # [N+1, p+N+1]
    pos = torch.cat([torch.arange(p)[None], tree_positions(depth[None], torch.tensor([p]))], 1)
    dtype = next(target.parameters()).dtype
    bias = torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return target(input_ids=ids, attention_mask=bias[None, None], position_ids=pos, **kw)
