"""The target's tree attention on V2 (``engine/v2/tree_attention.py``), on CPU: a
causal stand-in for vLLM 0.32's FlashAttention (its forward's signature and its KV
layout [blocks, kv_heads, block_size, 2·head_dim]) wrapped by ``with_tree_rows``. Tree
requests' rows must come out as dense attention over [context, ancestors, self] computed
from the raw K/V; a prefill chunk in the same step keeps its causal rows."""

import torch
from paged_toy import CausalFlash, dense_attention

from vllm_dspark.decode.tree_attention import ancestor_mask
from vllm_dspark.engine.v2 import tree_attention as ta
from vllm_dspark.engine.v2.tree_step import flash_attn_kv_views

BS, KVH, H, D = 4, 2, 4, 8


def test_tree_rows_get_tree_attention_and_the_rest_stays_causal(monkeypatch):
    g = torch.Generator().manual_seed(0)
    # batch rows: a tree of 4 nodes (all admitted), a prefill chunk (6 rows, 1 logits row), a tree
    # (2 of its 4 nodes admitted); request states shuffled
    context = torch.tensor([9, 5, 3])
    query_len = torch.tensor([1 + 4, 6, 1 + 2])
    num_logits = torch.tensor([1 + 4, 1, 1 + 2])
    idx = torch.tensor([2, 0, 1], dtype=torch.int32)
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), query_len.cumsum(0)]).int()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), num_logits.cumsum(0)]).int()
    parents = torch.tensor([[-1, 0, 1, 0], [-1, -1, 0, 2], [-1, 0, -1, 1]])  # by state
    num_computed = torch.zeros(3, dtype=torch.long)
    num_computed[idx.long()] = context
    seq = context + query_len
    per_req = int((-(-seq // BS)).max())
    table = torch.randperm(3 * per_req + 2, generator=g)[: 3 * per_req].view(3, per_req).int()
    t = int(qsl[-1])
    pos = torch.cat([torch.arange(int(c), int(s)) for c, s in zip(context, seq)])
    b_of = torch.searchsorted(qsl[1:].long(), torch.arange(t), right=True)
    slots = table[b_of, pos // BS].long() * BS + pos % BS
    kv = torch.zeros(3 * per_req + 2, KVH, BS, 2 * D)
    kc, vc = flash_attn_kv_views(kv, D)
    ctx_k = torch.randn(3, 16, KVH, D, generator=g)  # the cached context of each request
    ctx_v = torch.randn(3, 16, KVH, D, generator=g)
    for r in range(3):
        p = torch.arange(int(context[r]))
        kc[table[r, p // BS].long(), p % BS] = ctx_k[r, : len(p)]
        vc[table[r, p // BS].long(), p % BS] = ctx_v[r, : len(p)]
    q = torch.randn(t, H, D, generator=g)
    k = torch.randn(t, KVH, D, generator=g)
    v = torch.randn(t, KVH, D, generator=g)
    md = type("Md", (), dict(slot_mapping=slots, block_table=table, query_start_loc=qsl,
                             seq_lens=seq))()
    impl = CausalFlash(D)

    ta.set_step(None)
    causal = impl.forward(None, q, k, v, kv.clone(), md, torch.zeros(t, H * D))
    step = ta.tree_rows(qsl, cu, idx, num_computed, parents)
    assert step.reqs.tolist() == [0, 2] and step.rows.tolist() == [0, 1, 2, 3, 4, 11, 12, 13]
    ta.set_step(step)
    try:
        out = impl.forward(None, q, k, v, kv, md, torch.zeros(t, H * D)).view(t, H, D)
    finally:
        ta.set_step(None)
    prefill = slice(int(qsl[1]), int(qsl[2]))
    torch.testing.assert_close(out[prefill], causal.view(t, H, D)[prefill])
    for b in (0, 2):
        lo, a = int(qsl[b]), int(num_logits[b]) - 1
        anc = ancestor_mask(parents[int(idx[b])][None, :a])[0]  # [1+a, 1+a]
        c = int(context[b])
        allowed = torch.cat([torch.ones(1 + a, c, dtype=torch.bool), anc], 1)
        keys = torch.cat([ctx_k[b, :c], k[lo: lo + 1 + a]])
        vals = torch.cat([ctx_v[b, :c], v[lo: lo + 1 + a]])
        want = dense_attention(q[lo: lo + 1 + a], keys, vals, allowed, impl.scale)
        torch.testing.assert_close(out[lo: lo + 1 + a], want, atol=1e-5, rtol=1e-5)
        # Rows that see every row before them (the root, first-child paths) keep the
        # causal kernel's output to the bit; the others are recomputed.
        for i in range(1 + a):
            kept = bool(anc[i, : i + 1].all())
            assert torch.equal(out[lo + i], causal.view(t, H, D)[lo + i]) == kept, (b, i)
    # Node 3 of the first tree (parent node 0) saw nodes 1 and 2 under causal attention.
    assert not torch.allclose(out[4], causal.view(t, H, D)[4])
    assert ta.tree_rows(qsl, torch.arange(4).int(), idx, num_computed, parents) is None

    # Two more layers of the same step: the inputs are checked at the first one only
    # (the check reads values back to the host), and each layer's output is unchanged.
    flags, kernel = [], ta.tree_attention
    monkeypatch.setattr(ta, "tree_attention",
                        lambda *a, check=True: flags.append(check) or kernel(*a, check=check))
    step = ta.tree_rows(qsl, cu, idx, num_computed, parents)
    ta.set_step(step)
    try:
        layers = [impl.forward(None, q, k, v, kv, md, torch.zeros(t, H * D)) for _ in range(2)]
    finally:
        ta.set_step(None)
    assert flags == [True, False]
    for o in layers:
        torch.testing.assert_close(o.view(t, H, D), out)
