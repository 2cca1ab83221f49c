"""Tree attention over a paged KV cache: reference == dense masked attention; kernel ==
reference (under TRITON_INTERPRET=1 on CPU, compiled on a GPU).

As in test_tree_accept.py, on CPU this file re-runs its kernel tests in a child pytest
with TRITON_INTERPRET=1 (set before triton is imported), so no other test sees it.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from checks import run_in_triton_interpreter

from vllm_dspark.decode.tree_attention import ancestor_mask
from vllm_dspark.kernels.tree_attention import tree_attention_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUN_KERNEL = torch.cuda.is_available() or INTERPRETED
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(seed, r=4, m=9, heads=4, kv_heads=2, d=12, block_size=16, max_ctx=45,
         dtype=torch.float32):
    """Random trees (n_r nodes, root first), contexts, and each request's K/V for its
    context + query rows scattered into a paged cache through a shuffled block table."""
    g = torch.Generator().manual_seed(seed)
    nodes = torch.randint(0, m, (r,), generator=g)  # query rows = nodes + 1 (root)
    nodes[0] = m - 1
    ctx = torch.randint(0, max_ctx + 1, (r,), generator=g)
    ctx[-1] = 0  # a request with nothing cached yet
    parents = torch.full((r, m - 1), -1, dtype=torch.long)
    for b in range(r):
        for i in range(int(nodes[b])):
            parents[b, i] = int(torch.randint(-1, i, (), generator=g)) if i else -1
    mask = ancestor_mask(parents)  # [R, M, M]
    lengths = ctx + nodes + 1
    per_req = -(-lengths // block_size)
    num_blocks = int(per_req.sum()) + 3
    order = torch.randperm(num_blocks, generator=g)
    table = torch.zeros(r, int(per_req.max()), dtype=torch.int32)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(dtype)
    dense, used = [], 0
    for b in range(r):
        blocks = order[used: used + int(per_req[b])]
        used += int(per_req[b])
        table[b, : len(blocks)] = blocks.int()
        pos = torch.arange(int(lengths[b]))
        dense.append((k_cache[blocks[pos // block_size], pos % block_size],
                      v_cache[blocks[pos // block_size], pos % block_size]))
    query_start = torch.cat([torch.zeros(1, dtype=torch.long), (nodes + 1).cumsum(0)])
    q = torch.randn(int(query_start[-1]), heads, d, generator=g).to(dtype)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, context_lens=ctx,
                query_start=query_start, tree_mask=mask, scale=d ** -0.5), dense


def test_reference_equals_dense_masked_attention():
    """Against torch's SDPA on each request's contiguous K/V with the mask [context |
    ancestors]: the paging, the mask and grouped-query heads are read as specified."""
    for seed in range(3):
        args, dense = case(seed)
        got = tree_attention_ref(**args)
        heads, kv_heads = args["q"].shape[1], args["k_cache"].shape[2]
        for b, (k, v) in enumerate(dense):
            lo, hi = int(args["query_start"][b]), int(args["query_start"][b + 1])
            ctx, nq = int(args["context_lens"][b]), hi - lo
            allowed = torch.ones(nq, ctx + nq, dtype=torch.bool)
            allowed[:, ctx:] = args["tree_mask"][b, :nq, :nq]
            q = args["q"][lo:hi].double().transpose(0, 1)  # [H, nq, D]
            k = k.double().repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
            v = v.double().repeat_interleave(heads // kv_heads, 1).transpose(0, 1)
            want = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed,
                                                  scale=args["scale"]).transpose(0, 1)
            torch.testing.assert_close(got[lo:hi].double(), want, atol=1e-5, rtol=1e-5)


def test_a_node_never_sees_another_branch():
    """Changing the K/V of a node off node i's path leaves row i unchanged."""
    args, _ = case(1, r=1, m=9, max_ctx=10)
    parents_free = args["tree_mask"][0]
    base = tree_attention_ref(**args)
    ctx = int(args["context_lens"][0])
    nq = int(args["query_start"][1])
    for j in range(1, nq):
        blocks = args["block_table"][0].long()
        p = ctx + j
        bumped = {**args, "k_cache": args["k_cache"].clone(), "v_cache": args["v_cache"].clone()}
        bs = args["k_cache"].shape[1]
        bumped["v_cache"][blocks[p // bs], p % bs] += 5.0
        out = tree_attention_ref(**bumped)
        for i in range(nq):
            changed = not torch.allclose(out[i], base[i])
            assert changed == bool(parents_free[i, j]), (i, j)


def test_auto_splits_keep_short_contexts_in_one_pass():
    """The measured policy (benchmarks/README.md, 2026-12-04): a context split only pays
    from MIN_SPLIT_TILES tiles per split; then as many splits as fill TARGET_PROGRAMS
    programs, at most MAX_SPLITS."""
    from vllm_dspark.kernels.tree_attention.kernel import (
        MAX_SPLITS, MIN_SPLIT_TILES, auto_splits,
    )

    assert MIN_SPLIT_TILES == 32 and MAX_SPLITS == 16
    assert auto_splits(3, 8) == 1 and auto_splits(3, 32) == 1  # ≤ 2048 positions: one pass
    assert auto_splits(3, 63) == 1 and auto_splits(3, 64) == 2
    assert auto_splits(3, 128) == 4 and auto_splits(3, 4096) == MAX_SPLITS
    assert auto_splits(128, 4096) == 2 and auto_splits(256, 4096) == 1  # grid already full
    assert auto_splits(1000, 0) == 1


def test_bad_inputs_are_refused():
    args, _ = case(0)
    with pytest.raises(ValueError, match="head_dim"):
        tree_attention_ref(**{**args, "q": args["q"][..., :5]})
    with pytest.raises(ValueError, match="query_start ends"):
        tree_attention_ref(**{**args, "q": args["q"][:-1]})
    with pytest.raises(ValueError, match="too few columns"):
        tree_attention_ref(**{**args, "block_table": args["block_table"][:, :1]})


if not RUN_KERNEL:

    def test_in_triton_interpreter():
        all_kernel_tests = r"8 passed, \d+ deselected(, \d+ warnings?)? in "
        run_in_triton_interpreter(__file__, "kernel_", all_kernel_tests, one_thread=True)

else:

    @pytest.fixture(scope="module")
    def kernel():
        from vllm_dspark.kernels.tree_attention import available, tree_attention_triton

        assert available(torch.device(DEVICE))
        return tree_attention_triton

    # head_dim 12 (under a power of two) and 64; block sizes 16 and 5 (keys of one tile
    # spanning blocks); MHA, GQA and MQA; contexts over several tiles of 64 keys; a tree
    # whose (row, grouped head) pairs fill several query tiles (33 rows × 4 heads = 132 >
    # 64), the last one partly; input checks skipped (the graphed path)
    SHAPES = [dict(), dict(d=64, kv_heads=4), dict(block_size=5, kv_heads=1),
              dict(max_ctx=150, m=17, r=3), dict(m=33, heads=8, kv_heads=2, max_ctx=70)]

    @pytest.mark.parametrize("shape", SHAPES,
                             ids=["gqa-d12", "mha-d64", "mqa-bs5", "long", "tiles"])
    def test_kernel_equals_reference(kernel, shape):
        for seed in range(2):
            args, _ = case(seed, **shape)
            args = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in args.items()}
            torch.testing.assert_close(kernel(**args, check=bool(seed)),
                                       tree_attention_ref(**args), atol=2e-5, rtol=2e-5)

    @pytest.mark.parametrize("splits", [2, 5])
    def test_kernel_context_splits(kernel, splits):
        """The context split over programs (flash-decoding), merged afterwards: equal to
        the reference, also where a split gets no context (short or empty contexts) and
        for bfloat16 inputs (the partials stay float32)."""
        for seed, shape in enumerate([dict(max_ctx=150, m=17, r=3), dict(), dict(kv_heads=1)]):
            args, _ = case(seed, **shape)
            args = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in args.items()}
            torch.testing.assert_close(kernel(**args, splits=splits),
                                       tree_attention_ref(**args), atol=2e-5, rtol=2e-5)
        args, _ = case(4, max_ctx=130, dtype=torch.bfloat16)
        args = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in args.items()}
        torch.testing.assert_close(kernel(**args, splits=splits).float(),
                                   tree_attention_ref(**args).float(), atol=2e-2, rtol=2e-2)
        with pytest.raises(ValueError, match="splits must be at least 1"):
            kernel(**args, splits=0)

    def test_kernel_bfloat16(kernel):
        args, _ = case(3, dtype=torch.bfloat16)
        args = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in args.items()}
        torch.testing.assert_close(kernel(**args).float(), tree_attention_ref(**args).float(),
                                   atol=2e-2, rtol=2e-2)
