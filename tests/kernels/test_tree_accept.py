"""The tree acceptance kernel == its torch reference == decode.tree_verify, draw for draw.

As in tests/schedule/test_triton_prefix.py: on CPU this file re-runs itself in a child
pytest with TRITON_INTERPRET=1 (set before triton is imported), so no other test sees
the variable; on a GPU the compiled kernel is checked directly. The reference is also
checked here against ``verify_tree`` (no interpreter needed).
"""

import os

import pytest
import torch
from checks import run_in_triton_interpreter
from tree_helpers import block_inputs, small_drafter

from vllm_dspark.decode.tree import TreeSpec, draft_tree
from vllm_dspark.decode.tree_verify import TreeNoise, verify_tree
from vllm_dspark.kernels.tree_accept import tree_accept_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUN_KERNEL = torch.cuda.is_available() or INTERPRETED
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TEMPS = [0.0, 1.0, 0.5, 0.0, 1.25, 0.75, 2.0]  # exact in float32: same l/T everywhere


def case(seed, r=7, v=53, spec=None, agree=0.6):
    """A drafted tree, target logits that agree with part of it, noise, admitted counts."""
    m = small_drafter("gated", with_markov=True, gamma=5)
    base, hidden, anchors = block_inputs(m, r, 5, seed=seed)
    spec = spec or TreeSpec(budget=13, width=3, branch_below=0.8)
    temp = torch.tensor([TEMPS[i % len(TEMPS)] for i in range(r)], dtype=torch.float32)
    tree = draft_tree(base, hidden, anchors, temp.double(), m.markov_head, m.confidence_head,
                      None, spec)
    g = torch.Generator().manual_seed(seed)
    n = tree.tokens.shape[1]
    logits = torch.randn(r, n + 1, v, generator=g)
    for b in range(r):  # the target's favourite at a node's parent is often the node
        for i in range(int(tree.count[b])):
            if float(torch.rand((), generator=g)) < agree:
                logits[b, int(tree.parents[b, i]) + 1, tree.tokens[b, i]] += 4.0
    gumbel = -torch.empty(r, n + 1, v).exponential_(generator=g).log()
    admitted = torch.randint(0, n + 1, (r,), generator=g).minimum(tree.count)
    admitted[0] = tree.count[0]
    return tree, logits, gumbel, admitted, temp


def same(a, b):
    for f in ("accepted", "num_accepted", "tokens", "num_emitted"):
        assert torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()), f


@pytest.mark.parametrize("seed", range(4))
def test_reference_equals_verify_tree(seed):
    tree, logits, gumbel, admitted, temp = case(seed)
    got = tree_accept_ref(logits, tree.tokens, tree.parents, admitted, temp, gumbel)
    want = verify_tree(tree, logits, temp.double(), TreeNoise(gumbel, None), admitted)
    same(got, want)
    assert int(got.num_accepted.sum()) > 0


def test_reference_greedy_without_noise():
    tree, logits, _, admitted, _ = case(9)
    zero = torch.zeros(7)
    same(tree_accept_ref(logits, tree.tokens, tree.parents, admitted, zero),
         verify_tree(tree, logits, None, admitted=admitted))
    with pytest.raises(ValueError, match="need gumbel"):
        tree_accept_ref(logits, tree.tokens, tree.parents, admitted, zero + 1)
    with pytest.raises(ValueError, match=r"\[R, N\+1, V\]"):
        tree_accept_ref(logits[:, 1:], tree.tokens, tree.parents, admitted, zero)


@pytest.mark.parametrize("seed", range(4))
def test_walk_over_draws_equals_the_reference(seed):
    """``walk_draws`` (every row drawn first, as V2's sampler draws; the reference's
    walk) makes the node-by-node walk of ``verify_tree``: the same verdict from the same
    noise, greedy rows included."""
    from vllm_dspark.decode.tree_verify import walk_draws

    tree, logits, gumbel, admitted, temp = case(seed)
    t = torch.where(temp > 0, temp, torch.ones_like(temp))[:, None, None]
    scores = torch.where(temp[:, None, None] > 0, logits / t + gumbel, logits)
    got = walk_draws(scores.argmax(-1), tree.tokens, tree.parents, admitted)
    same(got, verify_tree(tree, logits, temp.double(), TreeNoise(gumbel, None), admitted))
    assert int(got.num_accepted.sum()) > 0


if not RUN_KERNEL:

    def test_in_triton_interpreter():
        all_kernel_tests = r"11 passed, \d+ deselected(, \d+ warnings?)? in "
        run_in_triton_interpreter(__file__, "kernel_", all_kernel_tests, one_thread=True)

else:

    @pytest.fixture(scope="module")
    def kernel():
        from vllm_dspark.kernels.tree_accept import available, tree_accept_triton

        assert available(torch.device(DEVICE))
        return tree_accept_triton

    # (requests, vocabulary, spec): awkward sizes, a vocabulary over one argmax block,
    # a chain, a one-node tree
    SHAPES = [
        (7, 53, TreeSpec(budget=13, width=3, branch_below=0.8)),
        (3, 1500, TreeSpec(budget=9, width=2, branch_below=0.9)),
        (5, 53, TreeSpec(budget=5, width=1)),
        (2, 53, TreeSpec(budget=1, width=3)),
    ]

    @pytest.mark.parametrize("shape", SHAPES, ids=["r7-v53", "r3-v1500", "chain", "one-node"])
    def test_kernel_equals_reference(kernel, shape):
        r, v, spec = shape
        for seed in range(3):
            tree, logits, gumbel, admitted, temp = case(seed, r=r, v=v, spec=spec)
            args = [x.to(DEVICE) for x in (logits, tree.tokens, tree.parents, admitted, temp)]
            want = tree_accept_ref(*args, gumbel.to(DEVICE))
            same(kernel(*args, gumbel.to(DEVICE)), want)
            greedy = torch.zeros_like(args[-1])
            same(kernel(*args[:-1], greedy), tree_accept_ref(*args[:-1], greedy))

    def test_kernel_ties_take_the_lowest_index(kernel):
        tree, logits, _, admitted, _ = case(5, v=1500)
        logits = torch.zeros_like(logits)
        logits[:, :, 500] = 1.0  # ties within the first argmax block (1024 wide) ...
        logits[:, :, 700] = 1.0
        logits[:, :, 1300] = 1.0  # ... and across blocks
        # On the kernel's device (a CPU tensor given to a CUDA launch is refused).
        args = [x.to(DEVICE) for x in (logits, tree.tokens, tree.parents, admitted,
                                       torch.zeros(7))]
        got = kernel(*args)
        same(got, tree_accept_ref(*args))
        assert bool((got.tokens[got.tokens >= 0] == 500).all())

    def test_kernel_empty_batch(kernel):
        z = torch.zeros(0, 4, dtype=torch.long)
        got = kernel(torch.zeros(0, 5, 11), z, z, torch.zeros(0, dtype=torch.long),
                     torch.zeros(0))
        assert got.tokens.shape == (0, 5)



    @pytest.mark.parametrize("shape", SHAPES, ids=["r7-v53", "r3-v1500", "chain", "one-node"])
    def test_kernel_walk_over_draws_equals_the_reference(shape):
        """The V2 tree step's walk (every row drawn first) as one launch: the verdict of
        ``decode.tree_verify.walk_draws`` at T = 0 and T > 0."""
        from vllm_dspark.decode.tree_verify import walk_draws
        from vllm_dspark.kernels.tree_accept import walk_draws_triton

        r, v, spec = shape
        for seed in range(3):
            tree, logits, gumbel, admitted, temp = case(seed, r=r, v=v, spec=spec)
            t = torch.where(temp > 0, temp, torch.ones_like(temp))[:, None, None]
            draws = torch.where(temp[:, None, None] > 0, logits / t + gumbel, logits).argmax(-1)
            args = [x.to(DEVICE) for x in (draws, tree.tokens, tree.parents, admitted)]
            got = walk_draws_triton(*args)
            same(got, walk_draws(*args))
            if (r, v) == (7, 53):  # the draws agree with part of these trees
                assert int(got.num_accepted.sum()) > 0

    def test_kernel_walk_over_draws_empty_batch_and_shapes():
        from vllm_dspark.kernels.tree_accept import walk_draws_triton

        z = torch.zeros(0, 4, dtype=torch.long, device=DEVICE)
        got = walk_draws_triton(torch.zeros(0, 5, dtype=torch.long, device=DEVICE), z, z,
                                torch.zeros(0, dtype=torch.long, device=DEVICE))
        assert got.tokens.shape == (0, 5)
        with pytest.raises(ValueError, match=r"draws \[R, N\+1\]"):
            walk_draws_triton(z, z, z, torch.zeros(0, dtype=torch.long, device=DEVICE))
