"""Tree drafting: the batched builder against the best-first reference, the chain as the
special case, the tree's invariants, the branching rule and sampled children's q."""

import pytest
import torch
from tree_helpers import block_inputs, small_drafter

from vllm_dspark.decode.draft import sample_block
from vllm_dspark.decode.tree import TreeSpec, chain_spec, draft_tree, without_earlier_siblings
from vllm_dspark.decode.tree_naive import draft_tree_naive

STS = [0.8, 1.3, 1.0, 0.6]
INTS = ("tokens", "parents", "depth", "sibling", "count")


def heads(m):
    return m.markov_head, m.confidence_head


def assert_same_tree(batched, naive, r):
    for f in INTS:
        assert torch.equal(getattr(batched, f)[r], getattr(naive, f)[0]), f
    for f in ("confidence", "survival"):  # batched vs single matmuls: last bits only
        torch.testing.assert_close(getattr(batched, f)[r], getattr(naive, f)[0],
                                   rtol=1e-6, atol=1e-7)
    if naive.probs is not None:
        torch.testing.assert_close(batched.probs[r], naive.probs[0], rtol=1e-6, atol=1e-7)


CASES = [  # (head type, rank, confidence head, with_markov, spec)
    ("vanilla", 8, True, False, TreeSpec(budget=11, width=3, branch_below=0.7)),
    ("gated", 8, True, True, TreeSpec(budget=7, width=2, branch_below=0.9)),
    ("rnn", 6, True, True, TreeSpec(budget=13, width=4, branch_below=0.6)),
    ("vanilla", 0, True, False, TreeSpec(budget=9, width=3, branch_below=0.8)),  # no Markov
    ("rnn", 6, False, False, TreeSpec(budget=10, width=3, branch_below=0.5)),  # no head: max q
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-r{c[1]}-conf{int(c[2])}")
@pytest.mark.parametrize("stochastic", [False, True], ids=["greedy", "T>0"])
def test_batched_equals_best_first_reference(case, stochastic):
    head_type, rank, conf, with_markov, spec = case
    m = small_drafter(head_type, rank=rank, confidence=conf, with_markov=with_markov)
    base, hidden, anchors = block_inputs(m, 5, 5, seed=1)
    temp = torch.tensor([0.0, 1.0, 0.7, 1.6, 0.0], dtype=torch.float64) if stochastic else None
    tree = draft_tree(base, hidden, anchors, temp, *heads(m), STS, spec)
    for r in range(5):
        t = None if temp is None else float(temp[r])
        ref = draft_tree_naive(base[r], hidden[r], int(anchors[r]), t, *heads(m), STS, spec)
        assert_same_tree(tree, ref, r)
    assert bool((tree.count > 1).all()) and bool((tree.depth.amax(1) > 1).all())
    assert bool((tree.sibling > 0).any()), "the case should branch somewhere"


@pytest.mark.parametrize("case", CASES + [("gated", 8, True, True, TreeSpec(budget=5))],
                         ids=lambda c: f"{c[0]}-r{c[1]}-conf{int(c[2])}-n{c[4].budget}")
@pytest.mark.parametrize("stochastic", [False, True], ids=["greedy", "T>0"])
def test_graph_safe_tree_is_the_same_tree(case, stochastic):
    """The CUDA-graph-safe build (no host sync, the V2 speculator's) drafts the same nodes
    as the default build at any temperature (top-k children); it keeps no q. The last
    case is the V2 tree mode's shape: the N best nodes at the chain's width."""
    head_type, rank, conf, with_markov, spec = case
    m = small_drafter(head_type, rank=rank, confidence=conf, with_markov=with_markov)
    base, hidden, anchors = block_inputs(m, 5, 5, seed=3)
    temp = torch.tensor([0.0, 1.0, 0.7, 1.6, 0.0]) if stochastic else None
    want = draft_tree(base, hidden, anchors, temp, *heads(m), STS, spec)
    got = draft_tree(base, hidden, anchors, temp, *heads(m), STS, spec, graph_safe=True)
    for f in INTS + ("confidence", "survival"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert got.probs is None and not got.sampled
    with pytest.raises(ValueError, match="sample_children"):
        draft_tree(base, hidden, anchors, temp, *heads(m), STS,
                   TreeSpec(budget=4, sample_children=True), graph_safe=True)


@pytest.mark.parametrize("head_type", ["vanilla", "gated", "rnn"])
def test_chain_is_sample_blocks_greedy_block(head_type):
    m = small_drafter(head_type, gamma=5, with_markov=head_type != "vanilla")
    base, hidden, anchors = block_inputs(m, 6, 5, seed=2)
    tree = draft_tree(base, hidden, anchors, None, *heads(m), STS, chain_spec(5))
    block = sample_block(base, hidden, anchors, None, *heads(m), STS)
    assert torch.equal(tree.tokens, block.tokens)
    assert torch.equal(tree.parents, torch.arange(-1, 4).expand(6, -1))
    assert torch.equal(tree.depth, torch.arange(1, 6).expand(6, -1))
    torch.testing.assert_close(tree.confidence, block.confidence, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(tree.survival, torch.cumprod(tree.confidence.double(), 1),
                               rtol=0, atol=0)
    # budget beyond γ: still γ nodes, then padding
    wide = draft_tree(base, hidden, anchors, None, *heads(m), STS, TreeSpec(budget=8, width=1))
    assert wide.count.tolist() == [5] * 6 and torch.equal(wide.tokens[:, :5], block.tokens)
    assert bool((wide.parents[:, 5:] == -1).all()) and not bool(wide.survival[:, 5:].any())


def test_never_branching_is_the_chain_too():
    m = small_drafter("rnn", with_markov=True)
    base, hidden, anchors = block_inputs(m, 3, 5, seed=3)
    never = draft_tree(base, hidden, anchors, None, *heads(m), STS,
                       TreeSpec(budget=5, width=4, branch_below=0.0))
    chain = draft_tree(base, hidden, anchors, None, *heads(m), STS, chain_spec(5))
    assert torch.equal(never.tokens, chain.tokens)


@pytest.mark.parametrize("sample_children", [False, True])
def test_tree_invariants(sample_children):
    m = small_drafter("rnn", with_markov=True, gamma=6)
    base, hidden, anchors = block_inputs(m, 7, 6, seed=4)
    temp = torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0, 1.0, 0.9], dtype=torch.float64)
    spec = TreeSpec(budget=17, width=3, branch_below=0.75, sample_children=sample_children)
    tree = draft_tree(base, hidden, anchors, temp, *heads(m), None, spec,
                      torch.Generator().manual_seed(0))
    assert tree.sampled == sample_children
    for r in range(7):
        n = int(tree.count[r])
        par, dep = tree.parents[r].tolist(), tree.depth[r].tolist()
        s = tree.survival[r]
        kids = {}
        for i in range(n):
            p = par[i]
            assert p < i  # topological
            assert dep[i] == (dep[p] + 1 if p >= 0 else 1)
            parent_s = float(s[p]) if p >= 0 else 1.0
            assert float(s[i]) == parent_s * float(tree.confidence[r, i])
            kids.setdefault(p, []).append(i)
        assert bool((s[:n - 1] >= s[1:n]).all())  # survival order: prefixes are subtrees
        for ks in kids.values():  # siblings: distinct tokens
            toks = tree.tokens[r, ks].tolist()
            assert len(set(toks)) == len(toks)
            ranks = sorted(tree.sibling[r, ks].tolist())
            if sample_children and temp[r] > 0:  # admitted draws are a draw-order prefix
                assert ranks == list(range(len(ranks)))
        q = tree.probs[r, :n]
        torch.testing.assert_close(q.sum(-1), torch.ones(n), rtol=0, atol=1e-5)
        assert bool((q.gather(1, tree.tokens[r, :n, None]) > 0).all())


def test_branching_rule_values():
    """Deterministic children share what the best child leaves in proportion to q; sampled
    ones get c(1-c)^j whatever was drawn; high confidence gives one child."""
    m = small_drafter("vanilla", rank=8, gamma=1)
    base, hidden, anchors = block_inputs(m, 4, 1, seed=6)
    spec = TreeSpec(budget=3, width=3, branch_below=1.0)  # always branch
    temp = torch.full((4,), 0.8, dtype=torch.float64)
    top = draft_tree(base, hidden, anchors, temp, *heads(m), None, spec)
    q = top.probs[:, 0].double()  # siblings share their parent's q
    order = top.sibling.argsort(1)
    qx = q.gather(1, top.tokens).gather(1, order)
    e = top.confidence.double().gather(1, order)
    c = e[:, 0]  # the best child's: the head's confidence
    head_c = sample_block(base, hidden, anchors, None, *heads(m)).confidence[:, 0]
    torch.testing.assert_close(c.float(), head_c, rtol=1e-6, atol=0)
    want = torch.cat([c[:, None], (1 - c[:, None]) * qx[:, 1:] / (1 - qx[:, :1])], 1)
    torch.testing.assert_close(e, want, rtol=1e-6, atol=0)
    assert torch.equal(top.tokens.gather(1, order), q.topk(3).indices)
    sampled = draft_tree(base, hidden, anchors, temp, *heads(m), None,
                         TreeSpec(budget=3, width=3, branch_below=1.0, sample_children=True),
                         torch.Generator().manual_seed(1))
    e = sampled.confidence.double().gather(1, sampled.sibling.argsort(1))
    c = e[:, :1]
    torch.testing.assert_close(e, c * (1 - c) ** torch.arange(3), rtol=1e-6, atol=0)
    one = draft_tree(base, hidden, anchors, temp, *heads(m), None,
                     TreeSpec(budget=3, width=3, branch_below=0.0))
    assert one.count.tolist() == [1] * 4


def test_sampled_children_are_draws_without_replacement():
    """Root children of one fixed distribution: the first draw ~ q, the second ~ q with the
    first removed (chi-square over all pairs, alpha = 1e-3), each node's q as recorded."""
    m = small_drafter("vanilla", rank=4, gamma=1)
    base, hidden, anchors = block_inputs(m, 1, 1, seed=7)
    n = 20000
    spec = TreeSpec(budget=2, width=2, branch_below=1.0, sample_children=True)
    tree = draft_tree((base * 0.15).expand(n, -1, -1), hidden.expand(n, -1, -1),
                      anchors.expand(n), torch.ones(n, dtype=torch.float64), *heads(m), None,
                      spec, torch.Generator().manual_seed(2))
    assert tree.count.tolist() == [2] * n
    first = tree.sibling.argsort(1)
    toks = tree.tokens.gather(1, first)
    q = tree.probs[0, first[0, 0]].double()
    torch.testing.assert_close(tree.probs.gather(1, first[..., None].expand(-1, -1, 53))[:, 1],
                               without_earlier_siblings(q.float().expand(n, -1),
                                                        toks[:, :1], 1))
    # joint law of the ordered pair: q(a) q(b) / (1 - q(a))
    pair = q[:, None] * q[None, :] / (1 - q[:, None])
    pair.fill_diagonal_(0)
    counts = torch.zeros(53, 53, dtype=torch.float64)
    counts.index_put_((toks[:, 0], toks[:, 1]), torch.ones(n, dtype=torch.float64),
                      accumulate=True)
    exp = n * pair
    big = exp >= 5
    obs_cells = torch.cat([counts[big], counts[~big].sum()[None]])
    exp_cells = torch.cat([exp[big], exp[~big].sum()[None]])
    stat = float(((obs_cells - exp_cells) ** 2 / exp_cells).sum())
    df = obs_cells.numel() - 1
    p = float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))
    assert df > 20 and p > 1e-3, (df, stat, p)


def test_bad_spec():
    with pytest.raises(ValueError, match="budget >= 1"):
        TreeSpec(budget=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (CUDA graphs)")
@pytest.mark.parametrize("head_type", ["vanilla", "rnn"])
def test_graph_safe_tree_replays_in_a_cuda_graph(head_type):
    """Captured once in a CUDA graph, the graph-safe build drafts, for new inputs copied
    into the captured buffers, the tree the eager build drafts."""
    m = small_drafter(head_type, with_markov=True)
    spec = TreeSpec(budget=5)
    # Both blocks' inputs from the float64 model on the CPU (block_inputs draws there),
    # then the model and inputs in float32 on the GPU.
    first, second = (tuple(x.cuda() for x in block_inputs(m, 4, 5, seed=s)) for s in (4, 5))
    m = m.float().cuda()
    base, hidden, anchors = first
    base, hidden = base.float(), hidden.float()
    temp = torch.tensor([0.0, 1.0, 0.7, 0.0], device="cuda")
    static = [base.clone(), hidden.clone(), anchors.clone(), temp.clone()]
    run = lambda: draft_tree(*static, *heads(m), STS, spec, graph_safe=True)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    b2, h2, a2 = second
    for buf, new in zip(static, (b2.float(), h2.float(), a2, temp.flip(0))):
        buf.copy_(new)
    graph.replay()
    want = draft_tree(b2.float(), h2.float(), a2, temp.flip(0), *heads(m), STS, spec)
    for f in INTS + ("confidence", "survival"):
        assert torch.equal(getattr(out, f), getattr(want, f)), f
