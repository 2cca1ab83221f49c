"""The plain-torch drafter and the sequential sampler against independent references."""

import math

import pytest
import torch

from vllm_dspark.checkpoint import build_draft_config
from vllm_dspark.config import DSparkConfig
from vllm_dspark.decode.draft import sample_block
from vllm_dspark.model.drafter import DSparkDrafter
from vllm_dspark.schedule.prefix import admission_floor, causal_schedule

TARGET = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, vocab_size=53, rms_norm_eps=1e-6,
              rope_theta=10000.0)


def make(head_type="vanilla", ids=(-1, 1, 3), rank=8, gamma=5):
    cfg = build_draft_config(TARGET, num_hidden_layers=2, target_layer_ids=list(ids),
                             block_size=gamma, mask_token_id=52, markov_rank=rank,
                             markov_head_type=head_type)
    torch.manual_seed(0)
    model = DSparkDrafter(DSparkConfig.from_dict(cfg)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model


def dense_block_states(m: DSparkDrafter, feats, anchor, gamma):
    """Independent reference: one sequence, explicit softmax attention, explicit RoPE."""
    c = m.cfg
    d, nh, nkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    p = feats.shape[0]

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps) * w

    def rot(x, pos):  # x: [L, heads, d]
        half = d // 2
        out = torch.empty_like(x)
        for i, q in enumerate(pos.tolist()):
            for j in range(half):
                a = q / c.rope_theta ** (2 * j / d)
                x1, x2 = x[i, :, j], x[i, :, j + half]
                out[i, :, j] = x1 * math.cos(a) - x2 * math.sin(a)
                out[i, :, j + half] = x2 * math.cos(a) + x1 * math.sin(a)
        return out

    ctx = rms(feats @ m.fc.weight.T, m.hidden_norm.weight)
    ids = torch.tensor([int(anchor)] + [c.mask_token_id] * (gamma - 1))
    x = m.embed_tokens.weight[ids]
    qpos, kpos = torch.arange(p, p + gamma), torch.arange(p + gamma)
    for layer in m.layers:
        a = layer.self_attn
        hn = rms(x, layer.input_layernorm.weight)
        kv_in = torch.cat([ctx, hn])
        q = rot(rms((hn @ a.q_proj.weight.T).view(gamma, nh, d), a.q_norm.weight), qpos)
        k = rot(rms((kv_in @ a.k_proj.weight.T).view(-1, nkv, d), a.k_norm.weight), kpos)
        v = (kv_in @ a.v_proj.weight.T).view(-1, nkv, d)
        heads = []
        for h in range(nh):
            kv_h = h // (nh // nkv)
            w = torch.softmax(q[:, h] @ k[:, kv_h].T / math.sqrt(d), dim=-1)
            heads.append(w @ v[:, kv_h])
        x = x + torch.cat(heads, -1) @ a.o_proj.weight.T
        hn = rms(x, layer.post_attention_layernorm.weight)
        mlp = layer.mlp
        act = torch.nn.functional.silu(hn @ mlp.gate_proj.weight.T) * (hn @ mlp.up_proj.weight.T)
        x = x + act @ mlp.down_proj.weight.T
    return rms(x, m.norm.weight)


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_block_states_match_dense_reference(head_type):
    m = make(head_type)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(2, 11, 3 * 64, generator=g, dtype=torch.float64)
    anchors = torch.tensor([7, 30])
    got = m.draft_block_states(feats, anchors, gamma=5)
    for b in range(2):
        torch.testing.assert_close(got[b], dense_block_states(m, feats[b], anchors[b], 5))


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_greedy_block_is_argmax_of_teacher_forced_logits(head_type):
    """Greedy sequential sampling == argmax of block_logits fed with its own tokens."""
    m = make(head_type)
    hidden = torch.randn(3, 5, 64, dtype=torch.float64)
    base = m.base_logits(hidden)
    anchors = torch.tensor([1, 2, 3])
    block = sample_block(base, hidden, anchors, None, m.markov_head, m.confidence_head)
    prev = torch.cat([anchors[:, None], block.tokens[:, :-1]], 1)
    logits = m.markov_head.block_logits(base, prev, hidden)
    assert torch.equal(block.tokens, logits.argmax(-1))
    # Confidence uses [h_k; W1[x_{k-1}]] with the same x_{k-1} (eq. 7).
    want = torch.sigmoid(m.confidence_head(hidden, m.markov_head.prev_embed(prev)))
    torch.testing.assert_close(block.confidence, want.float())


def test_sampled_block_reports_the_distribution_it_samples_from():
    """At T > 0, probs are softmax((U + B)/T) along the sampled path, and draws follow them."""
    m = make("rnn", rank=4)
    torch.manual_seed(0)
    hidden = torch.randn(1, 3, 64, dtype=torch.float64) * 0.1
    base = m.base_logits(hidden) * 0.05  # flat enough for many distinct draws
    n = 20000
    temp = torch.full((n,), 0.7, dtype=torch.float64)
    block = sample_block(base.expand(n, -1, -1), hidden.expand(n, -1, -1),
                         torch.full((n,), 4), temp, m.markov_head, want_probs=True)
    prev = torch.cat([torch.full((n, 1), 4), block.tokens[:, :-1]], 1)
    logits = m.markov_head.block_logits(base.expand(n, -1, -1), prev, hidden.expand(n, -1, -1))
    torch.testing.assert_close(block.probs, torch.softmax(logits.float() / 0.7, -1))
    # Position 0 has one fixed distribution: chi-square goodness of fit, alpha = 1e-3.
    p0 = block.probs[0, 0].double()
    counts = torch.bincount(block.tokens[:, 0], minlength=p0.numel()).double()
    expected = n * p0
    keep = expected >= 5
    stat = (((counts - expected) ** 2 / expected)[keep]).sum()
    df = int(keep.sum()) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2.0), stat / 2.0))
    assert p_value > 1e-3, (stat, df, p_value)


def test_mixed_greedy_and_sampled_rows():
    m = make("vanilla")
    hidden = torch.randn(2, 5, 64, dtype=torch.float64)
    base = m.base_logits(hidden)
    temp = torch.tensor([0.0, 1.0], dtype=torch.float64)
    block = sample_block(base, hidden, torch.tensor([3, 3]), temp, m.markov_head, want_probs=True)
    greedy = sample_block(base[:1], hidden[:1], torch.tensor([3]), None, m.markov_head)
    assert torch.equal(block.tokens[0], greedy.tokens[0])
    assert block.probs.shape == (2, 5, 53)


def _floor_case(head_type):
    m = make(head_type, gamma=6)
    torch.manual_seed(1)
    hidden = torch.randn(12, 6, 64, dtype=torch.float64)
    anchors = torch.randint(0, 53, (12,))
    sps = lambda b: 1.0 / (1.0 + b.double() / 16)  # noqa: E731  floor = 12/28 ≈ 0.43
    return m, hidden, anchors, sps, admission_floor(sps, 12, 6)


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_admission_floor_stops_rows_and_keeps_the_schedule(head_type):
    """With the floor, each row stops at its first position whose survival is at or
    below it: earlier tokens and confidences are the whole block's, the stopping
    position keeps its confidence, nothing later is projected, and Algorithm 1 picks
    the same lengths as from the whole block."""
    m, hidden, anchors, sps, floor = _floor_case(head_type)
    sts = [0.8, 1.3]
    full = sample_block(m.base_logits(hidden), hidden, anchors, None, m.markov_head,
                        m.confidence_head, sts)
    projected = []

    def project(h):
        projected.append(h.shape[0])
        return m.base_logits(h)

    cut = sample_block(project, hidden, anchors, None, m.markov_head, m.confidence_head, sts,
                       admission_floor=floor)
    low = torch.cumprod(full.confidence.double(), 1) <= floor
    want = [int(row.nonzero()[0]) if bool(row.any()) else 6 for row in low]
    assert cut.drafted.tolist() == want
    assert 0 < sum(want) < 12 * 6 and sum(projected) == sum(want)
    for r, n in enumerate(want):
        assert torch.equal(cut.tokens[r, :n], full.tokens[r, :n])
        assert not bool(cut.tokens[r, n:].any())
        seen = min(n + 1, 6)  # the stopping position's confidence is kept
        torch.testing.assert_close(cut.confidence[r, :seen], full.confidence[r, :seen],
                                   rtol=0, atol=1e-6)
        assert not bool(cut.confidence[r, seen:].any())
    lengths = causal_schedule(full.confidence, sps).lengths
    assert 0 < int(lengths.sum())
    assert causal_schedule(cut.confidence, sps).lengths.tolist() == lengths.tolist()


def test_admission_floor_with_sampling_keeps_each_rows_q():
    m, hidden, anchors, sps, floor = _floor_case("rnn")
    temp = torch.tensor([0.0, 1.0] * 6, dtype=torch.float64)
    base = m.base_logits(hidden)
    full = sample_block(base, hidden, anchors, temp, m.markov_head, m.confidence_head,
                        want_probs=True)
    cut = sample_block(base, hidden, anchors, temp, m.markov_head, m.confidence_head,
                       want_probs=True, admission_floor=floor,
                       generator=torch.Generator().manual_seed(0))
    n = cut.drafted
    assert 0 < int(n.sum()) < 12 * 6
    for r in range(12):
        k = int(n[r])
        sums = cut.probs[r].sum(-1)
        torch.testing.assert_close(sums[:k], torch.ones(k))
        assert not bool(cut.probs[r, k:].any())
        if k:  # position 0 depends on the anchor only: the whole block's q
            torch.testing.assert_close(cut.probs[r, 0], full.probs[r, 0])
        drawn = cut.probs[r, torch.arange(k), cut.tokens[r, :k]]
        assert bool((drawn > 0).all())
        if temp[r] == 0:  # greedy rows stay the whole block's argmax path
            assert torch.equal(cut.tokens[r, :k], full.tokens[r, :k])


def test_admission_floor_needs_the_confidence_head():
    m, hidden, anchors, _, floor = _floor_case("vanilla")
    with pytest.raises(ValueError, match="confidence head"):
        sample_block(m.base_logits(hidden), hidden, anchors, None, m.markov_head, None,
                     admission_floor=floor)
