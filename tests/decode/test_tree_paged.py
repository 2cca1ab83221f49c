"""Tree decoding over a paged KV cache, end to end and engine-free: a small transformer
(RoPE, GQA, 2 layers, random weights) verifies draft trees the way an engine's runner
would (``decode.tree_paged``: pass inputs -> K/V written to slots -> tree attention over
the paged cache -> acceptance walk -> K/V compaction), several requests packed in one
pass through shuffled block tables. Its greedy output must equal the same model's dense
greedy decode token for token, whatever the trees hold (right tokens, wrong ones, side
branches, nothing admitted); so positions, slots, mask, compaction and the cache stay
consistent across rounds. On a GPU the kernels run; on CPU their torch references, and
the same test again in a child under TRITON_INTERPRET=1 (the Triton kernels)."""

import os

import torch
from checks import run_in_triton_interpreter
from paged_toy import BS, DEVICE, HD, KV_HEADS, LAYERS, V, ToyLM, dense_greedy, random_tree

from vllm_dspark.decode.tree_paged import commit_tree, tree_pass_inputs
from vllm_dspark.kernels.tree_accept import tree_accept


def test_paged_tree_decoding_equals_dense_greedy():
    model = ToyLM()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V, (n,), generator=g).tolist() for n in (7, 2, 12)]
    num_rounds, n_nodes = 12, 9
    new = num_rounds * (n_nodes + 1)  # the most a request can emit
    want = [dense_greedy(model, p, new) for p in prompts]
    r = len(prompts)
    max_len = max(len(p) for p in prompts) + new + n_nodes + 2
    per_req = -(-max_len // BS)
    order = torch.randperm(r * per_req + 3, generator=g)
    table = order[: r * per_req].view(r, per_req).int().to(DEVICE)
    caches = [(torch.zeros(r * per_req + 3, BS, KV_HEADS, HD, device=DEVICE),
               torch.zeros(r * per_req + 3, BS, KV_HEADS, HD, device=DEVICE))
              for _ in range(LAYERS)]
    kc, vc = [c[0] for c in caches], [c[1] for c in caches]
    # Prefill every prompt but its last token as one "tree" that is a chain.
    zero = torch.zeros(r, dtype=torch.long, device=DEVICE)
    longest = max(len(p) for p in prompts) - 1
    toks = torch.zeros(r, longest, dtype=torch.long)
    for b, p in enumerate(prompts):
        toks[b, : len(p) - 2] = torch.tensor(p[1:-1], dtype=torch.long)
    chain = torch.arange(-1, longest - 1).expand(r, -1)
    prefill = tree_pass_inputs(torch.tensor([p[0] for p in prompts]).to(DEVICE),
                               toks.to(DEVICE), chain.to(DEVICE),
                               torch.arange(1, longest + 1).expand(r, -1).to(DEVICE),
                               torch.tensor([len(p) - 2 for p in prompts]).to(DEVICE),
                               zero, table, BS)
    model.paged_logits(prefill, table, kc, vc)
    num_computed = torch.tensor([len(p) - 1 for p in prompts], device=DEVICE)
    roots = torch.tensor([p[-1] for p in prompts], device=DEVICE)
    seqs = [list(p) for p in prompts]
    accepted = 0
    for rounds in range(num_rounds):
        trees = [random_tree(g, w[len(s):], n_nodes, hit=0.7) for s, w in zip(seqs, want)]
        tokens = torch.tensor([t[0] for t in trees], device=DEVICE)
        parents = torch.tensor([t[1] for t in trees], device=DEVICE)
        depth = torch.tensor([t[2] for t in trees], device=DEVICE)
        admitted = torch.tensor([(rounds + b) % (n_nodes + 1) for b in range(r)],
                                device=DEVICE)  # 0 .. N: nothing admitted, some, all
        tp = tree_pass_inputs(roots, tokens, parents, depth, admitted, num_computed,
                              table, BS)
        logits = model.paged_logits(tp, table, kc, vc)
        m = n_nodes + 1
        per_row = torch.zeros(r, m, V, device=DEVICE)
        for b in range(r):
            lo, hi = int(tp.query_start[b]), int(tp.query_start[b + 1])
            per_row[b, : hi - lo] = logits[lo:hi]
        verdict = tree_accept(per_row, tokens, parents, admitted, torch.zeros(r, device=DEVICE))
        num_computed, roots = commit_tree(verdict, num_computed, kc, vc, table)
        for b in range(r):
            k = int(verdict.num_emitted[b])
            seqs[b] += verdict.tokens[b, :k].tolist()
        accepted += int(verdict.num_accepted.sum())
    for s, w in zip(seqs, want):
        assert s == w[: len(s)]
    assert num_computed.tolist() == [len(s) - 1 for s in seqs]  # the bonus is the next root
    assert accepted > num_rounds  # the trees did carry right tokens


if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":

    def test_the_same_through_the_triton_kernels_in_the_interpreter():
        run_in_triton_interpreter(__file__, "equals_dense_greedy",
                                  r"1 passed(, \d+ warnings?)? in ",
                                  one_thread=True)
