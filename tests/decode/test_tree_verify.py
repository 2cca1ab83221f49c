"""Tree acceptance: the greedy walk against its definition, and at T > 0 one verified
node emits exactly the target's distribution (chi-square, p > 1e-3, with a power check)
for a fixed candidate set and for sampled children under recursive rejection."""

import pytest
import torch
from tree_helpers import block_inputs, small_drafter

from vllm_dspark.decode.tree import DraftTree, TreeSpec, draft_tree
from vllm_dspark.decode.tree_verify import draw_noise, kept_rows, verify_tree


def hand_tree():
    """depth 1: nodes 0 (tok 5), 1 (tok 7); 0 -> 2 (tok 9), 3 (tok 4); 2 -> 4 (tok 1)."""
    parents = torch.tensor([[-1, -1, 0, 0, 2, -1]])
    return DraftTree(
        tokens=torch.tensor([[5, 7, 9, 4, 1, 0]]), parents=parents,
        depth=torch.tensor([[1, 1, 2, 2, 3, 0]]), sibling=torch.tensor([[0, 1, 0, 1, 0, 0]]),
        confidence=torch.ones(1, 6), survival=torch.ones(1, 6, dtype=torch.float64),
        count=torch.tensor([5]), probs=None, sampled=False)


def one_hot_logits(argmax_per_row, v=11):
    logits = torch.zeros(1, len(argmax_per_row), v)
    for row, x in enumerate(argmax_per_row):
        logits[0, row, x] = 3.0
    return logits


def test_greedy_walks_the_argmax_path():
    tree = hand_tree()
    # rows: root -> 5 (node 0), node 0 -> 9 (node 2), node 2 -> 1 (node 4), node 4 -> 3
    logits = one_hot_logits([5, 9, 10, 1, 10, 3, 10])  # row 1 + i: at node i
    v = verify_tree(tree, logits, None)
    assert v.accepted.tolist() == [[0, 2, 4, -1, -1, -1]] and v.num_accepted.tolist() == [3]
    assert v.tokens.tolist() == [[5, 9, 1, 3, -1, -1, -1]] and v.num_emitted.tolist() == [4]
    assert kept_rows(v).tolist() == [[0, 1, 3, 5, -1, -1, -1]]
    # only the first 2 nodes admitted: node 2 is not verified, the target's 9 is the bonus
    v = verify_tree(tree, logits, None, admitted=torch.tensor([2]))
    assert v.accepted.tolist()[0][:2] == [0, -1] and v.tokens.tolist()[0][:2] == [5, 9]
    # a miss at the root: nothing accepted, the argmax is emitted
    v = verify_tree(tree, one_hot_logits([6, 0, 0, 0, 0, 0, 0]), None)
    assert v.num_accepted.tolist() == [0] and v.tokens[0, 0] == 6


def random_tree(r=6, spec=None, temp=None, seed=0, gamma=5):
    m = small_drafter("rnn", with_markov=True, gamma=gamma)
    base, hidden, anchors = block_inputs(m, r, gamma, seed=seed)
    spec = spec or TreeSpec(budget=13, width=3, branch_below=0.8)
    return draft_tree(base, hidden, anchors, temp, m.markov_head, m.confidence_head, None, spec,
                      torch.Generator().manual_seed(seed))


def test_greedy_is_the_longest_matching_path():
    """Against the definition, on random trees whose target agrees with some drafts."""
    g = torch.Generator().manual_seed(1)
    for seed in range(4):
        tree = random_tree(seed=seed)
        r, n = tree.tokens.shape
        logits = torch.randn(r, n + 1, 53, generator=g)
        # make the target's argmax at a random half of the nodes' parents equal the node
        for b in range(r):
            for i in torch.randperm(int(tree.count[b]), generator=g)[: n // 2].tolist():
                logits[b, int(tree.parents[b, i]) + 1, tree.tokens[b, i]] = 10.0
        admitted = torch.randint(0, n + 1, (r,), generator=g).minimum(tree.count)
        v = verify_tree(tree, logits, None, admitted=admitted)
        for b in range(r):
            best = []
            for i in range(int(admitted[b])):  # every admitted node's path, if it matches
                path, j = [], i
                while j >= 0:
                    path.append(j)
                    j = int(tree.parents[b, j])
                path = path[::-1]
                rows = [0] + [k + 1 for k in path[:-1]]
                if all(int(logits[b, row].argmax()) == int(tree.tokens[b, k])
                       for row, k in zip(rows, path)) and len(path) > len(best):
                    best = path
            a = int(v.num_accepted[b])
            assert v.accepted[b, :a].tolist() == best
            last = best[-1] + 1 if best else 0
            assert int(v.tokens[b, a]) == int(logits[b, last].argmax())
            assert v.tokens[b, :a].tolist() == tree.tokens[b, best].tolist()


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of counts [V] against probs [V]; cells with expectation < 5 pooled."""
    n = counts.sum()
    exp = n * probs.double()
    big = exp >= 5
    o = torch.cat([counts[big], counts[~big].sum()[None]])
    e = torch.cat([exp[big], exp[~big].sum()[None]])
    keep = e > 0
    stat = float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
    df = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


@pytest.mark.parametrize("sampled,admit", [(False, 3), (False, 1), (True, 3), (True, 2)],
                         ids=["topk-all", "topk-1", "sampled-all", "sampled-2"])
def test_one_node_emits_the_target_distribution(sampled, admit):
    """The root's emitted token over many requests: ~ p, not ~ q (the drafter's)."""
    n_req, v = 6000, 53
    m = small_drafter("vanilla", rank=4, gamma=1)
    base, hidden, anchors = block_inputs(m, 1, 1, seed=3)
    spec = TreeSpec(budget=3, width=3, branch_below=1.0, sample_children=sampled)
    temp = torch.ones(n_req, dtype=torch.float64)
    tree = draft_tree((base * 1.5).expand(n_req, -1, -1), hidden.expand(n_req, -1, -1),
                      anchors.expand(n_req), temp, m.markov_head, m.confidence_head, None, spec,
                      torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(5)
    target = torch.randn(v, generator=g).expand(n_req, 4, v).contiguous()
    # near the drafter's q (q's best token has 0.52), so acceptance is not rare
    q = tree.probs[0, 0]
    target[:, 0] += q.log()
    p = torch.softmax(target[0, 0], -1)
    noise = draw_noise(n_req, 3, v, g)
    out = verify_tree(tree, target, temp, noise, admitted=torch.full((n_req,), admit))
    first = out.tokens[:, 0]
    accepted = float((out.num_accepted > 0).double().mean())
    assert 0.2 < accepted < 0.95, accepted
    counts = torch.bincount(first, minlength=v).double()
    assert chi_square(counts, p) > 1e-3
    assert chi_square(counts, q) < 1e-6  # the test can tell p from the drafter's q
