"""KV compaction after tree verification: the reference moves exactly the kept rows, and
attention over the compacted cache (a chain) equals the tree attention of the accepted
leaf before it; the kernel == the reference (under TRITON_INTERPRET=1 on CPU).
"""

import os
from types import SimpleNamespace

import pytest
import torch
from checks import run_in_triton_interpreter
from test_paged_tree_attention import case

from vllm_dspark.decode.tree_verify import kept_rows
from vllm_dspark.kernels.kv_compact import compact_kv_ref
from vllm_dspark.kernels.tree_attention import tree_attention_ref

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
RUN_KERNEL = torch.cuda.is_available() or INTERPRETED
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def accepted_paths(args, seed):
    """Per request a random root-to-node path of its tree (node indices, -1 after), read
    from the ancestor mask: the nodes that a chosen node attends to, in order."""
    g = torch.Generator().manual_seed(seed)
    mask = args["tree_mask"]
    counts = args["query_start"][1:] - args["query_start"][:-1]
    r, m = mask.shape[0], mask.shape[1]
    accepted = torch.full((r, m - 1), -1, dtype=torch.long)
    for b in range(r):
        n = int(counts[b]) - 1
        if n == 0:
            continue
        leaf = int(torch.randint(0, n + 1, (), generator=g)) - 1  # -1: nothing accepted
        if leaf >= 0:
            path = [j - 1 for j in range(1, leaf + 2) if mask[b, leaf + 1, j]]
            accepted[b, : len(path)] = torch.tensor(path)
    num = (accepted >= 0).sum(1)
    return kept_rows(SimpleNamespace(accepted=accepted)), num + 1


def test_reference_moves_the_kept_rows_and_nothing_else():
    for seed in range(3):
        args, _ = case(seed)
        kept, num = accepted_paths(args, seed)
        k, v = args["k_cache"].clone(), args["v_cache"].clone()
        compact_kv_ref(k, v, args["block_table"], args["context_lens"], kept, num)
        bs = k.shape[1]
        touched = torch.zeros(k.shape[:2], dtype=torch.bool)
        for b in range(len(num)):
            ctx, table = int(args["context_lens"][b]), args["block_table"][b].long()
            for i in range(int(num[b])):
                src, dst = ctx + int(kept[b, i]), ctx + i
                sb, db = table[src // bs], table[dst // bs]
                assert torch.equal(k[db, dst % bs], args["k_cache"][sb, src % bs])
                assert torch.equal(v[db, dst % bs], args["v_cache"][sb, src % bs])
                touched[db, dst % bs] = True
        assert torch.equal(k[~touched], args["k_cache"][~touched])
        assert torch.equal(v[~touched], args["v_cache"][~touched])


def test_the_compacted_chain_attends_as_the_tree_did():
    """The accepted leaf's query over the tree (before) == the same query as the last row
    of a chain over the compacted rows (after): what the next step will see."""
    for seed in range(3):
        args, _ = case(seed, m=9)
        kept, num = accepted_paths(args, seed)
        before = tree_attention_ref(**args)
        k, v = args["k_cache"].clone(), args["v_cache"].clone()
        compact_kv_ref(k, v, args["block_table"], args["context_lens"], kept, num)
        for b in range(len(num)):
            n = int(num[b])
            q = args["q"][int(args["query_start"][b]) + int(kept[b, n - 1])][None]
            chain = torch.zeros(1, 1, args["tree_mask"].shape[1], args["tree_mask"].shape[1],
                                dtype=torch.bool)
            chain[0, 0, :n, :n] = True  # the leaf (row n-1) sees rows 0..n-1
            last = {"q": q.repeat(n, 1, 1), "k_cache": k, "v_cache": v,
                    "block_table": args["block_table"][b: b + 1],
                    "context_lens": args["context_lens"][b: b + 1],
                    "query_start": torch.tensor([0, n]), "tree_mask": chain[0], "scale":
                    args["scale"]}
            after = tree_attention_ref(**last)[n - 1]
            want = before[int(args["query_start"][b]) + int(kept[b, n - 1])]
            torch.testing.assert_close(after, want, atol=1e-6, rtol=1e-6)


def test_layer_offsets_refuse_layers_of_another_layout():
    from vllm_dspark.engine.v2.tree_step import flash_attn_kv_views
    from vllm_dspark.kernels.kv_compact import layer_offsets

    a, b = torch.zeros(3, 2, 4, 16), torch.zeros(3, 2, 4, 16)
    offsets = layer_offsets([flash_attn_kv_views(a, 8), flash_attn_kv_views(b, 8)])
    assert offsets.tolist() == [[0, 8], [(b.data_ptr() - a.data_ptr()) // 4,
                                         (b.data_ptr() - a.data_ptr()) // 4 + 8]]
    with pytest.raises(ValueError, match="layer 1's caches differ"):
        layer_offsets([flash_attn_kv_views(a, 8), flash_attn_kv_views(torch.zeros(4, 2, 4, 16), 8)])
    with pytest.raises(ValueError, match="layer 1's caches differ"):
        layer_offsets([flash_attn_kv_views(a, 8), flash_attn_kv_views(b.half(), 8)])


def test_bad_inputs_are_refused():
    args, _ = case(0)
    kept, num = accepted_paths(args, 0)
    bad = kept.clone()
    bad[0, 1:3] = torch.tensor([0, 0])
    with pytest.raises(ValueError, match="path order"):
        compact_kv_ref(args["k_cache"], args["v_cache"], args["block_table"],
                       args["context_lens"], bad, torch.full_like(num, 3))
    with pytest.raises(ValueError, match="0..N"):
        compact_kv_ref(args["k_cache"], args["v_cache"], args["block_table"],
                       args["context_lens"], kept, num + 100)


if not RUN_KERNEL:

    def test_in_triton_interpreter():
        run_in_triton_interpreter(__file__, "kernel_",
                                  r"4 passed, \d+ deselected(, \d+ warnings?)? in ",
                                  one_thread=True)

else:

    @pytest.mark.parametrize("shape", [dict(), dict(block_size=5, kv_heads=1, d=64),
                                       dict(max_ctx=100, m=17, r=3)],
                             ids=["gqa-d12", "bs5-d64", "long"])
    def test_kernel_equals_reference(shape):
        from vllm_dspark.kernels.kv_compact import available, compact_kv_triton

        assert available(torch.device(DEVICE))
        for seed in range(2):
            args, _ = case(seed, **shape)
            kept, num = accepted_paths(args, seed)
            want_k, want_v = args["k_cache"].clone(), args["v_cache"].clone()
            compact_kv_ref(want_k, want_v, args["block_table"], args["context_lens"], kept, num)
            k, v = args["k_cache"].to(DEVICE), args["v_cache"].to(DEVICE)
            compact_kv_triton(k, v, args["block_table"].to(DEVICE),
                              args["context_lens"].to(DEVICE), kept.to(DEVICE), num.to(DEVICE))
            assert torch.equal(k.cpu(), want_k) and torch.equal(v.cpu(), want_v)

    def test_kernel_on_many_layers_equals_the_reference_per_layer():
        """Every layer in one launch (``compact_kv_layers``): vLLM's FlashAttention layout,
        K and V as strided views of one tensor per layer, layers in separate tensors."""
        from vllm_dspark.engine.v2.tree_step import flash_attn_kv_views
        from vllm_dspark.kernels.kv_compact import compact_kv_layers, layer_offsets

        for seed in range(2):
            args, _ = case(seed, d=16)
            kept, num = accepted_paths(args, seed)
            g = torch.Generator().manual_seed(seed)
            blocks, bs, heads, d = args["k_cache"].shape
            layers = [torch.randn(blocks, heads, bs, 2 * d, generator=g) for _ in range(3)]
            want = [x.clone() for x in layers]
            for x in want:
                k, v = flash_attn_kv_views(x, d)
                compact_kv_ref(k, v, args["block_table"], args["context_lens"], kept, num)
            got = [x.to(DEVICE) for x in layers]
            views = [flash_attn_kv_views(x, d) for x in got]
            compact_kv_layers(views, args["block_table"].to(DEVICE),
                              args["context_lens"].to(DEVICE), kept.to(DEVICE),
                              num.to(DEVICE), offsets=layer_offsets(views))
            for x, w in zip(got, want):
                assert torch.equal(x.cpu(), w)
