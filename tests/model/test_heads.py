"""Block logits of every sequential head against dense references written from the paper."""

import pytest
import torch

from vllm_dspark.model.confidence_head import ConfidenceHead
from vllm_dspark.model.markov_head import MARKOV_HEAD_TYPES, build_markov_head

V, R, H, B, G = 37, 6, 10, 3, 5  # awkward sizes on purpose


def _random_head(kind):
    torch.manual_seed(0)
    head = build_markov_head(kind, vocab_size=V, rank=R, hidden_size=H).double()
    with torch.no_grad():
        for p in head.parameters():
            p.normal_()
    return head


def dense_reference(head, kind, base, prev, hidden):
    """Eq. 5 / eq. 6 with explicit matrices, one (batch, position) at a time."""
    w1 = head.markov_w1.weight  # [V, r]
    w2 = head.markov_w2.weight.T  # [r, V]
    out = torch.empty_like(base)
    for b in range(base.shape[0]):
        s = torch.zeros(R, dtype=base.dtype)
        for k in range(base.shape[1]):
            e = w1[prev[b, k]]
            h = hidden[b, k]
            if kind == "vanilla":
                full = w1 @ w2  # the V x V transition matrix B
                bias = full[prev[b, k]]
            elif kind == "gated":
                g = torch.sigmoid(head.gate_proj.weight @ torch.cat([h, e]) + head.gate_proj.bias)
                bias = (g * e) @ w2
            else:
                z = torch.cat([s, e, h])
                wg, wc, wo = head.joint_proj.weight.split(R, dim=0)
                bg, bc, bo = head.joint_proj.bias.split(R)
                g = torch.sigmoid(wg @ z + bg)
                s = g * s + (1 - g) * torch.tanh(wc @ z + bc)
                bias = torch.tanh(wo @ z + bo) @ w2
            out[b, k] = base[b, k] + bias
    return out


@pytest.mark.parametrize("kind", MARKOV_HEAD_TYPES)
def test_block_logits_match_dense_reference(kind):
    head = _random_head(kind)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(B, G, V, generator=g, dtype=torch.float64)
    prev = torch.randint(0, V, (B, G), generator=g)
    hidden = torch.randn(B, G, H, generator=g, dtype=torch.float64)
    got = head.block_logits(base, prev, hidden)
    torch.testing.assert_close(got, dense_reference(head, kind, base, prev, hidden))


@pytest.mark.parametrize("kind", MARKOV_HEAD_TYPES)
def test_step_api_matches_block_api(kind):
    """Inference steps (state carried by the caller) reproduce the teacher-forced block."""
    head = _random_head(kind)
    base = torch.randn(B, G, V, dtype=torch.float64)
    prev = torch.randint(0, V, (B, G))
    hidden = torch.randn(B, G, H, dtype=torch.float64)
    state = head.init_state(prev.shape[:-1], hidden)
    steps = []
    for k in range(G):
        bias, state = head.step(prev[:, k], hidden[:, k], state)
        steps.append(base[:, k] + bias)
    torch.testing.assert_close(torch.stack(steps, 1), head.block_logits(base, prev, hidden))


def test_rank_zero_means_no_head_and_unknown_type_fails():
    assert build_markov_head("vanilla", vocab_size=V, rank=0, hidden_size=H) is None
    with pytest.raises(ValueError, match="unknown markov_head_type 'lstm'"):
        build_markov_head("lstm", vocab_size=V, rank=R, hidden_size=H)


@pytest.mark.parametrize("with_markov", [True, False])
def test_confidence_head_is_eq7(with_markov):
    torch.manual_seed(0)
    head = ConfidenceHead(hidden_size=H, markov_rank=R, with_markov=with_markov).double()
    h, e = torch.randn(4, H, dtype=torch.float64), torch.randn(4, R, dtype=torch.float64)
    x = torch.cat([h, e], -1) if with_markov else h
    want = x @ head.proj.weight[0] + head.proj.bias[0]
    torch.testing.assert_close(head(h, e if with_markov else None), want)


@pytest.mark.parametrize("kind", MARKOV_HEAD_TYPES)
@pytest.mark.parametrize("rank,confidence,with_markov", [
    (R, False, False), (R, True, False), (R, True, True), (0, True, False), (0, False, False),
])
def test_build_heads_follows_the_config(kind, rank, confidence, with_markov):
    """build_heads is the one reading of the head keys of config.json, for the torch
    drafter and the engine model (which converts the same modules to float32)."""
    from vllm_dspark.config import DSparkConfig
    from vllm_dspark.model.drafter import DSparkDrafter
    from vllm_dspark.model.heads import build_heads

    cfg = DSparkConfig.from_dict({
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "hidden_size": H,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 4, "intermediate_size": 8, "vocab_size": V, "target_layer_ids": [0],
        "mask_token_id": 1, "block_size": G, "markov_rank": rank, "markov_head_type": kind,
        "enable_confidence_head": confidence, "confidence_head_with_markov": with_markov})
    markov, conf = build_heads(cfg)
    if rank == 0:
        assert markov is None
    else:
        assert markov.head_type == kind
        assert (markov.vocab_size, markov.rank, markov.hidden_size) == (V, rank, H)
    if not confidence:
        assert conf is None
    else:
        assert conf.with_markov == with_markov
        assert conf.proj.in_features == H + (rank if with_markov else 0)
    drafter = DSparkDrafter(cfg)  # the torch drafter builds exactly these heads
    for built, own in ((markov, drafter.markov_head), (conf, drafter.confidence_head)):
        assert type(built) is type(own)
        if built is not None:
            assert {k: v.shape for k, v in built.state_dict().items()} == \
                {k: v.shape for k, v in own.state_dict().items()}
