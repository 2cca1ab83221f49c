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
``tree_rows`` picks the tree requests from V2's host-side logits counts (no read-back
from the device): it serves eager (piecewise-graphed) target steps and fills the FULL
graphs' buffers.

FULL CUDA graphs of the target (uniform decode steps: every request verifies a tree of
N nodes, N + 1 rows) capture the wrapper's other path, ``graph_forward``: the same
kernel over every row of the captured batch, from persistent buffers (``GraphRows``)
that ``fill_graph`` writes before each step (the ancestor masks, context lengths and
causal rows of ``tree_rows``), so a replay attends each step's trees without calling
Python. Only the target's layers take it (the drafter's graphs are captured too), and
only while a graph is being captured.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
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
    checked: bool = False  # inputs checked (the run's first tree step, its first layer)
    # The tree requests' block table rows, gathered at the first layer that reads this
    # block table (every layer of a KV cache group shares it), and its source.
    table: torch.Tensor | None = None
    table_of: torch.Tensor | None = None


def tree_rows(query_start_loc: torch.Tensor, cu_num_logits: torch.Tensor,
              idx_mapping: torch.Tensor, num_computed: torch.Tensor,
              parents: torch.Tensor, total_logits: int | None = None,
              cu_num_logits_host: np.ndarray | None = None, rows=None,
              masks: torch.Tensor | None = None) -> TreeRows | None:
    """The step's tree requests: those with drafts (more than one logits row), whose
    logits rows are their whole query [root, admitted nodes]. ``num_computed`` and
    ``parents`` [max_reqs, N] by request state; the rest by batch row. None: no tree.
    ``total_logits``: the step's logits rows where the caller knows it on the host
    (V2's ``cu_num_logits_np``), else read back from ``cu_num_logits``.

    ``cu_num_logits_host`` (V2's ``cu_num_logits_np``): the same counts on the host,
    which pick the tree requests without reading the device back. Without it the
    picking (``nonzero``) syncs the host with the device, stalling the launches queued
    behind it, once a step. ``rows``: the step's ``logits_rows`` if the caller has them;
    ``masks`` [max_reqs, N+1, N+1] the trees' ancestor masks by request state if the
    caller has them (the drafter builds them in its graph), else made from ``parents``."""
    num_logits = (cu_num_logits[1:] - cu_num_logits[:-1]).long()
    dev = num_logits.device
    if cu_num_logits_host is None:
        reqs = (num_logits > 1).nonzero().flatten()
        if reqs.numel() == 0:
            return None
    else:
        counts = np.diff(np.asarray(cu_num_logits_host, dtype=np.int64))
        tree = counts > 1
        if not tree.any():
            return None
        if total_logits is None:
            total_logits = int(counts.sum())
        # Every request verifies a tree (steady decoding): all logits rows, no index.
        reqs = (torch.arange(counts.shape[0], device=dev) if tree.all()
                else _to_device(np.flatnonzero(tree), dev))
    if total_logits is None:
        total_logits = int(cu_num_logits[-1])
    b, j, row = rows or logits_rows(query_start_loc, cu_num_logits, total_logits)
    if cu_num_logits_host is None:
        sel = (num_logits[b] > 1).nonzero().flatten()  # tree requests' logits rows
    else:
        sel = None if tree.all() else _to_device(np.flatnonzero(np.repeat(tree, counts)), dev)
    n = num_logits[reqs]
    query_start = torch.zeros(reqs.shape[0] + 1, dtype=torch.int64, device=dev)
    query_start[1:] = n.cumsum(0)
    query_rows = row if sel is None else row[sel]  # request by request, in batch order
    states = idx_mapping.long()[reqs]
    mask = ancestor_mask(parents[states]) if masks is None else masks[states]
    # Nodes past a request's admitted count are not in its query: they see nothing here.
    live = torch.arange(mask.shape[1], device=dev)[None, :] < n[:, None]
    mask = mask & live[:, :, None] & live[:, None, :]
    # A row that sees every row up to itself is a causal row: FlashAttention computed it
    # as the chain (and plain decoding) would, to the bit; only side branches differ.
    m = mask.shape[1]
    earlier = torch.ones(m, m, dtype=torch.bool, device=dev).tril()
    causal_rows = (mask | ~earlier).all(-1)  # [R', N+1]
    if sel is None:
        causal = causal_rows[b, j]
    else:
        tree_index = torch.cumsum(num_logits > 1, 0) - 1  # batch row -> index in reqs
        causal = causal_rows[tree_index[b[sel]], j[sel]]
    # In the dtypes the kernel reads, once a step rather than once a layer.
    return TreeRows(query_rows, reqs, query_start, num_computed.long()[states].contiguous(),
                    mask.to(torch.int8).contiguous(), causal)


def _to_device(a: np.ndarray, device) -> torch.Tensor:
    """Host indices onto ``device`` without waiting for it: a copy from pageable memory
    would wait for the work queued before it; from pinned memory it is queued too."""
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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


@dataclass
class GraphRows:
    """What FULL-graph target steps read (module doc): persistent [max_reqs (+1), ...]
    buffers for uniform decode batches of ``width`` = N + 1 rows a request."""

    width: int
    context_lens: torch.Tensor  # [max_reqs] int64 tokens before each root
    query_start: torch.Tensor  # [max_reqs + 1] int64: 0, width, 2·width, ..
    mask: torch.Tensor  # [max_reqs, width, width] int8 ancestor masks
    causal: torch.Tensor  # [max_reqs·width] bool: FlashAttention's row stands
    caches: list = field(default_factory=list)  # the target layers' KV caches, met at capture


def graph_rows(max_reqs: int, n: int, device) -> GraphRows:
    w = n + 1
    causal_mask = torch.ones(w, w, dtype=torch.int8, device=device).tril()
    return GraphRows(
        w, torch.zeros(max_reqs, dtype=torch.int64, device=device),
        torch.arange(max_reqs + 1, dtype=torch.int64, device=device) * w,
        causal_mask.expand(max_reqs, w, w).contiguous(),
        torch.ones(max_reqs * w, dtype=torch.bool, device=device))


def fill_graph(g: GraphRows, step: TreeRows, num_tokens: int) -> bool:
    """Before a step that may replay a FULL graph: when every one of its ``num_tokens``
    query rows is a tree row of a full-width tree (a uniform decode batch, the only kind
    FULL graphs capture), copy ``step``'s masks, lengths and causal rows to the graph's
    buffers and return True. Rows past the batch (the graph's padding) keep
    FlashAttention's output and read no context. Another step runs piecewise
    (``tree_forward``) and leaves them. After the step, ``clear_graph``."""
    r, t = step.reqs.shape[0], step.rows.shape[0]
    if t != num_tokens or t != r * g.width or step.mask.shape[1] != g.width:
        return False
    g.context_lens[:r] = step.context_lens
    g.context_lens[r:] = 0
    g.mask[:r] = step.mask
    g.causal[:t] = step.causal
    g.causal[t:] = True
    return True


def clear_graph(g: GraphRows) -> None:
    """Every row back to FlashAttention's output: a replay the next step does not fill
    (should one run) then attends causally instead of with a past step's trees."""
    g.causal.fill_(True)


def graph_forward(impl, query: torch.Tensor, kv_cache: torch.Tensor, attn_metadata,
                  output: torch.Tensor, g: GraphRows) -> None:
    """``tree_forward`` for a FULL graph being captured: every row of the batch (its
    padded size, a multiple of the tree's width), the buffers of ``g``, no host read."""
    t = query.shape[0]
    if t == 0 or t % g.width:
        return  # not a tree-wide uniform decode batch
    if all(c is not kv_cache for c in g.caches):
        g.caches.append(kv_cache)  # for the KV compaction of replayed steps
    r = t // g.width
    k, v = flash_attn_kv_views(kv_cache, impl.head_size)
    att = tree_attention(query, k, v, attn_metadata.block_table[:r], g.context_lens[:r],
                         g.query_start[:r + 1], g.mask[:r], impl.scale, check=False)
    out = output.view(output.shape[0], query.shape[1], -1)[:t]
    out.copy_(torch.where(g.causal[:t, None, None], out, att.to(output.dtype)))


_STEP: TreeRows | None = None  # this step's tree rows, around the target's forward only
_GRAPH: GraphRows | None = None  # tree mode's FULL-graph buffers (set at start-up)


def set_step(step: TreeRows | None) -> None:
    global _STEP
    _STEP = step


def set_graph(g: GraphRows | None) -> None:
    global _GRAPH
    _GRAPH = g


def _is_target_layer(layer) -> bool:
    """vLLM marks the drafter's attention layers (``is_draft_layer``) when it loads it."""
    return layer is not None and not getattr(layer, "is_draft_layer", False)


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def with_tree_rows(original):
    """``forward`` of an attention implementation (FlashAttention's signature in vLLM
    0.32), then the tree rows over its output: an eager tree step's (``set_step``), or,
    while a FULL graph of the target is captured, the graph's (``set_graph``)."""
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, *args,
                **kwargs):
        out = original(self, layer, query, key, value, kv_cache, attn_metadata, output,
                       *args, **kwargs)
        if attn_metadata is None:
            return out
        if _STEP is not None:
            tree_forward(self, query, kv_cache, attn_metadata, out, _STEP)
        elif _GRAPH is not None and _is_target_layer(layer) and _capturing():
            graph_forward(self, query, kv_cache, attn_metadata, out, _GRAPH)
        return out
    return forward
