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


def test_tree_rows_from_host_counts_equal_the_read_back_and_read_nothing(monkeypatch):
    """With V2's host-side logits counts (``cu_num_logits_np``) the tree requests are
    picked on the host: the same rows, masks and causal rows as the device read-back
    (``nonzero``, a host sync each step), for a mixed step and for a step of trees only,
    and no ``nonzero`` runs."""
    parents = torch.tensor([[-1, 0, 1, 0], [-1, -1, 0, 2], [-1, 0, -1, 1]])  # by state
    num_computed = torch.tensor([4, 7, 2])
    idx = torch.tensor([2, 0, 1], dtype=torch.int32)
    for query_len, num_logits in (([5, 6, 3], [5, 1, 3]), ([5, 2, 4], [5, 2, 4]),
                                  ([1, 6, 1], [1, 1, 1])):
        qsl = torch.tensor([0] + query_len).cumsum(0).int()
        cu = torch.tensor([0] + num_logits).cumsum(0).int()
        want = ta.tree_rows(qsl, cu, idx, num_computed, parents)
        real = torch.Tensor.nonzero
        monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: 1 / 0)
        try:
            got = ta.tree_rows(qsl, cu, idx, num_computed, parents,
                               cu_num_logits_host=cu.numpy())
        finally:
            monkeypatch.setattr(torch.Tensor, "nonzero", real)
        if want is None:
            assert got is None
            continue
        for f in ("rows", "reqs", "query_start", "context_lens", "mask", "causal"):
            assert torch.equal(getattr(got, f), getattr(want, f)), (num_logits, f)


def test_a_full_graph_of_the_target_attends_trees_as_the_eager_step(monkeypatch):
    """FULL CUDA graphs capture ``graph_forward`` (every row of the padded batch, from the
    buffers ``fill_graph`` wrote): a uniform step of full-width trees comes out as the
    eager tree step, padded rows keep FlashAttention's output, the drafter's layers and
    calls outside a capture are left alone, and each target layer's cache is recorded
    once for the KV compaction."""
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(1)
    n, w, max_reqs = 3, 4, 3  # trees of 3 nodes: 4 rows a request; graph padded to 3 requests
    context = torch.tensor([6, 2])
    idx = torch.tensor([1, 0], dtype=torch.int32)
    parents = torch.tensor([[-1, 0, 0], [-1, -1, 1], [-1, 0, 1]])  # by state (2: unused)
    num_computed = torch.zeros(max_reqs, dtype=torch.long)
    num_computed[idx.long()] = context
    qsl = (torch.arange(3) * w).int()
    cu = qsl.clone()
    t, t_pad = 2 * w, max_reqs * w
    seq = torch.cat([context + w, torch.tensor([w])])  # the padded request: its own rows only
    per_req = int((-(-seq // BS)).max())
    table = torch.randperm(max_reqs * per_req, generator=g).view(max_reqs, per_req).int()
    pos = torch.cat([torch.arange(int(c), int(c) + w) for c in context] + [torch.arange(w)])
    b_of = torch.arange(t_pad) // w
    slots = table[b_of, pos // BS].long() * BS + pos % BS
    kv = torch.randn(max_reqs * per_req, KVH, BS, 2 * D, generator=g)
    q = torch.randn(t_pad, H, D, generator=g)
    k = torch.randn(t_pad, KVH, D, generator=g)
    v = torch.randn(t_pad, KVH, D, generator=g)
    impl, target, drafter = CausalFlash(D), SimpleNamespace(), SimpleNamespace(is_draft_layer=True)

    def run(layer, out_rows):
        reqs = out_rows // w  # the real batch (eager) or the graph's padded one
        md = SimpleNamespace(slot_mapping=slots, block_table=table[:reqs],
                             query_start_loc=torch.arange(reqs + 1).int() * w,
                             seq_lens=seq[:reqs])
        return impl.forward(layer, q[:out_rows], k[:out_rows], v[:out_rows], kv.clone(), md,
                            torch.zeros(out_rows, H * D)).view(out_rows, H, D)

    ta.set_step(None)
    ta.set_graph(None)
    causal = run(target, t_pad)
    step = ta.tree_rows(qsl, cu, idx, num_computed, parents)
    ta.set_step(step)
    try:
        eager = run(target, t)
    finally:
        ta.set_step(None)
    graph = ta.graph_rows(max_reqs, n, "cpu")
    graph.context_lens.fill_(7)  # stale values of an earlier, larger step
    graph.causal.fill_(False)
    assert ta.fill_graph(graph, step, num_tokens=t)
    ta.set_graph(graph)
    try:
        monkeypatch.setattr(ta, "_capturing", lambda: False)
        assert torch.equal(run(target, t_pad), causal) and graph.caches == []
        monkeypatch.setattr(ta, "_capturing", lambda: True)
        assert torch.equal(run(drafter, t_pad), causal) and graph.caches == []
        captured = run(target, t_pad)
        run(target, t_pad)
    finally:
        ta.set_graph(None)
    torch.testing.assert_close(captured[:t], eager, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(captured[:t], causal[:t])  # side branches were recomputed
    assert torch.equal(captured[t:], causal[t:])  # the padded request keeps its rows
    assert graph.context_lens[2] == 0 and graph.causal[t:].all()
    assert len(graph.caches) == 2  # one per kv.clone() above: each call is a new cache
    # A step that is not all full-width trees (a prefill row) leaves the buffers alone.
    before = graph.mask.clone()
    assert not ta.fill_graph(graph, step, num_tokens=t + 1)
    assert torch.equal(graph.mask, before)
    # After a step its buffers go back to causal rows: a replay nobody filled (a batch
    # of the same size without trees) keeps FlashAttention's output.
    ta.clear_graph(graph)
    ta.set_graph(graph)
    try:
        assert torch.equal(run(target, t_pad), causal)
    finally:
        ta.set_graph(None)
