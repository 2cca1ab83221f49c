"""Algorithm 1 over draft-tree nodes: a pure-Python walk over nodes == the vectorised
one, admitted sets are subtrees, the chain is causal_schedule."""

import random

import pytest
import torch
from tree_helpers import block_inputs, small_drafter

from vllm_dspark.decode.tree import TreeSpec, chain_spec, draft_tree
from vllm_dspark.schedule.prefix import causal_schedule
from vllm_dspark.schedule.sps import SPSTable
from vllm_dspark.schedule.tree import admitted_nodes, tree_schedule

TABLES = [
    SPSTable(b=[1, 2, 4, 8, 16, 32, 64, 128], sps=[50, 45, 38, 28, 18, 10, 5.2, 2.6]),
    SPSTable(b=[1, 8, 16, 32, 64, 128], sps=[60, 60, 58, 40, 30, 20], max_capture_size=64),
    SPSTable(b=[1, 3, 5, 7, 9, 40, 128], sps=[30, 12, 29, 11, 28, 9, 2]),
]


def walk_reference(survival: torch.Tensor, sps_at) -> list[int]:
    """Algorithm 1, line by line, with nodes for positions: candidates sorted by a
    descending, ties by (request, node index); admit while Θ = τ·SPS(B) improves."""
    a = survival.tolist()
    R = len(a)
    cands = sorted(((r, i) for r in range(R) for i in range(len(a[r])) if a[r][i] > 0),
                   key=lambda ri: (-a[ri[0]][ri[1]], ri))
    ell, B, tau = [0] * R, R, float(R)
    best_theta, best = R * sps_at(R), [0] * R
    for r, i in cands:
        ell[r] = max(ell[r], i + 1)
        B += 1
        tau += a[r][i]
        theta = tau * sps_at(B)
        if theta > best_theta:
            best_theta, best = theta, list(ell)
        else:
            break
    return best


def trees(seed, r=9):
    m = small_drafter("gated", with_markov=True, gamma=5)
    base, hidden, anchors = block_inputs(m, r, 5, seed=seed)
    spec = TreeSpec(budget=12, width=3, branch_below=0.85)
    return draft_tree(base, hidden, anchors, None, m.markov_head, m.confidence_head, None,
                      spec), m, (base, hidden, anchors)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_admitted_nodes_are_subtrees_and_match_the_walk(seed):
    tree, _, _ = trees(seed)
    for table in TABLES:
        s = tree_schedule(tree.survival, table)
        assert s.lengths.tolist() == walk_reference(tree.survival, table.sps_at)
        assert int(s.batch) == tree.tokens.shape[0] + int(s.lengths.sum())  # B counts nodes
        mask = admitted_nodes(s.lengths, tree.tokens.shape[1])
        for r in range(tree.tokens.shape[0]):
            for i in mask[r].nonzero().flatten().tolist():
                p = int(tree.parents[r, i])
                assert p == -1 or bool(mask[r, p])  # ancestor-closed
            assert int(s.lengths[r]) <= int(tree.count[r])


def test_some_requests_get_partial_trees():
    tree, _, _ = trees(3, r=16)
    lengths = tree_schedule(tree.survival, TABLES[0]).lengths
    assert 0 < int(lengths.sum()) < int(tree.count.sum())
    assert len(set(lengths.tolist())) > 1


def test_chain_tree_is_causal_schedule():
    rng = random.Random(0)
    m = small_drafter("rnn", with_markov=True, gamma=6)
    for trial in range(8):
        r = rng.choice([1, 2, 5, 11])
        base, hidden, anchors = block_inputs(m, r, 6, seed=10 + trial)
        chain = draft_tree(base, hidden, anchors, None, m.markov_head, m.confidence_head,
                           [0.7, 1.4], chain_spec(6))
        for table in TABLES:
            want = causal_schedule(chain.confidence, table)
            got = tree_schedule(chain.survival, table)
            assert got.lengths.tolist() == want.lengths.tolist()
            assert float(got.theta) == float(want.theta)
