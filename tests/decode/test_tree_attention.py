"""The tree mask and positions: one tree-masked target pass gives every node the logits
of the sequential chain context + root + its path (HF Qwen3, float64)."""

import torch
from tree_helpers import tree_forward

from vllm_dspark.decode.tree_attention import (
    ancestor_mask,
    attention_mask_with_context,
    tree_positions,
)

# A hand-made tree over N = 7 (+ 2 padding): depth 1: 0, 1; 0 -> 2, 3; 2 -> 4; 1 -> 5; 4 -> 6.
PARENTS = torch.tensor([[-1, -1, 0, 0, 2, 1, 4, -1, -1]])
DEPTH = torch.tensor([[1, 1, 2, 2, 3, 2, 4, 0, 0]])


def path(parents: list[int], i: int) -> list[int]:
    out = []
    while i >= 0:
        out.append(i)
        i = parents[i]
    return out[::-1]


def test_ancestor_mask_is_path_membership():
    mask = ancestor_mask(PARENTS)[0]
    par = PARENTS[0].tolist()
    for i in range(len(par)):
        want = {0} | {1 + a for a in path(par, i)}
        assert set(mask[1 + i].nonzero().flatten().tolist()) == want, i
    assert mask[0].nonzero().flatten().tolist() == [0]


def test_ancestor_mask_batched_rows_are_independent():
    other = torch.tensor([[-1, 0, 1, 2, 3, 4, 5, 6, 7]])  # a chain: lower triangle
    both = ancestor_mask(torch.cat([PARENTS, other]))
    assert torch.equal(both[0], ancestor_mask(PARENTS)[0])
    assert torch.equal(both[1], torch.ones(10, 10, dtype=torch.bool).tril())


def test_positions_and_context():
    pos = tree_positions(DEPTH, torch.tensor([11]))
    assert pos.tolist() == [[11, 12, 12, 13, 13, 14, 13, 15, 11, 11]]
    full = attention_mask_with_context(PARENTS, 5)
    assert full.shape == (1, 10, 15) and bool(full[0, :, :5].all())
    assert torch.equal(full[0, :, 5:], ancestor_mask(PARENTS)[0])


@torch.no_grad()
def test_tree_forward_equals_per_path_forward(qwen3_target):
    _, qwen3 = qwen3_target
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(0, 384, (13,), generator=g).tolist()  # context 12 + root
    tokens = torch.randint(0, 384, (9,), generator=g)
    tokens[1] = tokens[0]  # siblings may not share a token, but other branches may
    tokens[5] = tokens[2]
    out = tree_forward(qwen3, seq, tokens, PARENTS[0], DEPTH[0], output_hidden_states=True)
    p = len(seq) - 1
    par = PARENTS[0].tolist()
    for i in range(-1, 7):  # the root and every real node
        nodes = path(par, i) if i >= 0 else []
        chain = torch.tensor([seq + tokens[nodes].tolist()])
        ref = qwen3(input_ids=chain, output_hidden_states=True)
        row = p + 1 + i
        torch.testing.assert_close(out.logits[0, row], ref.logits[0, -1], rtol=1e-9, atol=1e-9)
        for got, want in zip(out.hidden_states, ref.hidden_states):  # what compaction keeps
            torch.testing.assert_close(got[0, row], want[0, -1], rtol=1e-9, atol=1e-9)
    # the context rows are the plain causal forward's
    ref = qwen3(input_ids=torch.tensor([seq]))
    torch.testing.assert_close(out.logits[0, : p + 1], ref.logits[0], rtol=1e-9, atol=1e-9)

