"""The tree kernels timed on a GPU (issue 17): tree attention against vLLM's own attention,
and the acceptance walk and the K/V compaction against their torch references.

    python benchmarks/tree_kernels_gpu.py --out benchmarks/results/tree_kernels_h200.json

Tree attention: our Triton kernel (``kernels.tree_attention``) over a paged bf16 cache,
for R requests of C cached tokens and M query rows (root + nodes), against vLLM's
FlashAttention (``vllm_flash_attn.flash_attn_varlen_func``, paged, causal) on the same
shapes: what vLLM runs to verify a chain of the same length. Before timing, both are run
on a chain (a tree with one child per node, whose ancestor mask is the causal mask) and
must agree. ``ours`` is the function as called (its input checks read a few values back
to the host); ``ours_kernel`` skips them (``check=False``), the launch an engine would graph.
Acceptance (``kernels.tree_accept``) and compaction (``kernels.kv_compact``) are timed
against their torch references on random trees. CUDA events, median of ``--reps``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys

import torch


def timed(fn, reps: int) -> float:
    """Median milliseconds of ``fn()`` over ``reps`` runs, after two warm-ups."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def paged(r, ctx, m, heads, kv_heads, d, block_size, dtype, g):
    """A paged cache holding, per request, ``ctx`` context tokens + ``m`` query rows, its
    blocks shuffled; a chain (causal) mask; q for the m rows."""
    dev = "cuda"
    per_req = -(-(ctx + m) // block_size)
    blocks = torch.randperm(r * per_req + 4, generator=g).to(dev)
    table = blocks[: r * per_req].view(r, per_req).int()
    k = torch.randn(r * per_req + 4, block_size, kv_heads, d, generator=g).to(dev, dtype)
    v = torch.randn(r * per_req + 4, block_size, kv_heads, d, generator=g).to(dev, dtype)
    q = torch.randn(r * m, heads, d, generator=g).to(dev, dtype)
    ctx_lens = torch.full((r,), ctx, dtype=torch.int64, device=dev)
    starts = torch.arange(0, r * m + 1, m, dtype=torch.int64, device=dev)
    chain = torch.tril(torch.ones(m, m, dtype=torch.bool, device=dev)).expand(r, m, m)
    return q, k, v, table, ctx_lens, starts, chain.contiguous()


def attention_rows(args, g):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    from vllm_dspark.kernels.tree_attention import kernel as tk

    rows = []
    for heads, kv_heads, d in args.shapes:
        for r in args.requests:
            for ctx in args.contexts:
                for m in args.rows:
                    q, k, v, table, ctx_lens, starts, chain = paged(
                        r, ctx, m, heads, kv_heads, d, 16, torch.bfloat16, g)
                    scale = d ** -0.5
                    seq = (ctx_lens + m).int()

                    fa = functools.partial(
                        flash_attn_varlen_func, q, k, v, max_seqlen_q=m,
                        cu_seqlens_q=starts.int(), max_seqlen_k=ctx + m, seqused_k=seq,
                        softmax_scale=scale, causal=True, block_table=table)
                    ours = functools.partial(tk.tree_attention_triton, q, k, v, table,
                                             ctx_lens, starts, chain, scale)

                    err = (ours().float() - fa().float()).abs().max().item()
                    if err > 2e-2:
                        raise SystemExit(f"tree attention and FlashAttention disagree on a "
                                         f"chain: max |diff| {err} (R={r}, C={ctx}, M={m})")
                    row = dict(heads=heads, kv_heads=kv_heads, head_dim=d, requests=r,
                               context=ctx, rows=m, max_abs_diff_vs_fa=err,
                               fa_ms=timed(fa, args.reps), ours_ms=timed(ours, args.reps))
                    row["ours_kernel_ms"] = timed(functools.partial(ours, check=False),
                                                  args.reps)
                    row["ours_kernel_over_fa"] = row["ours_kernel_ms"] / row["fa_ms"]
                    # The single-pass kernel (no context split), as timed before splits.
                    row["ours_1split_kernel_ms"] = timed(
                        functools.partial(ours, check=False, splits=1), args.reps)
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def random_trees(r, n, g, dev):
    parents = torch.full((r, n), -1, dtype=torch.long)
    for b in range(r):
        for i in range(1, n):
            parents[b, i] = int(torch.randint(-1, i, (), generator=g))
    return parents.to(dev)


def accept_rows(args, g):
    from vllm_dspark.kernels.tree_accept import tree_accept_ref, tree_accept_triton

    rows, dev, vocab = [], "cuda", args.vocab
    for r in args.requests:
        for n in args.nodes:
            logits = torch.randn(r, n + 1, vocab, generator=g).to(dev, torch.bfloat16)
            tokens = torch.randint(0, vocab, (r, n), generator=g).to(dev)
            parents = random_trees(r, n, g, dev)
            admitted = torch.full((r,), n, dtype=torch.long, device=dev)
            greedy = torch.zeros(r, device=dev)
            # Make the root's argmax a child's token, so the walk descends at least once.
            tokens[:, 0] = logits[:, 0].float().argmax(-1)
            parents[:, 0] = -1
            ref = tree_accept_ref(logits, tokens, parents, admitted, greedy)
            ker = tree_accept_triton(logits, tokens, parents, admitted, greedy)
            if not (torch.equal(ref.num_accepted, ker.num_accepted)
                    and torch.equal(ref.tokens, ker.tokens)):
                raise SystemExit(f"tree_accept kernel != reference (R={r}, N={n})")
            inputs = (logits, tokens, parents, admitted, greedy)
            row = dict(requests=r, nodes=n, vocab=vocab,
                       ref_ms=timed(functools.partial(tree_accept_ref, *inputs), args.reps),
                       ours_ms=timed(functools.partial(tree_accept_triton, *inputs), args.reps))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def compact_rows(args, g):
    from vllm_dspark.kernels.kv_compact import compact_kv_ref, compact_kv_triton

    rows, dev = [], "cuda"
    for r in args.requests:
        n = max(args.nodes)
        _, k, v, table, ctx_lens, _, _ = paged(r, 512, n + 1, 9, 3, 64, 16, torch.bfloat16, g)
        num = torch.randint(1, n + 2, (r,), generator=g).to(dev)
        kept = torch.zeros(r, n + 1, dtype=torch.long, device=dev)
        for b in range(r):
            picks = torch.randperm(n, generator=g)[: int(num[b]) - 1].sort().values + 1
            kept[b, 1: int(num[b])] = picks.to(dev)
        k2, v2 = k.clone(), v.clone()
        compact_kv_ref(k, v, table, ctx_lens, kept, num)
        compact_kv_triton(k2, v2, table, ctx_lens, kept, num)
        if not (torch.equal(k, k2) and torch.equal(v, v2)):
            raise SystemExit(f"kv_compact kernel != reference (R={r})")
        inputs = (k, v, table, ctx_lens, kept, num)
        row = dict(requests=r, rows=n + 1,
                   ref_ms=timed(functools.partial(compact_kv_ref, *inputs),
                                max(3, args.reps // 10)),
                   ours_ms=timed(functools.partial(compact_kv_triton, *inputs), args.reps))
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--requests", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--rows", type=int, nargs="+", default=[8, 17, 33],
                    help="query rows per request (root + nodes)")
    ap.add_argument("--nodes", type=int, nargs="+", default=[7, 16, 32])
    ap.add_argument("--vocab", type=int, default=49152)
    args = ap.parse_args()
    # (heads, kv heads, head dim): SmolLM2-135M and a Llama-8B-like layer.
    args.shapes = [(9, 3, 64), (32, 8, 128)]
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    if not torch.cuda.is_available():
        raise SystemExit("tree_kernels_gpu.py times CUDA kernels: run it on a GPU machine.")
    g = torch.Generator().manual_seed(0)
    import vllm

    result = dict(command=" ".join([sys.executable] + sys.argv),
                  device=torch.cuda.get_device_name(), torch=torch.__version__,
                  vllm=vllm.__version__)
    # Written after each section: a run cut short by its time limit keeps what it timed
    # (2026-12-03: the window's 150 s limit ended it inside the attention table).
    for name, rows in (("attention", attention_rows), ("accept", accept_rows),
                       ("compact", compact_rows)):
        result[name] = rows(args, g)
        json.dump(result, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
