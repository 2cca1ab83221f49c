"""One tree verification step on vLLM's V2 runner, in the order the runner runs it
(issue 17): the bricks of ``tree_step`` and ``tree_attention`` called around the
target's forward, its sampler and the drafter. Plain torch on V2's tensors; the
runner's patches (``engine/v2/patches.py``, ``VLLM_DSPARK_TREE=on``) are thin adapters
that hand these functions the runner's buffers.

A step, for the requests that carry drafts (the tree's γ nodes, parents first):

1. ``begin`` (after ``prepare_attn``, whose slot mapping used the chain's positions):
   node rows get RoPE positions root + depth; the tree rows are set for the attention
   wrapper; ``num_computed`` before the step and the block table are kept;
2. the target's forward: FlashAttention writes K/V, ``tree_attention`` fixes the tree
   rows and records each target layer's cache (a FULL graph replays the same from the
   buffers ``begin`` filled, its caches recorded at capture);
3. ``end_forward``: no more tree rows (the drafter's attention runs later); positions
   back to the chain's (the drafter reads them);
4. ``sample_rows`` (inside V2's rejection sampler, in place of its chain walk): the
   acceptance walk over seeded target draws (``tree_step.tree_sample``);
5. ``commit`` (after sampling, before the drafter): the kept rows' K/V into the chain's
   slots in every target layer, their hidden states to the rows the drafter reads.

After that V2 sees a chain of 1 + accepted tokens: its post-update, the scheduler's
rollback by count and the drafter's context need nothing else. The drafter then drafts
the next tree (``DSparkV2Speculator.enable_tree``), whose parents and depths
``store_tree`` files by request state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vllm_dspark.decode.tree_attention import ancestor_mask
from vllm_dspark.decode.tree_verify import TreeVerdict
from vllm_dspark.engine.v2 import tree_attention, tree_step
from vllm_dspark.kernels.kv_compact import layer_offsets


@dataclass
class TreeRun:
    """Per runner: the tree structure by request state, and the current step's state."""

    parents: torch.Tensor  # [max_reqs, N] int64, -1 = root
    depth: torch.Tensor  # [max_reqs, N] int64
    head_size: int  # the target's attention head size (its KV cache layout)
    mask: torch.Tensor | None = None  # [max_reqs, N+1, N+1] bool ancestor masks
    tokens: torch.Tensor | None = None  # [max_reqs, N] the nodes' tokens (sample_rows)
    graph: tree_attention.GraphRows | None = None  # what FULL target graphs read
    graph_filled: bool = False  # this step wrote the graph's buffers (cleared after it)
    # The layers' K/V views (3 ops a layer) of the caches they were made from: the
    # target's caches stay the same tensors from step to step.
    views: list = field(default_factory=list)
    views_of: list = field(default_factory=list)
    offsets: torch.Tensor | None = None  # the views' layer_offsets (kernels.kv_compact)
    # Tree steps committed. The inputs the step's kernels share (block table, lengths,
    # masks, kept rows) are checked in the first only: each check reads values back to
    # the host, a sync that would stall every step's launches.
    steps: int = 0
    aux: list | None = None  # the step's aux hidden states (moved with the hidden states)
    active: bool = False  # a tree step is under way (begin .. commit)
    context: torch.Tensor | None = None  # [R] num_computed before the step
    block_table: torch.Tensor | None = None  # [R, blocks] (the target's KV group)
    query_start: torch.Tensor | None = None
    cu_num_logits: torch.Tensor | None = None
    rows: tuple | None = None  # the step's tree_step.logits_rows (b, j, query row)
    caches: list = field(default_factory=list)  # target layers' KV caches, this step
    verdicts: list = field(default_factory=list)  # one per sampler chunk


def new_run(max_reqs: int, n: int, head_size: int, device) -> TreeRun:
    # One spare row: batch rows V2 masks with request state -1 are filed there.
    full = dict(size=(max_reqs + 1, n), dtype=torch.int64, device=device)
    return TreeRun(torch.full(fill_value=-1, **full), torch.zeros(**full), head_size,
                   mask=torch.zeros(max_reqs + 1, n + 1, n + 1, dtype=torch.bool,
                                    device=device),
                   tokens=torch.full(fill_value=-1, **full),
                   graph=tree_attention.graph_rows(max_reqs, n, device))


def _states(run: TreeRun, idx_mapping: torch.Tensor) -> torch.Tensor:
    """Batch rows' request states for the run's buffers: a masked row (state -1) goes to
    the spare last row, where it can overwrite no request's tree."""
    states = idx_mapping.long()
    return torch.where(states >= 0, states, run.parents.shape[0] - 1)


def store_tree(run: TreeRun, idx_mapping: torch.Tensor, parents: torch.Tensor,
               depth: torch.Tensor, mask: torch.Tensor | None = None) -> None:
    """The drafter's new trees (by batch row) filed by request state, as V2 files
    ``draft_tokens``; ``mask`` their ancestor masks where the drafter built them (else
    built here)."""
    states = _states(run, idx_mapping)
    run.parents[states] = parents
    run.depth[states] = depth
    run.mask[states] = ancestor_mask(parents) if mask is None else mask


def begin(run: TreeRun, positions: torch.Tensor, query_start_loc: torch.Tensor,
          cu_num_logits: torch.Tensor, idx_mapping: torch.Tensor,
          num_computed: torch.Tensor, block_table: torch.Tensor, total_logits: int,
          num_tokens: int, cu_num_logits_host=None) -> None:
    """Step 1 (module doc). ``num_computed`` by request state, not yet advanced;
    ``num_tokens`` the step's query rows and ``cu_num_logits_host`` (V2's
    ``cu_num_logits_np``) its logits counts, host-side."""
    # Each logits row's (batch row, index in its request, query row), which every brick
    # of the step reads: made once (~10 small ops each time).
    rows = tree_step.logits_rows(query_start_loc, cu_num_logits, total_logits)
    step = tree_attention.tree_rows(query_start_loc, cu_num_logits, idx_mapping,
                                    num_computed, run.parents, total_logits,
                                    cu_num_logits_host, rows, run.mask)
    run.active = step is not None
    if not run.active:
        return
    run.rows = rows
    step.checked = run.steps > 0  # the tree attention's inputs: checked in the first step
    if run.graph is not None:  # the step may replay a FULL graph of the target
        run.graph_filled = tree_attention.fill_graph(run.graph, step, num_tokens)
    tree_step.set_tree_positions(positions, query_start_loc, cu_num_logits, idx_mapping,
                                 run.depth, total_logits, rows)
    run.context = num_computed.long()[idx_mapping.long()]
    run.block_table = block_table
    run.query_start, run.cu_num_logits = query_start_loc, cu_num_logits
    run.caches, run.verdicts = [], []
    step.caches = run.caches  # filled by the attention wrapper, layer by layer
    tree_attention.set_step(step)


def end_forward(run: TreeRun, positions: torch.Tensor, total_logits: int) -> None:
    """Step 3 (module doc)."""
    tree_attention.set_step(None)
    if not run.active:
        return
    if run.graph_filled:
        tree_attention.clear_graph(run.graph)
        run.graph_filled = False
    if not run.caches and run.graph is not None and run.graph.caches:
        run.caches = list(run.graph.caches)  # a FULL graph replayed the target
    if not run.caches:  # no target layer went through the wrapped FlashAttention
        run.active = False
        raise RuntimeError(
            "vllm-dspark: VLLM_DSPARK_TREE=on needs the target on vLLM's FLASH_ATTN "
            "attention backend (no tree rows were attended in this step); start the "
            "engine with attention_backend='FLASH_ATTN', or unset VLLM_DSPARK_TREE.")
    tree_step.set_chain_positions(positions, run.query_start, run.cu_num_logits,
                                  total_logits, run.rows)


def commit(run: TreeRun, hidden: list[torch.Tensor], total_logits: int) -> None:
    """Step 5 (module doc): ``hidden`` the target's hidden states and aux hidden
    states [T, ...] of this step, moved in place."""
    if not run.active:
        return
    v = run.verdicts
    verdict = v[0] if len(v) == 1 else TreeVerdict(
        *(torch.cat([getattr(x, f) for x in v]) for f in
          ("accepted", "num_accepted", "tokens", "num_emitted")))
    if len(run.views_of) != len(run.caches) or any(
            a is not b for a, b in zip(run.views_of, run.caches)):
        run.views_of = list(run.caches)
        run.views = [tree_step.flash_attn_kv_views(c, run.head_size) for c in run.caches]
        run.offsets = layer_offsets(run.views)
    tree_step.compact_target_kv(run.views, run.block_table, run.context, verdict,
                                offsets=run.offsets, check=run.steps == 0)
    run.steps += 1
    tree_step.kept_rows_first(hidden, run.query_start, run.cu_num_logits, verdict,
                              total_logits, run.rows)
    run.active, run.caches, run.verdicts = False, [], []


def node_tokens(draft_sampled: torch.Tensor, cu_num_logits: torch.Tensor,
                n: int) -> torch.Tensor:
    """[R, N] the nodes' tokens from V2's ``draft_sampled`` (each logits row's input
    token: the root's, then node i's at row 1 + i); -1 past a request's admitted nodes
    (a draw never matches it)."""
    cu = cu_num_logits.long()
    i = torch.arange(n, device=draft_sampled.device)
    row = cu[:-1, None] + 1 + i[None, :]
    live = row < cu[1:, None]
    last = max(draft_sampled.shape[0] - 1, 0)
    return torch.where(live, draft_sampled.long()[row.clamp(max=last)], -1)


def sample_rows(run: TreeRun, logits, draft_sampled, cu_num_logits, idx_mapping,
                expanded_idx_mapping, pos, draw) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 4 for one sampler chunk: (sampled [R, N+1], num_sampled [R]) as V2's chain
    rejection sampler returns them; the verdict is kept for ``commit``. The nodes'
    tokens are read from the rows, as V2's rejection sampler has them
    (``draft_sampled``), and filed by request state for ``tree_sample``."""
    states = _states(run, idx_mapping)  # a masked row reads and writes the spare row
    run.tokens[states] = node_tokens(draft_sampled, cu_num_logits, run.parents.shape[1])
    verdict, sampled, num_sampled = tree_step.tree_sample(
        logits, cu_num_logits, states, expanded_idx_mapping, pos, run.tokens, run.parents,
        run.depth, draw)
    run.verdicts.append(verdict)
    return sampled, num_sampled


RUN: TreeRun | None = None  # this worker's tree state (VLLM_DSPARK_TREE=on)
