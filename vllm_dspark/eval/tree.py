"""Tree decoding through a plain HF target, engine-free: τ of trees against the chain.

One round (``greedy_tree_decode``): the drafter drafts a block from the target's hidden
states, ``decode.tree.draft_tree`` expands it into a tree, the target runs once over
[sequence, tree nodes] with the tree mask (``tree_forward``: every row causal, a tree
row sees the context and its ancestors, RoPE at context + depth), ``verify_tree`` takes
the longest path the target's argmax agrees with, and the kept rows' hidden states
become the next round's context. Output is the target's greedy decode (tests/decode
check it); what differs between trees and the chain is the tokens per round, τ.

Each round recomputes the whole sequence (no KV cache): a measuring tool for small
targets on a CPU, not a server. ``benchmarks/tree_tau.py`` runs it on the reference
prompt sets.
"""

from __future__ import annotations

import torch

from vllm_dspark.decode.tree import TreeSpec, draft_tree
from vllm_dspark.decode.tree_attention import attention_mask_with_context, tree_positions
from vllm_dspark.decode.tree_verify import kept_rows, verify_tree
from vllm_dspark.model.drafter import target_features


def tree_forward(target, seq: list[int], tree_tokens: torch.Tensor, parents: torch.Tensor,
                 depth: torch.Tensor, **kw):
    """One HF forward over [seq, nodes] for one request: the last token of ``seq`` is the
    root; rows before it are causal, tree rows see the context and their ancestors.
    Returns the HF output; rows len(seq)-1 .. are the tree's [N+1]."""
    p = len(seq) - 1
    ids = torch.tensor([seq + tree_tokens.tolist()])
    length = ids.shape[1]
    allowed = torch.ones(length, length, dtype=torch.bool).tril()
    allowed[p:] = attention_mask_with_context(parents[None], p)[0]  # [N+1, p+N+1]
    pos = torch.cat([torch.arange(p)[None], tree_positions(depth[None], torch.tensor([p]))], 1)
    dtype = next(target.parameters()).dtype
    bias = torch.zeros(length, length, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    return target(input_ids=ids, attention_mask=bias[None, None], position_ids=pos, **kw)


@torch.no_grad()
def greedy_tree_decode(target, drafter, prompt: list[int], max_new: int, spec: TreeSpec, *,
                       base_hook=None, admit=None, stop_ids=()) -> tuple[list[int], torch.Tensor,
                                                                          dict]:
    """Greedy decoding of ``max_new`` tokens (or up to a ``stop_ids`` token) with trees of
    ``spec``. ``base_hook(base_logits, p)`` may rewrite the block's base logits (tests: an
    oracle); ``admit(tree)`` gives the nodes verified per request (default: all).
    Returns the sequence, the carried context features and per-round counts."""
    layers = drafter.cfg.target_layer_ids
    seq = list(prompt)
    out = target(input_ids=torch.tensor([seq[:-1]]), output_hidden_states=True)
    feats = target_features(out.hidden_states, layers)  # [1, p, F]: positions < p
    stats = {"rounds": 0, "accepted": 0, "side_branch": 0, "verified": 0, "drafted": 0}
    while len(seq) - len(prompt) < max_new:
        p = len(seq) - 1
        anchor = torch.tensor([seq[-1]])
        h = drafter.draft_block_states(feats, anchor, drafter.cfg.block_size)
        base = drafter.base_logits(h)
        if base_hook is not None:
            base = base_hook(base, p)
        tree = draft_tree(base, h, anchor, None, drafter.markov_head, drafter.confidence_head,
                          drafter.cfg.sts_temperatures, spec)
        admitted = tree.count if admit is None else admit(tree)
        out = tree_forward(target, seq, tree.tokens[0], tree.parents[0], tree.depth[0],
                           output_hidden_states=True)
        verdict = verify_tree(tree, out.logits[:, p:], None, admitted=admitted)
        k = int(verdict.num_emitted[0])
        rows = kept_rows(verdict)[0, :k]  # root + accepted path: the next context
        feats = torch.cat([feats, target_features(out.hidden_states, layers)[:, p + rows]], 1)
        new = verdict.tokens[0, :k].tolist()
        seq += new
        acc = verdict.accepted[0, : k - 1]
        for key, value in (("rounds", 1), ("accepted", k - 1), ("verified", int(admitted[0])),
                           ("drafted", int(tree.count[0])),
                           ("side_branch", int((tree.sibling[0, acc] > 0).sum()))):
            stats[key] += value
        if any(t in stop_ids for t in new):
            break
    return seq, feats, stats
