"""Accepting a path of a draft tree against the target's logits (torch reference).

``target_logits[r, 0]`` is the target's output at the root (it predicts depth-1
tokens), ``target_logits[r, 1 + i]`` at node i (its children), from one tree-masked
forward (``tree_attention``). Only the first ``admitted[r]`` nodes take part (a prefix of
the tree's order is a subtree). The walk starts at the root and, at each node, either
descends to one admitted child or stops and emits one more token (the bonus):

- greedy rows (T < GREEDY_EPS): x = argmax p; descend to the child whose token is x.
  The path is the longest one whose tokens equal the target's argmax at their parents.
- T > 0, deterministic children (a fixed candidate set): draw x ~ p = softmax(l/T)
  (Gumbel-max, noise indexed by node); descend if a child's token is x, else emit x.
  Every emitted token is a plain draw from the target's distribution given the tokens
  before it, whatever the tree (built without looking at the target's noise), so the
  output is distributed exactly as the target's. Acceptance = Σ_children p(child).
  (Exact for sampled children too, ignoring their q; recursive rejection accepts more.)
- T > 0, sampled children (``DraftTree.sampled``; child j drawn from q_j, q with the
  earlier siblings removed): recursive rejection over the children in draw order. With
  p_1 = p: accept child j if u_j·q_j(x_j) < p_j(x_j), else p_{j+1} = norm(max(p_j − q_j, 0));
  if none is accepted emit a draw from the last residual. Each round is one standard
  rejection step of p_j with proposal q_j (x_j | x_{<j} ~ q_j, and the residual does not
  depend on x_j), so by induction from the last round the emitted token ~ p. Lossless
  when which children are verified never depends on their own tokens or later draws
  (the tree's rule for sampled children, and Algorithm 1 over nodes, keep that).

Randomness is explicit (``TreeNoise``), indexed by tree row, so a kernel can be held to
this reference draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_dspark.decode.draft import GREEDY_EPS
from vllm_dspark.decode.tree import DraftTree


@dataclass
class TreeNoise:
    gumbel: torch.Tensor  # [R, N+1, V] float32: the draw from p (or the residual) at a row
    uniform: torch.Tensor  # [R, N] float64: the accept test of node i (recursive rejection)


def draw_noise(r: int, n: int, v: int, generator: torch.Generator | None = None,
               device="cpu") -> TreeNoise:
    gumbel = -torch.empty(r, n + 1, v, device=device).exponential_(generator=generator).log()
    uniform = torch.rand(r, n, dtype=torch.float64, generator=generator, device=device)
    return TreeNoise(gumbel, uniform)


@dataclass
class TreeVerdict:
    accepted: torch.Tensor  # [R, N] int64: node indices along the accepted path; -1 after
    num_accepted: torch.Tensor  # [R] int64
    tokens: torch.Tensor  # [R, N+1] int64: the accepted nodes' tokens, then the bonus; -1 after
    num_emitted: torch.Tensor  # [R] int64 = num_accepted + 1


def kept_rows(verdict: TreeVerdict) -> torch.Tensor:
    """[R, N+1] tree rows (0 = root, 1 + i = node i) whose K/V and hidden states become
    context, in order: the root, then the accepted path; -1 after. What KV compaction
    moves to slots num_computed + 0, 1, ..."""
    acc = verdict.accepted
    rows = torch.where(acc >= 0, acc + 1, -1)
    return torch.cat([torch.zeros_like(rows[:, :1]), rows], 1)


@torch.no_grad()
def verify_tree(
    tree: DraftTree,
    target_logits: torch.Tensor,  # [R, N+1, V]
    temperature: torch.Tensor | None,  # [R]; None: greedy
    noise: TreeNoise | None = None,  # needed for rows with T > 0
    admitted: torch.Tensor | None = None,  # [R] nodes verified; None: tree.count
) -> TreeVerdict:
    """One request at a time, one node at a time: the reference for kernels."""
    r, n = tree.tokens.shape
    admitted = (tree.count if admitted is None else admitted).tolist()
    temps = [0.0] * r if temperature is None else temperature.tolist()
    accepted = torch.full((r, n), -1, dtype=torch.long)
    tokens = torch.full((r, n + 1), -1, dtype=torch.long)
    num = torch.zeros(r, dtype=torch.long)
    for b in range(r):
        toks = tree.tokens[b].tolist()
        path, bonus = _walk(tree, b, toks, admitted[b], target_logits[b].float(), temps[b], noise)
        accepted[b, : len(path)] = torch.tensor(path, dtype=torch.long)
        tokens[b, : len(path)] = torch.tensor([toks[i] for i in path], dtype=torch.long)
        tokens[b, len(path)], num[b] = bonus, len(path)
    return TreeVerdict(accepted, num, tokens, num + 1)


def _walk(tree: DraftTree, b: int, toks: list[int], admitted: int, logits, t: float, noise):
    """(accepted node indices, bonus token) of request b."""
    parents, sibling = tree.parents[b].tolist(), tree.sibling[b].tolist()
    kids = {}
    for i in sorted(range(admitted), key=lambda i: sibling[i]):  # rank (draw) order
        kids.setdefault(parents[i], []).append(i)
    cur, path = -1, []
    while True:
        row, options = logits[cur + 1], kids.get(cur, [])
        if t >= GREEDY_EPS and tree.sampled:
            p = torch.softmax(row / t, -1)
            nxt, x = _recursive_rejection(tree, b, toks, options, p, noise, cur)
        else:  # greedy, or a draw from p against a fixed candidate set
            x = int(row.argmax() if t < GREEDY_EPS else (row / t + noise.gumbel[b, cur + 1])
                    .argmax())
            nxt = next((i for i in options if toks[i] == x), None)
        if nxt is None:
            return path, x
        path.append(nxt)
        cur = nxt


def _recursive_rejection(tree, b, toks, options, p, noise, cur):
    """(accepted child or None, its token or the residual's draw) at node ``cur``."""
    p = p.double()
    for i in options:
        q, x = tree.probs[b, i].double(), toks[i]
        if float(noise.uniform[b, i]) * float(q[x]) < float(p[x]):
            return i, x
        residual = (p - q).clamp(min=0)
        if float(residual.sum()) > 0:  # 0 only if p = q up to rounding: keep p then
            p = residual / residual.sum()
    return None, int((p.float().log() + noise.gumbel[b, cur + 1]).argmax())


@torch.no_grad()
def walk_draws(draws: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor,
               admitted: torch.Tensor) -> TreeVerdict:
    """The acceptance walk over target draws made beforehand, one per tree row.

    ``draws`` [R, N+1]: row 0 the root's, row 1 + i node i's draw from the target's
    distribution there (its argmax at T = 0); ``tokens``/``parents`` [R, N] the tree,
    ``admitted`` [R] how many nodes take part. From the root, descend to the admitted
    child whose token is the current row's draw; the first draw with no such child is
    the bonus. Only the draws along the walked path are read, one per depth, so drawing
    every row first (one batched sampler call, as vLLM's V2 runner samples) gives the
    same law as drawing at each node on the way: exact at any temperature for trees with
    deterministic children (``kernels.tree_accept`` walks logits and noise the same way).
    Fixed shapes, no host sync (N + 1 steps)."""
    r, n = tokens.shape
    dev = tokens.device
    rows = torch.arange(r, device=dev)
    node = torch.arange(n, device=dev)
    live = node[None, :] < admitted[:, None]
    accepted = torch.full((r, n), -1, dtype=torch.long, device=dev)
    emitted = torch.full((r, n + 1), -1, dtype=torch.long, device=dev)
    num = torch.zeros(r, dtype=torch.long, device=dev)
    cur = torch.full((r,), -1, dtype=torch.long, device=dev)
    active = torch.ones(r, dtype=torch.bool, device=dev)
    for step in range(n + 1):
        x = draws[rows, cur + 1].long()
        child = live & (parents == cur[:, None]) & (tokens == x[:, None])
        found = child.any(-1) & active
        nxt = torch.where(child, node, n).amin(-1)
        emitted[:, step] = torch.where(active, x, emitted[:, step])
        if step < n:
            accepted[:, step] = torch.where(found, nxt, accepted[:, step])
        num += found.long()
        cur = torch.where(found, nxt, cur)
        active = found
    return TreeVerdict(accepted, num, emitted, num + 1)
