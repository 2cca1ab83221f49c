"""The target's attention for draft-tree rows on vLLM's V2 runner (issue 17).

vLLM 0.32's FlashAttention backend knows causal and bidirectional masks only. A tree
step keeps it for everything it does right — writing the step's K/V into the cache,
and every row of a request without a tree (prefill chunks, requests without drafts) —
and then recomputes the rows of tree requests with ``kernels.tree_attention`` (paged
context + ancestor mask), writing over FlashAttention's causal output for the rows
where it differs. A node then sees the cached context, the root, its ancestors and
itself, never another branch; causal attention had let it see every earlier node. A
row whose ancestors are all the rows before it (the root, a path of first children)
keeps FlashAttention's output, bit for bit what the chain and plain decoding compute:
the two kernels round differently, and in half precision a near-tie of the target's
logits can flip on that rounding.

``TreeRows`` is what one step's tree requests need (built by ``tree_rows`` from V2's
per-step buffers before the target's forward, and cleared after it, so the drafter's
attention, which runs later in the step, is never touched). ``with_tree_rows`` wraps an
attention implementation's ``forward``; ``verify_trees_on_v2`` (engine/v2/patches.py)
installs it on ``FlashAttentionImpl``, and ``tree_runner.begin`` sets the step.
``tree_rows`` reads shapes back to the host (``nonzero``): it serves eager
(piecewise-graphed) target steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_dspark.decode.tree_attention import ancestor_mask
from vllm_dspark.engine.v2.tree_step import flash_attn_kv_views, logits_rows
from vllm_dspark.kernels.tree_attention import tree_attention


@dataclass
class TreeRows:
    rows: torch.Tensor  # [T'] the step's query rows of tree requests, request by request
    reqs: torch.Tensor  # [R'] their batch rows
    query_start: torch.Tensor  # [R'+1] int64 into ``rows``
    context_lens: torch.Tensor  # [R'] int64 tokens before each root (its KV slot offset)
    mask: torch.Tensor  # [R', N+1, N+1] int8 (1 = visible): root, then the admitted nodes
    # [T'] rows whose ancestors are all the rows before them (the root, a first-child
    # path): causal attention is already theirs, so FlashAttention's output stays there.
    causal: torch.Tensor
    caches: list | None = None  # if a list: each layer's KV cache is appended to it
    checked: bool = False  # inputs checked at the step's first layer (the rest share them)
    # The tree requests' block table rows, gathered at the first layer that reads this
    # block table (every layer of a KV cache group shares it), and its source.
    table: torch.Tensor | None = None
    table_of: torch.Tensor | None = None


def tree_rows(query_start_loc: torch.Tensor, cu_num_logits: torch.Tensor,
              idx_mapping: torch.Tensor, num_computed: torch.Tensor,
              parents: torch.Tensor, total_logits: int | None = None) -> TreeRows | None:
    """The step's tree requests: those with drafts (more than one logits row), whose
    logits rows are their whole query [root, admitted nodes]. ``num_computed`` and
    ``parents`` [max_reqs, N] by request state; the rest by batch row. None: no tree.
    ``total_logits``: the step's logits rows where the caller knows it on the host
    (V2's ``cu_num_logits_np``), else read back from ``cu_num_logits``."""
    num_logits = (cu_num_logits[1:] - cu_num_logits[:-1]).long()
    reqs = (num_logits > 1).nonzero().flatten()
    if reqs.numel() == 0:
        return None
    n = num_logits[reqs]
    query_start = torch.zeros(reqs.numel() + 1, dtype=torch.int64, device=n.device)
    query_start[1:] = n.cumsum(0)
    if total_logits is None:
        total_logits = int(cu_num_logits[-1])
    b, j, row = logits_rows(query_start_loc, cu_num_logits, total_logits)
    sel = (num_logits[b] > 1).nonzero().flatten()  # tree requests' logits rows
    rows = row[sel]  # request by request, in batch order
    states = idx_mapping.long()[reqs]
    mask = ancestor_mask(parents[states])
    # Nodes past a request's admitted count are not in its query: they see nothing here.
    live = torch.arange(mask.shape[1], device=n.device)[None, :] < n[:, None]
    mask = mask & live[:, :, None] & live[:, None, :]
    # A row that sees every row up to itself is a causal row: FlashAttention computed it
    # as the chain (and plain decoding) would, to the bit; only side branches differ.
    m = mask.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=n.device).tril()
    causal_rows = (mask | ~earlier).all(-1)  # [R', N+1]
    tree_index = torch.cumsum(num_logits > 1, 0) - 1  # batch row -> index in reqs
    causal = causal_rows[tree_index[b[sel]], j[sel]]
    # In the dtypes the kernel reads, once a step rather than once a layer.
    return TreeRows(rows, reqs, query_start, num_computed.long()[states].contiguous(),
                    mask.to(torch.int8).contiguous(), causal)


def tree_forward(impl, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata,
                 output: torch.Tensor, step: TreeRows) -> None:
    """Overwrite the tree rows of ``output`` with tree attention (module doc). The
    step's K/V are already in ``kv_cache`` (FlashAttention wrote them)."""
    if step.caches is not None:
        step.caches.append(kv_cache)  # the step's target layers (for KV compaction)
    k, v = flash_attn_kv_views(kv_cache, impl.head_size)
    heads = query.shape[1]
    # Every layer of a step sees the same rows, lengths, mask and block table: checking
    # them once keeps one clear error without a host read-back in each of the 30 layers.
    if step.table_of is not attn_metadata.block_table:
        step.table_of = attn_metadata.block_table
        step.table = attn_metadata.block_table[step.reqs].contiguous()
    att = tree_attention(query[step.rows], k, v, step.table, step.context_lens,
                         step.query_start, step.mask, impl.scale, check=not step.checked)
    step.checked = True
    out = output.view(output.shape[0], heads, -1)
    # FlashAttention's rows where they are the tree's, the tree kernel's elsewhere.
    out[step.rows] = torch.where(step.causal[:, None, None], out[step.rows],
                                 att.to(output.dtype))


_STEP: TreeRows | None = None  # this step's tree rows, around the target's forward only


def set_step(step: TreeRows | None) -> None:
    global _STEP
    _STEP = step


def with_tree_rows(original):
    """``forward`` of an attention implementation (FlashAttention's signature in vLLM
    0.32), then the tree rows over its output when a tree step is set."""
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args,
                **kwargs):
        out = original(self, layer, query, key, value, kv_cache, attn_metadata, output,
                       *args, **kwargs)
        if _STEP is not None and attn_metadata is not None:
            tree_forward(self, query, kv_cache, attn_metadata, out, _STEP)
        return out
    return forward
