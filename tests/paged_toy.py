"""A small paged transformer for tree-decoding tests (RoPE, GQA, 2 layers, random
weights): a dense causal reference and one pass over a paged KV cache with tree
attention, as an engine's runner would run it. Shared by tests/decode/test_tree_paged.py
(engine-free) and tests/engine/test_v2_tree_step.py (V2's buffers)."""

import torch

from vllm_dspark.engine.v2.tree_attention import with_tree_rows
from vllm_dspark.engine.v2.tree_step import flash_attn_kv_views
from vllm_dspark.kernels.tree_attention import tree_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
V, D, HEADS, KV_HEADS, HD, LAYERS, BS = 61, 48, 4, 2, 12, 2, 5


def rope(x, pos):  # x [T, H, HD], pos [T]
    half = HD // 2
    freq = 1.0 / (10000 ** (torch.arange(half, device=x.device) / half))
    ang = pos.double()[:, None] * freq.double()[None, :]
    cos, sin = ang.cos()[:, None, :].to(x.dtype), ang.sin()[:, None, :].to(x.dtype)
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


class ToyLM:
    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)

        def w(*s):
            return (torch.randn(*s, generator=g) / s[0] ** 0.5).to(DEVICE)
        self.emb = w(V, D) * 3
        self.layers = [dict(q=w(D, HEADS * HD), k=w(D, KV_HEADS * HD), v=w(D, KV_HEADS * HD),
                            o=w(HEADS * HD, D), up=w(D, 2 * D), down=w(2 * D, D))
                       for _ in range(LAYERS)]
        self.head = w(D, V) * 4

    def _qkv(self, x, lw, pos):
        t = x.shape[0]
        q = rope((x @ lw["q"]).view(t, HEADS, HD), pos)
        k = rope((x @ lw["k"]).view(t, KV_HEADS, HD), pos)
        return q, k, (x @ lw["v"]).view(t, KV_HEADS, HD)

    def _mlp(self, x, lw):
        return x + torch.tanh(x @ lw["up"]) @ lw["down"]

    def dense_logits(self, ids, with_hidden=False):
        """[L] -> [L, V], causal, positions 0.. (the reference)."""
        x = self.emb[ids]
        pos = torch.arange(len(ids), device=DEVICE)
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool, device=DEVICE).tril()
        for lw in self.layers:
            q, k, v = self._qkv(x, lw, pos)
            k = k.repeat_interleave(HEADS // KV_HEADS, 1)
            v = v.repeat_interleave(HEADS // KV_HEADS, 1)
            s = torch.einsum("qhd,khd->hqk", q, k) * HD ** -0.5
            p = s.masked_fill(~causal, float("-inf")).softmax(-1)
            x = x + torch.einsum("hqk,khd->qhd", p, v).reshape(len(ids), -1) @ lw["o"]
            x = self._mlp(x, lw)
        return (x @ self.head, x) if with_hidden else x @ self.head

    def paged_logits(self, tp, table, k_caches, v_caches, with_hidden=False):
        """One pass: each row's K/V into its slot, then tree attention over the cache.
        With ``with_hidden``: (logits, the last layer's output states)."""
        x = self.emb[tp.input_ids]
        for lw, kc, vc in zip(self.layers, k_caches, v_caches):
            q, k, v = self._qkv(x, lw, tp.positions)
            # By (block, offset), as vLLM's cache writes: the caches may be strided views
            # of one K/V tensor (FlashAttention's layout in vLLM 0.32).
            blk, off = tp.slots // kc.shape[1], tp.slots % kc.shape[1]
            kc[blk, off] = k
            vc[blk, off] = v
            att = tree_attention(q, kc, vc, table, tp.context_lens, tp.query_start,
                                 tp.tree_mask, HD ** -0.5)
            x = self._mlp(x + att.reshape(x.shape[0], -1) @ lw["o"], lw)
        return (x @ self.head, x) if with_hidden else x @ self.head


    def flash_logits(self, ids, positions, md, kv_caches, impl, with_hidden=False):
        """One pass as vLLM's V2 runner runs the target: each layer's attention through
        ``impl.forward`` (FlashAttention's signature) on caches in its 0.32 layout."""
        x = self.emb[ids]
        for lw, kv in zip(self.layers, kv_caches):
            q, k, v = self._qkv(x, lw, positions)
            out = torch.zeros(x.shape[0], HEADS * HD, device=DEVICE)
            impl.forward(None, q, k, v, kv, md, out)
            x = self._mlp(x + out @ lw["o"], lw)
        return (x @ self.head, x) if with_hidden else x @ self.head


def dense_attention(q, k, v, allowed, scale):
    """q [Q, H, D], k/v [L, KVH, D], allowed [Q, L] -> [Q, H, D] (float32 inside)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1).float(), v.repeat_interleave(rep, dim=1).float()
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", s.softmax(-1), v).to(q.dtype)


class CausalFlash:
    """A stand-in for vLLM 0.32's FlashAttentionImpl, the part a tree step keeps: write
    the step's K/V by slot, then causal attention per request over the paged cache
    [blocks, kv_heads, block_size, 2·head_dim]. Its forward is wrapped by the plugin's
    ``with_tree_rows``, as the runner's patch wraps FlashAttention's."""

    def __init__(self, head_size):
        self.head_size, self.scale = head_size, head_size ** -0.5

    def _forward(self, layer, query, key, value, kv_cache, md, output):
        kc, vc = flash_attn_kv_views(kv_cache, self.head_size)
        bs = kc.shape[1]
        slots = md.slot_mapping[: query.shape[0]]
        kc[slots // bs, slots % bs] = key
        vc[slots // bs, slots % bs] = value
        out = output.view(output.shape[0], query.shape[1], self.head_size)
        for r in range(md.query_start_loc.shape[0] - 1):
            lo, hi = int(md.query_start_loc[r]), int(md.query_start_loc[r + 1])
            seq = int(md.seq_lens[r])
            pos = torch.arange(seq, device=query.device)
            blk = md.block_table[r, pos // bs].long()
            qpos = torch.arange(seq - (hi - lo), seq, device=query.device)
            out[lo:hi] = dense_attention(query[lo:hi], kc[blk, pos % bs], vc[blk, pos % bs],
                                         pos[None, :] <= qpos[:, None], self.scale)
        return output

    forward = with_tree_rows(_forward)


def dense_greedy(model, prompt, new):
    seq = list(prompt)
    for _ in range(new):
        seq.append(int(model.dense_logits(torch.tensor(seq, device=DEVICE))[-1].argmax()))
    return seq


def random_tree(g, truth_next, n, hit):
    """Nodes in tree order (parents first). A node on the true path carries the true
    next token with chance ``hit``; other tokens are random (side branches, misses)."""
    parents, tokens, depth, on_path = [], [], [], []
    for i in range(n):
        p = int(torch.randint(-1, i, (), generator=g)) if i else -1
        d = 1 if p < 0 else depth[p] + 1
        true_here = (p < 0 or on_path[p]) and d <= len(truth_next)
        right = true_here and float(torch.rand((), generator=g)) < hit
        tokens.append(truth_next[d - 1] if right else int(torch.randint(0, V, (), generator=g)))
        parents.append(p)
        depth.append(d)
        on_path.append(right)
    return tokens, parents, depth
