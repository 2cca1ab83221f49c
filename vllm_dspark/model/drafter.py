"""The DSpark drafter in plain torch (paper §3.1): the reference, training and eval model.

A Qwen3 decoder stack drafts a block of γ positions in one pass:

- queries: the anchor token x_0 (the token the target just emitted, at position
  p) followed by γ-1 mask tokens at p+1..p+γ-1; output k predicts position p+k+1;
- keys/values: the block itself (bidirectional) plus the context, i.e. the
  target's hidden states at ``target_layer_ids`` for positions < p, concatenated,
  projected by ``fc`` and normalised by ``hidden_norm``, then projected by each
  layer's k/v (with k_norm and RoPE at their own positions).

The serving engine runs the same weights through vLLM's paged-attention layers
(``vllm_dspark.engine``); tests hold the two to each other.
State-dict names are DeepSpec's (no ``model.`` prefix).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm_dspark.config import DSparkConfig
from vllm_dspark.model.heads import build_heads


def target_features(hidden_states, target_layer_ids: list[int]) -> torch.Tensor:
    """The drafter's context input from an HF target's ``output_hidden_states``.

    ``hidden_states[i+1]`` is the output of target layer i (id -1 -> index 0, the
    embeddings); HF returns the last layer after the final norm, which the engine
    matches (engine/v1/proposer.py). Concatenated in ``target_layer_ids`` order.
    """
    return torch.cat([hidden_states[i + 1] for i in target_layer_ids], dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(_compute_dtype(x))  # at least fp32, as vLLM's kernels do
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.to(xf.dtype)).to(x.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Neox-style rotary embedding. x: [B, heads, L, D]; positions: [B, L]."""
    d, ct = x.shape[-1], _compute_dtype(x)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=ct) / d))
    ang = positions.to(ct)[..., None] * inv_freq  # [B, L, D/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None]
    xc = x.to(ct)
    x1, x2 = xc.chunk(2, dim=-1)
    return (xc * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:  # [B, L, n*D] -> [B, n, L, D]
        return x.view(*x.shape[:2], n, self.cfg.head_dim).transpose(1, 2)

    def forward(self, x, positions, ctx, ctx_positions, mask):
        cfg = self.cfg
        kv_in = torch.cat([ctx, x], dim=1)  # context first, then the block
        kv_pos = torch.cat([ctx_positions, positions], dim=1)
        q = rope(self.q_norm(self._heads(self.q_proj(x), cfg.num_attention_heads)), positions,
                 cfg.rope_theta)
        k = rope(self.k_norm(self._heads(self.k_proj(kv_in), cfg.num_key_value_heads)), kv_pos,
                 cfg.rope_theta)
        v = self._heads(self.v_proj(kv_in), cfg.num_key_value_heads)
        group = cfg.num_attention_heads // cfg.num_key_value_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(*x.shape[:2], -1))


class MLP(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, positions, ctx, ctx_positions, mask):
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx, ctx_positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DSparkDrafter(nn.Module):
    """Backbone + sequential (Markov) head + confidence head."""

    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, h)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.fc = nn.Linear(len(cfg.target_layer_ids) * h, h, bias=False)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.vocab_size, bias=False)
        self.markov_head, self.confidence_head = build_heads(cfg)

    # Names the target owns; a checkpoint may omit them and share the target's.
    SHARED_WITH_TARGET = ("embed_tokens.weight", "lm_head.weight")

    def context(self, target_features: torch.Tensor) -> torch.Tensor:
        """[..., len(ids)*H] concatenated target hidden states -> [..., H] context states."""
        return self.hidden_norm(self.fc(target_features))

    def backbone(
        self,
        block_ids: torch.Tensor,  # [B, L] anchor/mask ids of one or more blocks
        positions: torch.Tensor,  # [B, L]
        ctx: torch.Tensor,  # [B, C, H] from context()
        ctx_positions: torch.Tensor,  # [B, C]
        mask: torch.Tensor,  # [B, L, C+L] bool, True = may attend
    ) -> torch.Tensor:  # [B, L, H] normed backbone states h_k
        x = self.embed_tokens(block_ids)
        for layer in self.layers:
            x = layer(x, positions, ctx, ctx_positions, mask)
        return self.norm(x)

    def draft_block_states(
        self,
        target_features: torch.Tensor,  # [B, p, len(ids)*H]: target states at positions < p
        anchor_ids: torch.Tensor,  # [B]: the token at position p
        gamma: int,
    ) -> torch.Tensor:  # [B, γ, H]
        """States of one block per sequence, all sequences with the same context length p."""
        b, p = target_features.shape[:2]
        dev = target_features.device
        block = torch.full((b, gamma), self.cfg.mask_token_id, dtype=torch.long, device=dev)
        block[:, 0] = anchor_ids
        ctx_pos = torch.arange(p, device=dev).expand(b, p)
        pos = torch.arange(p, p + gamma, device=dev).expand(b, gamma)
        mask = torch.ones(b, gamma, p + gamma, dtype=torch.bool, device=dev)
        return self.backbone(block, pos, self.context(target_features), ctx_pos, mask)

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)
