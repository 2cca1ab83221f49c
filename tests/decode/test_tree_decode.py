"""Tree decoding end to end, engine-free: draft a tree from the drafter's block, run the
target once over it with the tree mask, verify, append, carry the accepted rows' hidden
states as the next context.

- T = 0: the output is the target's own greedy decode, token for token (the tests' tiny
  HF Qwen3 in float64; the drafter's block logits carry an oracle of the target's
  greedy continuation that ranks a decoy first at every third position, so the tree
  must accept second children), with every node verified and with Algorithm 1 over
  nodes; the carried hidden states equal a sequential forward's.
- T = 1: a bigram target over a tiny vocabulary (V = 24), so the exact next-token law
  is a table; a drafter whose table is wrong on a third of its rows. All (prev, next)
  transitions of 1500 sequences x 8 tokens pass a chi-square goodness-of-fit test against
  the target's table (p > 1e-3, cells with expectation < 5 pooled per row) and fail it
  against the drafter's (p < 1e-6: the test can see a sampler that emits drafts
  unchecked). Both candidate schemes, with Algorithm 1 over nodes admitting part of
  each tree.
"""

import os

import pytest
import torch
from checks import chi_square_p_value

from tiny_models import VOCAB, make_drafter
from vllm_dspark.decode.tree import TreeSpec, draft_tree
from vllm_dspark.decode.tree_verify import draw_noise, verify_tree
from vllm_dspark.eval.tree import greedy_tree_decode
from vllm_dspark.model.confidence_head import ConfidenceHead
from vllm_dspark.model.drafter import target_features
from vllm_dspark.model.markov_head import MarkovHead
from vllm_dspark.schedule.tree import tree_schedule

LAYERS = [-1, 1, 2]


@pytest.fixture(scope="module")
def greedy_pair(qwen3_target, models_dir):
    path, target = qwen3_target
    drafter = make_drafter(path, os.path.join(models_dir, "tree-greedy-draft"), markov_rank=0,
                           confidence=False, block_size=4, target_layer_ids=LAYERS).double()
    with torch.no_grad():
        drafter.lm_head.weight.mul_(0.1)  # the backbone's own logits: a small nudge
    return target, drafter


@torch.no_grad()
def greedy_decode(target, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(target(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq


def oracle_logits(base, truth, p):
    """The block's base logits [1, γ, V] plus a drafter that knows the target's greedy
    continuation ``truth``: +8 on the true token of each position, and at every third
    position a decoy at +8.3 above it, so only a second child finds the true token."""
    out = base.clone()
    for d in range(base.shape[1]):
        pos = p + 1 + d
        if pos < len(truth):
            out[0, d, truth[pos]] += 8.0
            if pos % 3 == 0:
                out[0, d, (truth[pos] + 1) % VOCAB] += 8.3
    return out


def tree_decode(target, drafter, prompt, n, spec, truth, sps=None):
    admit = None if sps is None else (lambda tree: tree_schedule(tree.survival, sps).lengths)
    return greedy_tree_decode(target, drafter, prompt, n, spec, admit=admit,
                              base_hook=lambda base, p: oracle_logits(base, truth, p))


# Two shapes: narrow, branching below a confidence; and TreeSpec's default, best-first.
SHAPES = {"narrow": dict(width=3, branch_below=0.6), "best-first": {}}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scheduled", [False, True], ids=["all-nodes", "algorithm-1"])
def test_tree_greedy_equals_target_greedy(greedy_pair, scheduled, shape):
    target, drafter = greedy_pair
    spec = TreeSpec(budget=10, **SHAPES[shape])
    sps = (lambda b: 1.0 / (1.0 + b.double() / 5)) if scheduled else None  # noqa: E731
    totals = {}
    for prompt in ([5, 17, 33, 2, 90, 41, 7], [300, 12]):
        truth = greedy_decode(target, prompt, 40)
        seq, feats, stats = tree_decode(target, drafter, prompt, 32, spec, truth, sps)
        n = min(len(seq), len(truth))
        assert seq[:n] == truth[:n] and n >= len(prompt) + 32
        # the carried rows are the sequential forward's hidden states (what KV compaction keeps)
        ref = target(input_ids=torch.tensor([seq[:-1]]), output_hidden_states=True)
        torch.testing.assert_close(feats, target_features(ref.hidden_states, LAYERS),
                                   rtol=1e-9, atol=1e-9)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0) + value
    # drafts were accepted, some of them off the top-1 chain
    assert totals["accepted"] > 1.5 * totals["rounds"], totals
    assert totals["side_branch"] > 0, totals
    if scheduled:
        assert totals["verified"] < totals["drafted"], totals


# ---------------------------------------------------------------------- T = 1, bigram
V, H, GAMMA, N_SEQ, MAX_TOKENS = 24, 16, 4, 1500, 8


def bigram_case():
    g = torch.Generator().manual_seed(11)
    table = torch.randn(V, V, generator=g, dtype=torch.float64) * 2.0  # target's L[prev]
    bad = torch.randperm(V, generator=g)[: V // 3]
    drafted = table.clone()
    for r in bad.tolist():
        drafted[r] = drafted[r][torch.randperm(V, generator=g)]
    markov = MarkovHead(vocab_size=V, rank=V, hidden_size=H).double()
    conf = ConfidenceHead(hidden_size=H, markov_rank=V, with_markov=True).double()
    with torch.no_grad():
        markov.markov_w1.weight.copy_(torch.eye(V))
        markov.markov_w2.weight.copy_(drafted.T)
        trust = torch.full((V,), 2.0, dtype=torch.float64)
        trust[bad] = -1.0  # the drafter knows where it is unsure: it branches there
        conf.proj.weight.copy_(torch.cat([torch.zeros(H), trust])[None])
        conf.proj.bias.zero_()
    base = torch.randn(GAMMA, V, generator=g, dtype=torch.float64) * 0.3
    hidden = torch.randn(GAMMA, H, generator=g, dtype=torch.float64)
    return table, drafted, markov, conf, base, hidden


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sample_children", [False, True], ids=["top-k", "sampled"])
def test_tree_sampling_follows_the_target_distribution(sample_children, shape):
    table, drafted, markov, conf, base, hidden = bigram_case()
    spec = TreeSpec(budget=8, sample_children=sample_children, **SHAPES[shape])
    g = torch.Generator().manual_seed(12)
    seqs = [[5] for _ in range(N_SEQ)]
    admitted = verified = accepted = 0
    while True:
        live = [i for i, s in enumerate(seqs) if len(s) <= MAX_TOKENS]
        if not live:
            break
        r = len(live)
        anchor = torch.tensor([seqs[i][-1] for i in live])
        temp = torch.ones(r, dtype=torch.float64)
        tree = draft_tree(base.expand(r, -1, -1), hidden.expand(r, -1, -1), anchor, temp,
                          markov, conf, None, spec, g)
        # the bigram target's logits at the root and at every node: L[token]
        rows = torch.cat([anchor[:, None], tree.tokens], 1)
        logits = table[rows].float()
        sps = lambda b, r=r: 1.0 / (1.0 + b.double() / (2 * r))  # noqa: E731
        lengths = tree_schedule(tree.survival, sps).lengths
        verdict = verify_tree(tree, logits, temp, draw_noise(r, spec.budget, V, g), lengths)
        for j, i in enumerate(live):
            seqs[i] += verdict.tokens[j, : int(verdict.num_emitted[j])].tolist()
        admitted, verified = admitted + int(lengths.sum()), verified + int(tree.count.sum())
        accepted += int(verdict.num_accepted.sum())
    assert 0.2 * verified < admitted < 0.9 * verified, (admitted, verified)  # partial trees
    assert accepted > 0.4 * N_SEQ * MAX_TOKENS / 4, accepted
    pairs = torch.tensor([(s[t], s[t + 1]) for s in seqs for t in range(MAX_TOKENS)])
    assert chi_square_p_value(pairs, torch.softmax(table, -1), min_df=100) > 1e-3
    assert chi_square_p_value(pairs, torch.softmax(drafted, -1), min_df=100) < 1e-6
