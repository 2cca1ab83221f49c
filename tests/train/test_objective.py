"""Training math against direct references: batched blocks == inference drafting,
the loss == eq. 9-12 written out densely."""

import math

import pytest
import torch
import torch.nn.functional as F

from vllm_dspark.config import DSparkConfig
from vllm_dspark.model.drafter import DSparkDrafter
from vllm_dspark.train.blocks import build_blocks, sample_anchors
from vllm_dspark.train.objective import block_loss, expected_greedy_tau, position_weights


def _cfg(rank=8, head="vanilla", conf=True, gamma=4):
    return DSparkConfig.from_dict({
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "head_dim": 16, "intermediate_size": 48, "vocab_size": 50, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "target_layer_ids": [0, 1], "mask_token_id": 49,
        "block_size": gamma, "markov_rank": rank, "markov_head_type": head,
        "enable_confidence_head": conf, "confidence_head_with_markov": conf and rank > 0,
    })


def _drafter(**kw):
    torch.manual_seed(0)
    d = DSparkDrafter(_cfg(**kw)).double()
    with torch.no_grad():
        for p in d.parameters():
            p.normal_(0, 0.3)
    return d


def test_anchors_lie_in_the_answer():
    g = torch.Generator().manual_seed(0)
    anchors, valid = sample_anchors(torch.tensor([3, 5, 9]), torch.tensor([10, 7, 10]), 4, g)
    for i, (lo, hi) in enumerate([(3, 9), (5, 6), (9, 9)]):
        got = anchors[i][valid[i]].tolist()
        assert got == sorted(set(got))
        assert all(lo <= a < hi for a in got)
        assert len(got) == min(4, hi - lo)


def test_batched_blocks_equal_inference_drafting():
    """Every block of the one-pass training layout matches draft_block_states, which
    drafts one block from context < p exactly as the engine does."""
    gamma = 4
    d = _drafter(gamma=gamma)
    b, s, feat = 2, 12, 2 * 32
    torch.manual_seed(1)
    ids = torch.randint(0, 48, (b, s))
    lengths = torch.tensor([12, 9])
    feats = torch.randn(b, s, feat, dtype=torch.float64)
    anchors, valid = sample_anchors(torch.tensor([2, 3]), lengths, 5,
                                    torch.Generator().manual_seed(3))
    blocks = build_blocks(anchors, valid, ids, lengths, gamma, 49)
    hidden = d.backbone(blocks.block_ids, blocks.positions, d.context(feats),
                        blocks.ctx_positions, blocks.mask).view(b, 5, gamma, -1)
    checked = 0
    for i in range(b):
        for a in range(5):
            if not valid[i, a]:
                continue
            p = int(anchors[i, a])
            ref = d.draft_block_states(feats[i:i + 1, :p], ids[i:i + 1, p], gamma)[0]
            torch.testing.assert_close(hidden[i, a], ref, rtol=1e-9, atol=1e-9)
            checked += 1
            # labels: output k predicts position p+k+1
            want = [p + k + 1 < int(lengths[i]) for k in range(gamma)]
            assert blocks.label_valid[i, a].tolist() == want
    assert checked == int(valid.sum()) >= 8


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_loss_matches_dense_formula(head):
    gamma, v = 4, 50
    d = _drafter(head=head, gamma=gamma)
    torch.manual_seed(2)
    hidden = torch.randn(2, 3, gamma, 32, dtype=torch.float64)
    prev = torch.randint(0, v, (2, 3, gamma))
    labels = torch.randint(0, v, (2, 3, gamma))
    tlogits = torch.randn(2, 3, gamma, v, dtype=torch.float64) * 2
    valid = torch.rand(2, 3, gamma) > 0.3
    res = block_loss(d, hidden, prev, labels, tlogits, valid)

    # Dense reference, written from the paper's equations.
    logits = d.markov_head.block_logits(d.base_logits(hidden), prev, hidden)
    pd_, pt = F.softmax(logits, -1), F.softmax(tlogits, -1)
    w = torch.tensor([math.exp(-k / gamma) for k in range(gamma)], dtype=torch.float64)
    w = w.expand_as(valid) * valid
    ce = -torch.log(pd_.gather(-1, labels[..., None])).squeeze(-1)
    l1 = (pd_ - pt).abs().sum(-1)
    cstar = 1 - 0.5 * l1
    z = torch.stack([d.confidence_head(hidden[..., k, :], d.markov_head.prev_embed(prev[..., k]))
                     for k in range(gamma)], -1)
    c = torch.sigmoid(z)
    bce = -(cstar * torch.log(c) + (1 - cstar) * torch.log(1 - c))
    ref = (0.1 * (w * ce).sum() + 0.9 * (w * l1).sum() + (w * bce).sum()) / w.sum()
    # The objective computes in fp32 whatever the model dtype (bf16 training).
    torch.testing.assert_close(res.loss, ref.float(), rtol=2e-5, atol=1e-6)
    res.loss.backward()
    assert d.markov_head.markov_w2.weight.grad.abs().sum() > 0
    assert d.confidence_head.proj.weight.grad.abs().sum() > 0


def test_compiled_loss_equals_eager():
    """``compiled=True`` (torch.compile of the vocabulary-wide terms, the trainer's default
    on a GPU) gives the eager loss, gradients and logs, over two batches with different
    valid-row counts (one dynamic graph)."""
    gamma, v = 4, 50
    for seed in (3, 4):
        torch.manual_seed(seed)
        hidden = torch.randn(2, 3, gamma, 32, dtype=torch.float64)
        prev, labels = torch.randint(0, v, (2, 3, gamma)), torch.randint(0, v, (2, 3, gamma))
        tlogits = torch.randn(2, 3, gamma, v, dtype=torch.float64) * 2
        valid = torch.rand(2, 3, gamma) > 0.3 + 0.2 * (seed - 3)
        runs = []
        for compiled in (False, True):
            d = _drafter(head="gated", gamma=gamma)
            res = block_loss(d, hidden, prev, labels, tlogits, valid, compiled=compiled)
            res.loss.backward()
            runs.append((res, {n: p.grad for n, p in d.named_parameters() if p.grad is not None}))
        (eager, g_eager), (comp, g_comp) = runs
        torch.testing.assert_close(comp.loss, eager.loss, rtol=1e-6, atol=1e-7)
        assert comp.top1 == eager.top1 and comp.parts.keys() == eager.parts.keys()
        assert g_comp.keys() == g_eager.keys() and g_eager
        for name in g_eager:
            torch.testing.assert_close(g_comp[name], g_eager[name], rtol=1e-5, atol=1e-7)


def test_a_failing_compile_falls_back_to_the_eager_loss(monkeypatch, capsys):
    from vllm_dspark.train import objective

    def broken(fn, **kw):
        def run(*a):
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setattr(objective, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    d = _drafter(gamma=4)
    hidden = torch.randn(1, 2, 4, 32, dtype=torch.float64)
    ids = torch.randint(0, 50, (1, 2, 4))
    tl = torch.randn(1, 2, 4, 50, dtype=torch.float64)
    ok = torch.ones(1, 2, 4, dtype=torch.bool)
    got = block_loss(d, hidden, ids, ids, tl, ok, compiled=True)
    want = block_loss(d, hidden, ids, ids, tl, ok, compiled=False)
    torch.testing.assert_close(got.loss, want.loss)
    assert "torch.compile of the loss failed" in capsys.readouterr().err
    assert objective._COMPILED["failed"]


def test_loss_without_sequential_or_confidence_head():
    d = _drafter(rank=0, conf=False)
    hidden = torch.randn(1, 2, 4, 32, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, 50, (1, 2, 4))
    res = block_loss(d, hidden, ids, ids, torch.randn(1, 2, 4, 50, dtype=torch.float64),
                     torch.ones(1, 2, 4, dtype=torch.bool))
    res.loss.backward()
    assert res.parts["conf"] == 0.0 and hidden.grad.abs().sum() > 0


def test_position_weights_and_tau_estimate():
    torch.testing.assert_close(position_weights(7)[[0, 6]],
                               torch.tensor([1.0, math.exp(-6 / 7)]))
    assert expected_greedy_tau([1.0, 1.0, 1.0]) == 4.0
    assert expected_greedy_tau([0.5, 0.5]) == 1.75
    assert expected_greedy_tau([0.0, 1.0]) == 1.0
