"""Per-position survival outcomes of real drafts, in plain torch (no vLLM).

STS (paper §3.2.1) needs, on held-out prompts, the confidence logits of drafted
blocks and whether each prefix of the block survived verification. Why no
engine: the engine drafts with the same weights and the same math as the
plain-torch drafter (``draft_block_states`` + ``sample_block``; the greedy and
training tests hold them equal, and ``train.blocks.build_blocks`` drafts many
anchors in one pass with the same result), and verification is a short formula
once the target's logits are known. Plain torch also lets us draft at *every*
anchor of a continuation, not only where the engine happened to draft.

Per held-out prompt: the target writes a continuation (HF ``generate``, greedy
at T = 0, sampled at T > 0); one target pass over prompt + continuation gives
the drafter's features (``hs[i+1]`` for target layer i, as in training) and a KV
cache; every anchor p in the continuation (or every ``stride``-th) drafts a
block from context < p; a second target pass over all drafted tokens, with a
4-D mask so that draft j of anchor p sees only positions ≤ p and the drafts of
its own block before it, yields the target's logits *given the drafted prefix*.
That is exact verification, also at T > 0 where an accepted draft token may
differ from the continuation's token:

- T = 0: draft k accepted iff it is the target's argmax given the prefix;
- T > 0: accepted with probability min(1, p_t(x)/q(x)) (speculative rejection
  sampling), p_t the target's softmax at T, q the draft distribution.

s[n, k] = 1 iff drafts 0..k were all accepted. Position k is valid iff its
token position p+k+1 lies inside the continuation (the request would have
ended otherwise) and no earlier accepted draft was an end-of-sequence token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from vllm_dspark.decode.draft import sample_block
from vllm_dspark.model.drafter import DSparkDrafter, target_features
from vllm_dspark.train.blocks import build_blocks

ANCHOR_CHUNK = 64  # anchors drafted/verified per pass: bounds the [A·γ, V] logits


@dataclass
class Outcomes:
    z: np.ndarray  # [N, γ] float64 raw confidence logits
    s: np.ndarray  # [N, γ] int8 cumulative survival
    mask: np.ndarray  # [N, γ] bool
    meta: dict = field(default_factory=dict)
    prompt: np.ndarray | None = None  # [N] index of the prompt each block came from

    def split(self, holdout: float) -> tuple[Outcomes, Outcomes | None]:
        """(fit, held out): the last ⌈holdout · prompts⌉ prompts' blocks are held out,
        whole prompts, since blocks of one answer are not independent. None when
        nothing can be held out (holdout 0, one prompt, or no prompt indices)."""
        n = int(self.prompt.max()) + 1 if self.prompt is not None and self.prompt.size else 0
        k = min(math.ceil(holdout * n), n - 1) if holdout > 0 else 0
        if k <= 0:
            return self, None
        held = self.prompt >= n - k
        part = lambda rows: Outcomes(self.z[rows], self.s[rows], self.mask[rows],  # noqa: E731
                                     dict(self.meta), self.prompt[rows])
        return part(~held), part(held)

    def tau(self) -> float:
        """Mean accepted drafts + 1 (bonus token) over blocks valid at every position."""
        full = self.mask.all(axis=1)
        return float(1.0 + self.s[full].sum(axis=1).mean()) if full.any() else float("nan")


def confidence_logits(drafter: DSparkDrafter, hidden: torch.Tensor, anchor_ids: torch.Tensor,
                      tokens: torch.Tensor) -> torch.Tensor:
    """[B, γ] confidence logits z_k of drafted blocks, before any STS temperature.

    The same inputs as ``sample_block`` (eq. 7): [h_k; W1[x_{k-1}]] with x_{-1} the
    anchor and x_{k-1} the token drafted at k-1; sigmoid(z) is its ``confidence``
    when no temperatures are given (the tests hold the two equal).
    """
    head, markov = drafter.confidence_head, drafter.markov_head
    prev = torch.cat([anchor_ids[:, None].long(), tokens[:, :-1]], dim=1)
    emb = markov.prev_embed(prev) if head.with_markov else None
    return head(hidden, emb).float()


def _verify_logits(target, cache, seq_len: int, anchors: torch.Tensor, tokens: torch.Tensor,
                   first: torch.Tensor) -> torch.Tensor:
    """[A, γ, V]: the target's logits for draft k given prompt+continuation ≤ p and
    drafts < k. ``first`` [A, V] (k = 0) comes from the sequence pass; the other
    γ-1 come from one pass over drafts 0..γ-2 of every block on top of ``cache``."""
    a, gamma = tokens.shape
    if gamma == 1:
        return first[:, None]
    dev, n = tokens.device, gamma - 1
    q = tokens[:, :n].reshape(1, a * n)
    pos = (anchors[:, None] + 1 + torch.arange(n, device=dev)).reshape(1, a * n)
    ctx_ok = torch.arange(seq_len, device=dev)[None, :] <= anchors[:, None]  # [A, S]
    ctx_ok = ctx_ok[:, None].expand(a, n, seq_len).reshape(a * n, seq_len)
    blk = torch.arange(a, device=dev).repeat_interleave(n)
    j = torch.arange(n, device=dev).repeat(a)
    own = (blk[:, None] == blk[None, :]) & (j[None, :] <= j[:, None])  # causal in the block
    allowed = torch.cat([ctx_ok, own], dim=1)
    dtype = next(target.parameters()).dtype
    mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    out = target(input_ids=q, position_ids=pos, attention_mask=mask[None, None],
                 past_key_values=cache, use_cache=True)
    cache.crop(seq_len - cache.get_seq_length())  # drop this chunk's drafts again
    rest = out.logits[0].float().view(a, n, -1)
    return torch.cat([first[:, None].float(), rest], dim=1)


@torch.no_grad()
def collect_sequence(target, drafter: DSparkDrafter, ids: torch.Tensor, prompt_len: int, *,
                     temperature: float = 0.0, anchor_stride: int = 1, gamma: int | None = None,
                     stop_ids: tuple[int, ...] = (), probabilistic: bool = True,
                     generator: torch.Generator | None = None,
                     chunk: int = ANCHOR_CHUNK) -> tuple[torch.Tensor, ...]:
    """(z [A, γ], s [A, γ], mask [A, γ]) for the anchors of one sequence ``ids`` [S]."""
    cfg = drafter.cfg
    gamma = gamma or cfg.block_size
    seq_len, dev = ids.shape[0], ids.device
    # Anchors are continuation tokens with at least one continuation token after them.
    anchors_all = torch.arange(prompt_len, seq_len - 1, anchor_stride, device=dev)
    empty = torch.zeros(0, gamma, device=dev)
    if anchors_all.numel() == 0:
        return empty, empty, empty.bool()
    out = target(input_ids=ids[None], output_hidden_states=True, use_cache=True)
    feats = target_features(out.hidden_states, cfg.target_layer_ids).to(drafter.fc.weight)
    ctx = drafter.context(feats)
    cache = out.past_key_values
    stops = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
    zs, ss, ms = [], [], []
    for anchors in anchors_all.split(chunk):
        a = anchors.numel()
        blocks = build_blocks(anchors[None], torch.ones(1, a, dtype=torch.bool, device=dev),
                              ids[None], torch.tensor([seq_len], device=dev), gamma,
                              cfg.mask_token_id)
        hidden = drafter.backbone(blocks.block_ids, blocks.positions, ctx,
                                  blocks.ctx_positions, blocks.mask).view(a, gamma, -1)
        anchor_ids = ids[anchors]
        sampled = temperature > 0
        temp = torch.full((a,), temperature, device=dev) if sampled else None
        block = sample_block(drafter.base_logits(hidden), hidden, anchor_ids, temp,
                             drafter.markov_head, drafter.confidence_head,
                             want_probs=sampled and probabilistic, generator=generator)
        z = confidence_logits(drafter, hidden, anchor_ids, block.tokens)
        tlogits = _verify_logits(target, cache, seq_len, anchors, block.tokens,
                                 out.logits[0, anchors])
        x = block.tokens
        if not sampled:
            acc = x == tlogits.argmax(-1)
        else:
            px = torch.softmax(tlogits / temperature, -1).gather(-1, x[..., None])[..., 0]
            qx = (block.probs.gather(-1, x[..., None])[..., 0] if block.probs is not None
                  else torch.ones_like(px))  # greedy drafts are one-hot q
            u = torch.rand(px.shape, device=dev, generator=generator)
            acc = u * qx < px  # u < min(1, p/q)
        s = torch.cumprod(acc.long(), dim=1).bool()
        ended = s & torch.isin(x, stops)  # an accepted EOS ends the request
        after_end = torch.cumsum(ended.long(), dim=1) - ended.long() > 0
        mask = blocks.label_valid[0] & ~after_end
        mask = torch.cumprod(mask.long(), dim=1).bool()
        zs.append(z)
        ss.append(s & mask)
        ms.append(mask)
    return torch.cat(zs), torch.cat(ss), torch.cat(ms)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_pair(target_dir: str, draft_dir: str, device: torch.device,
              dtype: torch.dtype | None = None):
    """(tokenizer, HF target, drafter sharing the target's embedding and LM head)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_dspark.checkpoint import load_drafter

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    tok = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=dtype)
    target.to(device).eval().requires_grad_(False)
    drafter = load_drafter(draft_dir, target_embed=target.get_input_embeddings().weight,
                           target_lm_head=target.get_output_embeddings().weight,
                           dtype=dtype, device=device).eval()
    tc = target.config
    drafter.cfg.check_against_target(
        target_num_layers=tc.num_hidden_layers, target_vocab_size=tc.vocab_size,
        target_hidden_size=tc.hidden_size, num_speculative_tokens=None, source=draft_dir)
    return tok, target, drafter


def stop_token_ids(tok, target) -> tuple[int, ...]:
    eos = target.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tok.eos_token_id is not None:
        eos.append(tok.eos_token_id)
    return tuple(sorted(set(eos)))


@torch.no_grad()
def continuations(tok, target, prompt_ids: list[list[int]], *, temperature: float,
                  max_new_tokens: int, seed: int, batch_size: int = 8) -> list[list[int]]:
    """The target's own answers (HF generate, left-padded batches), cut after the
    first stop token. Greedy at T = 0, else pure temperature sampling (no top-k/p)."""
    from transformers import GenerationConfig

    dev = next(target.parameters()).device
    stops = list(stop_token_ids(tok, target))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (stops or [0])[0]
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    gen = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stops or None,
                           pad_token_id=pad, **(sampling if temperature > 0 else {}))
    torch.manual_seed(seed)
    out = []
    for i in range(0, len(prompt_ids), batch_size):
        rows = prompt_ids[i: i + batch_size]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for r, x in enumerate(rows):
            ids[r, width - len(x):] = torch.tensor(x)
            att[r, width - len(x):] = 1
        res = target.generate(input_ids=ids.to(dev), attention_mask=att.to(dev),
                              generation_config=gen)
        for r in range(len(rows)):
            cont = res[r, width:].tolist()
            cut = next((j + 1 for j, t in enumerate(cont) if t in stops), len(cont))
            out.append(cont[:cut])
    return out


def collect(target_dir: str, draft_dir: str, prompts: list[str], *, temperature: float = 0.0,
            max_new_tokens: int = 256, anchor_stride: int = 1, device: str = "auto",
            dtype: torch.dtype | None = None, seed: int = 0, probabilistic: bool = True,
            gen_batch_size: int = 8, gamma: int | None = None, log=None) -> Outcomes:
    """Outcomes of drafting at every ``anchor_stride``-th continuation token of each
    prompt's answer (chat template, generation prompt), verified at ``temperature``."""
    from vllm_dspark.prompts import chat_prompt_ids

    dev = resolve_device(device)
    tok, target, drafter = load_pair(target_dir, draft_dir, dev, dtype)
    if drafter.confidence_head is None:
        raise ValueError(f"{draft_dir} has no confidence head (enable_confidence_head is "
                         "false): there is nothing to calibrate.")
    gamma = gamma or drafter.cfg.block_size
    prompt_ids = [chat_prompt_ids(tok, p) for p in prompts]
    answers = continuations(tok, target, prompt_ids, temperature=temperature,
                            max_new_tokens=max_new_tokens, seed=seed,
                            batch_size=gen_batch_size)
    gen = torch.Generator(device=dev).manual_seed(seed + 1)
    stops = stop_token_ids(tok, target)
    zs, ss, ms, ps = [], [], [], []
    for n, (p, a) in enumerate(zip(prompt_ids, answers)):
        ids = torch.tensor(p + a, device=dev)
        z, s, m = collect_sequence(target, drafter, ids, len(p), temperature=temperature,
                                   anchor_stride=anchor_stride, gamma=gamma, stop_ids=stops,
                                   probabilistic=probabilistic, generator=gen)
        zs.append(z.cpu())
        ss.append(s.cpu())
        ms.append(m.cpu())
        ps.append(torch.full((z.shape[0],), n, dtype=torch.int32))
        if log is not None:
            log(f"[{n + 1}/{len(prompts)}] {len(a)} answer tokens, {z.shape[0]} blocks")
    meta = dict(prompts=len(prompts), answer_tokens=sum(map(len, answers)),
                temperature=temperature, gamma=gamma, anchor_stride=anchor_stride,
                draft_sample_method="probabilistic" if probabilistic else "greedy",
                max_new_tokens=max_new_tokens, seed=seed, device=str(dev),
                dtype=str(next(target.parameters()).dtype).replace("torch.", ""))
    return Outcomes(z=torch.cat(zs).double().numpy(), s=torch.cat(ss).to(torch.int8).numpy(),
                    mask=torch.cat(ms).numpy(), meta=meta, prompt=torch.cat(ps).numpy())
