"""Draft trees from one DSpark block (issue 17): branch where the drafter is unsure.

The backbone drafts a block of γ positions in one pass from mask tokens, so its base
logits U_d and states h_d do not depend on which tokens are chosen; only the sequential
head does. A child at depth d+1 of a node with token x therefore costs one Markov step,
logits U_d + B(x, h_d, state), and one confidence c = σ(wᵀ[h_d; W1[x]] / t_d) (eq. 7,
STS temperature t_d). No extra backbone pass (vllm-internals §6.5).

**Branching rule.** Expanding node P (the root is the anchor token, depth 0), with q_P
the Markov-corrected softmax of its children (temperature T applied; T = 1 for greedy
rows) and c_P the confidence of P's best child (the confidence head's, or without a
head q_P's largest probability):

- c_P ≥ ``branch_below``: one child; c_P < ``branch_below``: ``width`` children;
- deterministic children (greedy rows, and T > 0 unless ``sample_children``): the top
  tokens of P's corrected logits; child j (0-based) is accepted given P was with
  estimated chance e_0 = c_P, e_j = (1 − c_P)·q_P(x_j)/(1 − q_P(x_0)): what the best
  child leaves, shared among the alternatives in proportion to q. Greedy verification
  accepts at most one sibling, so these chances add up like probabilities;
- sampled children (T > 0 with ``sample_children``): drawn from q_P without replacement
  (Gumbel top-k; rank j = draw order), e_j = c_P·(1 − c_P)^j. This chance must not
  depend on the child's own token, and later draws must rank after earlier ones: the
  recursive rejection verifier (``tree_verify``) is lossless only if which children
  are verified never looks at the tokens they are tested against.

A node's ``survival`` is ∏ e along its path (≤ its parent's), its expected acceptance.

**Node order and budget.** The tree holds the ``budget`` (N) best nodes of the infinite
tree the rule generates (depth ≤ γ), in the total order: survival descending, then
depth ascending, then (parent's rank, child rank). A parent always precedes its children,
so the order is topological and every prefix of it is a subtree: a scheduler that admits
a prefix of nodes (``schedule.tree``) admits a subtree. Best-first growth
(``tree_naive``) and this level-by-level version (keep each depth's N best, which holds
every node of the global N best) give the same tree.

**q.** For T > 0, ``probs[i]`` is the distribution node i was drawn from: q at its parent
for deterministic children (a fixed candidate set; the verifier does not need it), and
for sampled child j, q at its parent with its earlier siblings' tokens removed,
renormalised, which is what recursive rejection needs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_dspark.decode.draft import GREEDY_EPS, position_confidence, sts_per_position
from vllm_dspark.model.confidence_head import ConfidenceHead
from vllm_dspark.model.markov_head import MarkovHead


@dataclass(frozen=True)
class TreeSpec:
    budget: int = 16  # N: nodes per request at most
    # The defaults make the tree the N best nodes by estimated survival (every node
    # may have up to 16 children, all ranked together): tuned on training prompts
    # (benchmarks/README.md, "Tree shape"), that beat narrower or thresholded shapes.
    width: int = 16  # children of a node whose best child's confidence is low
    branch_below: float = 1.0  # "low": c_P < branch_below (0: never branch, a chain)
    sample_children: bool = False  # T > 0: draw children from q (recursive rejection)

    def __post_init__(self):
        if self.budget < 1 or self.width < 1:
            raise ValueError(f"a tree needs budget >= 1 and width >= 1, got {self}")


def chain_spec(gamma: int) -> TreeSpec:
    """The chain: one child everywhere, γ nodes (``decode.draft.sample_block``'s block)."""
    return TreeSpec(budget=gamma, width=1)


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [R, N] int64
    parents: torch.Tensor  # [R, N] int64: -1 = the root (anchor), else an earlier node
    depth: torch.Tensor  # [R, N] int64: the draft position 1..γ; 0 on padding
    sibling: torch.Tensor  # [R, N] int64: rank among the parent's children (top-k/draw order)
    confidence: torch.Tensor  # [R, N] float32: e, chance of acceptance given the parent's
    survival: torch.Tensor  # [R, N] float64: ∏ e along the path, nonincreasing in a row
    count: torch.Tensor  # [R] int64: nodes in use; later ones are padding (survival 0)
    probs: torch.Tensor | None  # [R, N, V] float32: the q each node was drawn from (T > 0)
    sampled: bool  # children of rows with T > 0 were drawn from q (else: top-k)


def children(
    logits: torch.Tensor,  # [..., V] float32 corrected logits of P's children
    temp: torch.Tensor,  # [...] float32, T (1 on greedy rows)
    c: torch.Tensor | None,  # [...] float32 head confidence of P's best child, None: no head
    sample: torch.Tensor | None,  # [...] bool: draw children (T > 0 and sample_children);
    # None: no row draws (top tokens everywhere; no host sync)
    spec: TreeSpec,
    generator: torch.Generator | None,
):
    """The branching rule at a batch of nodes P: (tokens, e, valid, q), with tokens,
    e (float32) and valid [..., k] (k = min(width, V)) in rank order, q [..., V]."""
    q = torch.softmax(logits / temp[..., None], dim=-1)
    if c is None:
        c = q.amax(-1)
    k = min(spec.width, logits.shape[-1])
    score = logits
    if sample is None:
        sample = torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    elif bool(sample.any()):
        gumbel = -torch.empty_like(q).exponential_(generator=generator).log()
        score = torch.where(sample[..., None], logits / temp[..., None] + gumbel, logits)
    tokens = score.topk(k, dim=-1).indices  # sorted: rank j = top-k order / draw order
    qx = q.gather(-1, tokens).double()
    cd = c.double()[..., None]
    j = torch.arange(k, device=logits.device)
    split = (1 - cd) * qx / (1 - qx[..., :1]).clamp(min=1e-30)  # deterministic alternatives
    geometric = cd * (1 - cd) ** j  # sampled: independent of the tokens drawn
    e = torch.where(sample[..., None], geometric, torch.where(j == 0, cd, split))
    wide = c < spec.branch_below
    valid = (j == 0) | wide[..., None]
    valid = valid & (~sample[..., None] | (qx > 0))  # never draw a zero-probability token
    return tokens, e.clamp(0, 1).float(), valid, q


def without_earlier_siblings(q: torch.Tensor, drawn: torch.Tensor, j: int) -> torch.Tensor:
    """q [..., V] with the first j drawn tokens (drawn [..., ≥j]) removed, renormalised:
    the distribution the j-th draw without replacement came from."""
    if j == 0:
        return q
    out = q.scatter(-1, drawn[..., :j], 0.0)
    return out / out.sum(-1, keepdim=True).clamp(min=1e-30)


def row_temperatures(temperature: torch.Tensor | None, r: int, device) -> torch.Tensor:
    """[R] float32 softmax temperature per row: T, or 1 for greedy rows (for ranking)."""
    if temperature is None:
        return torch.ones(r, dtype=torch.float32, device=device)
    t = temperature.to(device=device, dtype=torch.float32)
    return torch.where(t < GREEDY_EPS, torch.ones_like(t), t)


@torch.no_grad()
def draft_tree(
    base_logits: torch.Tensor,  # [R, γ, V] U_d
    hidden: torch.Tensor,  # [R, γ, H] h_d
    anchor_ids: torch.Tensor,  # [R]
    temperature: torch.Tensor | None,  # [R]; None (or all < GREEDY_EPS): greedy
    markov_head: MarkovHead | None,
    confidence_head: ConfidenceHead | None,
    sts_temperatures: list[float] | None,
    spec: TreeSpec,
    generator: torch.Generator | None = None,
    graph_safe: bool = False,
) -> DraftTree:
    """Batched over requests, one step per depth (γ steps, each over ≤ N parents).

    ``graph_safe``: no host synchronisation and shapes fixed by (R, γ, N) alone, so a
    CUDA graph can hold it (the V2 speculator). Children are then the top tokens at any
    temperature and q is not kept (``probs`` None): the fixed-candidate verifier, which
    draws from the target and descends where a child matches, needs neither. Sampled
    children (``spec.sample_children``) are refused there."""
    r, gamma, _ = base_logits.shape
    n, dev = spec.budget, hidden.device
    rows = torch.arange(r, device=dev)[:, None]
    temp = row_temperatures(temperature, r, dev)
    if graph_safe:
        if spec.sample_children:
            raise ValueError("graph_safe trees have top-k children: sample_children=False")
        stochastic, sample = False, None
    else:
        hot = (temperature.to(dev) >= GREEDY_EPS if temperature is not None
               else torch.zeros(r, dtype=torch.bool, device=dev))  # [R] rows with T > 0
        stochastic = bool(hot.any())  # then q is kept (for every row)
        sample = hot & spec.sample_children
    sts = sts_per_position(sts_temperatures, gamma)
    # The parents being expanded, [R, M]: the root, then each depth's kept nodes in order.
    par_tok = anchor_ids.long()[:, None]
    par_surv = torch.ones(r, 1, dtype=torch.float64, device=dev)
    par_valid = torch.ones(r, 1, dtype=torch.bool, device=dev)
    state = markov_head.init_state((r, 1), hidden) if markov_head is not None else None
    levels = []
    for d in range(gamma):
        m = par_tok.shape[1]
        h = hidden[:, d, None, :].expand(r, m, -1)
        logits = base_logits[:, d, None, :].float().expand(r, m, -1)
        if markov_head is not None:
            bias, state = markov_head.step(par_tok, h, state)
            logits = logits + bias.float()
        c = (position_confidence(confidence_head, markov_head, h, par_tok, sts[d])
             if confidence_head is not None else None)
        tok, e, valid, q = children(logits, temp[:, None].expand(r, m), c,
                                    None if sample is None else sample[:, None].expand(r, m),
                                    spec, generator)
        k = tok.shape[-1]
        valid = valid & par_valid[..., None]
        surv = torch.where(valid, par_surv[..., None] * e.double(), -1.0).reshape(r, m * k)
        # This depth's N best, in the global order's tie-break: stable sort on (m, j).
        keep = torch.sort(surv, dim=1, descending=True, stable=True).indices[:, :n]
        par = torch.div(keep, k, rounding_mode="floor")  # parent's index at depth d-1
        level = dict(
            tok=tok.reshape(r, m * k).gather(1, keep), surv=surv.gather(1, keep),
            e=e.reshape(r, m * k).gather(1, keep), valid=valid.reshape(r, m * k).gather(1, keep),
            parent=par, sibling=keep % k, q=q if stochastic else None, drawn=tok,
        )
        levels.append(level)
        if state is not None:  # children inherit the state of their parent's step
            state = state[rows, par]
        par_tok, par_surv, par_valid = level["tok"], level["surv"], level["valid"]
    return _assemble(levels, n, sample, stochastic)


def _assemble(levels, n, sample, stochastic) -> DraftTree:
    """The N best kept nodes over all depths, in the global order, parents renumbered."""
    cat = {key: torch.cat([lv[key] for lv in levels], 1)
           for key in ("tok", "surv", "e", "valid", "parent", "sibling")}
    r, total = cat["tok"].shape
    dev = cat["tok"].device
    sizes = [lv["tok"].shape[1] for lv in levels]
    # Built on the device from Python ints (no host-to-device copy: CUDA-graph safe).
    starts = [sum(sizes[:d]) for d in range(len(sizes))]
    offsets = torch.cat([torch.full((1,), o, device=dev) for o in starts])
    depth = torch.cat([torch.full((s,), d + 1, device=dev) for d, s in enumerate(sizes)])
    # Concatenated by (depth, rank in depth): a stable sort on survival is the global order.
    surv = torch.where(cat["valid"], cat["surv"], -1.0)
    order = torch.sort(surv, dim=1, descending=True, stable=True).indices[:, :n]
    valid = cat["valid"].gather(1, order)
    rank = torch.full((r, total), -1, dtype=torch.long, device=dev)
    rank.scatter_(1, order, torch.arange(order.shape[1], device=dev).expand(r, -1).contiguous())
    d_sel = depth[order]
    parent_cat = torch.where(d_sel > 1, offsets[(d_sel - 2).clamp(min=0)] + cat["parent"]
                             .gather(1, order), -1)
    parents = torch.where(parent_cat >= 0, rank.gather(1, parent_cat.clamp(min=0)), -1)
    pad = lambda x, fill: torch.where(valid, x, fill)  # noqa: E731
    probs = _node_probs(levels, order, depth, offsets, sample) if stochastic else None
    if probs is not None:
        probs = probs * valid[..., None]
    tree = DraftTree(
        tokens=pad(cat["tok"].gather(1, order), 0), parents=pad(parents, -1),
        depth=pad(d_sel, 0), sibling=pad(cat["sibling"].gather(1, order), 0),
        confidence=pad(cat["e"].gather(1, order), 0.0),
        survival=pad(cat["surv"].gather(1, order), 0.0), count=valid.sum(1),
        probs=probs, sampled=sample is not None and bool(sample.any()),
    )
    return _pad_to(tree, n)


def _node_probs(levels, order, depth, offsets, sample) -> torch.Tensor:
    """[R, N', V]: q at each selected node's parent, less its earlier siblings if sampled."""
    r, n_sel = order.shape
    v = levels[0]["q"].shape[-1]
    out = torch.zeros(r, n_sel, v, dtype=torch.float32, device=order.device)
    d_sel = depth[order]
    for d, lv in enumerate(levels):
        at = d_sel == d + 1
        if not bool(at.any()):
            continue
        ri, slot = at.nonzero(as_tuple=True)
        local = order[ri, slot] - offsets[d]
        par, j = lv["parent"][ri, local], lv["sibling"][ri, local]
        q, drawn = lv["q"][ri, par], lv["drawn"][ri, par]  # [n, V], [n, k]
        for jj in range(int(j.max()) + 1):
            pick = (j == jj) & sample[ri]
            q[pick] = without_earlier_siblings(q[pick], drawn[pick], jj)
        out[ri, slot] = q
    return out


def _pad_to(tree: DraftTree, n: int) -> DraftTree:
    """Pad the node axis to exactly N (a tree with fewer reachable nodes)."""
    have = tree.tokens.shape[1]
    if have == n:
        return tree
    extra = n - have

    def grow(x, fill):
        shape = (x.shape[0], extra) + tuple(x.shape[2:])
        return torch.cat([x, torch.full(shape, fill, dtype=x.dtype, device=x.device)], 1)

    return DraftTree(
        tokens=grow(tree.tokens, 0), parents=grow(tree.parents, -1), depth=grow(tree.depth, 0),
        sibling=grow(tree.sibling, 0), confidence=grow(tree.confidence, 0.0),
        survival=grow(tree.survival, 0.0), count=tree.count,
        probs=grow(tree.probs, 0.0) if tree.probs is not None else None, sampled=tree.sampled,
    )
