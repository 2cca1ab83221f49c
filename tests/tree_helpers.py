"""Shared pieces of the tree tests: a small drafter, random trees, an HF target in float64
run over [sequence, tree nodes] with the tree mask (engine-free)."""

from __future__ import annotations

import torch

from vllm_dspark.checkpoint import build_draft_config
from vllm_dspark.config import DSparkConfig
from vllm_dspark.eval.tree import tree_forward  # noqa: F401 - the tests' import point
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
