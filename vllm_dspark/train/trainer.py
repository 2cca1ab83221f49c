"""The training loop: frozen target on the fly, drafter on anchored blocks.

Each step takes a batch of sequences (chat prompt + the target's own answer),
runs the frozen target once to get its hidden states at ``target_layer_ids``
(no disk cache: a 135M target costs a few ms per batch) and its logits, samples
anchors in the answer, drafts all their blocks in one drafter pass
(``blocks.build_blocks``) and applies the DSpark objective. The drafter shares
the target's embedding and LM head, frozen; everything else trains.

State (weights, optimizer, step, data cursor, RNG, loss history) is saved to
``<out>/train_state.pt`` every ``save_every`` steps and when the time budget
runs out, so rerunning the same command resumes. The exported checkpoint
(config.json + model.safetensors, DeepSpec names, no embedding/LM-head copies)
is rewritten at every save; ``training.json`` says whether training finished.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from vllm_dspark.checkpoint import build_draft_config, save_drafter
from vllm_dspark.config import DSparkConfig
from vllm_dspark.model.drafter import DSparkDrafter, target_features
from vllm_dspark.prompts import token_ids
from vllm_dspark.train.blocks import build_blocks, sample_anchors
from vllm_dspark.train.data import load_rows
from vllm_dspark.train.objective import LossWeights, block_loss, expected_greedy_tau

STATE_NAME = "train_state.pt"
REPORT_NAME = "training.json"


@dataclass
class TrainConfig:
    target: str
    out: str
    data: str
    gamma: int = 7
    num_layers: int = 2
    intermediate_size: int | None = None
    target_layer_ids: list[int] | None = None  # None: evenly spaced (DFlash's rule)
    num_feature_layers: int = 3
    markov_rank: int = 32
    markov_head_type: str = "vanilla"
    confidence: bool = True
    mask_token_id: int | None = None  # None: chosen from the tokenizer
    steps: int = 2000
    batch_size: int = 8
    anchors: int = 128
    max_len: int = 1024
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "bfloat16"  # compute dtype (autocast); master weights stay fp32
    save_dtype: str = "bfloat16"
    save_every: int = 250
    log_every: int = 10
    max_minutes: float | None = None
    val_fraction: float = 0.02
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    loss_weights: LossWeights = field(default_factory=LossWeights)


def default_target_layer_ids(num_target_layers: int, n: int) -> list[int]:
    """n layers evenly spaced from 1 to L-3 (DFlash's choice; early, middle, late)."""
    if num_target_layers <= 3:
        return list(range(min(n, num_target_layers)))
    lo, hi = 1, num_target_layers - 3
    if n == 1:
        return [(lo + hi) // 2]
    return sorted({round(lo + i * (hi - lo) / (n - 1)) for i in range(n)})


def choose_mask_token(tokenizer) -> int:
    """A special token that never occurs in chat data: '<|mask|>' if the vocabulary
    has one, else the last added special token that is not BOS/EOS/PAD and does not
    occur in a rendered chat."""
    vocab = tokenizer.get_vocab()
    if "<|mask|>" in vocab:
        return vocab["<|mask|>"]
    chat = token_ids(tokenizer.apply_chat_template(
        [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
         {"role": "assistant", "content": "a"}], tokenize=True))
    used = set(chat) | {tokenizer.bos_token_id, tokenizer.eos_token_id,
                        tokenizer.pad_token_id, tokenizer.unk_token_id}
    specials = sorted(i for i in tokenizer.all_special_ids if i not in used)
    added = sorted(i for i, t in tokenizer.added_tokens_decoder.items()
                   if t.special and i not in used)
    pool = added or specials
    if not pool:
        raise ValueError("the target tokenizer has no spare special token for the drafter's "
                         "mask; pass --mask-token-id.")
    return pool[-1]


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.cfg = cfg
        self.device = torch.device(cfg.device)
        self.compute_dtype = getattr(torch, cfg.dtype)
        torch.manual_seed(cfg.seed)
        tok = AutoTokenizer.from_pretrained(cfg.target)
        target_dtype = self.compute_dtype if self.device.type == "cuda" else torch.float32
        self.target = AutoModelForCausalLM.from_pretrained(cfg.target, dtype=target_dtype)
        self.target.to(self.device).eval().requires_grad_(False)
        tcfg = self.target.config.to_dict()
        n_layers = tcfg["num_hidden_layers"]
        layer_ids = cfg.target_layer_ids or default_target_layer_ids(
            n_layers, cfg.num_feature_layers)
        mask_id = cfg.mask_token_id if cfg.mask_token_id is not None else choose_mask_token(tok)
        self.draft_config = build_draft_config(
            tcfg, num_hidden_layers=cfg.num_layers, target_layer_ids=layer_ids,
            block_size=cfg.gamma, mask_token_id=mask_id, markov_rank=cfg.markov_rank,
            markov_head_type=cfg.markov_head_type, enable_confidence_head=cfg.confidence,
            confidence_head_with_markov=cfg.confidence and cfg.markov_rank > 0,
            intermediate_size=cfg.intermediate_size,
        )
        self.draft_config["torch_dtype"] = cfg.save_dtype
        self.drafter = DSparkDrafter(DSparkConfig.from_dict(self.draft_config))
        self._init_weights()
        self.drafter.to(self.device)
        self.trainable = [p for n, p in self.drafter.named_parameters()
                          if n not in DSparkDrafter.SHARED_WITH_TARGET]
        fused = self.device.type == "cuda"
        self.opt = torch.optim.AdamW(self.trainable, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.95), fused=fused)
        rows = load_rows(cfg.data)
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(rows), generator=g).tolist()
        n_val = max(1, int(len(rows) * cfg.val_fraction)) if len(rows) > 1 else 0
        self.val_rows = [rows[i] for i in order[:n_val]]
        self.train_rows = [rows[i] for i in order[n_val:]] or rows
        self.step = 0
        self.epoch, self.cursor = 0, 0
        self.history: list[dict] = []
        self.val_history: list[dict] = []
        self.seconds = 0.0
        self.anchor_gen = torch.Generator().manual_seed(cfg.seed + 1)

    # ---------------------------------------------------------------- model
    def _init_weights(self) -> None:
        d = self.drafter
        with torch.no_grad():
            for name, p in d.named_parameters():
                if name in DSparkDrafter.SHARED_WITH_TARGET:
                    continue
                if p.dim() == 2:
                    p.normal_(0.0, 0.02)
                elif name.endswith("bias"):
                    p.zero_()
            if d.markov_head is not None:  # start as the plain backbone: bias 0
                d.markov_head.markov_w2.weight.zero_()
            d.embed_tokens.weight.copy_(self.target.get_input_embeddings().weight.float())
            d.lm_head.weight.copy_(self.target.get_output_embeddings().weight.float())
        d.embed_tokens.weight.requires_grad_(False)
        d.lm_head.weight.requires_grad_(False)

    # ---------------------------------------------------------------- data
    def _collate(self, rows):
        cfg = self.cfg
        seqs = [(p + a)[: cfg.max_len] for p, a in rows]
        s = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), s, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.tensor(x)
        lengths = torch.tensor([len(x) for x in seqs])
        prompt_lens = torch.tensor([min(len(p), cfg.max_len) for p, _ in rows])
        return ids, lengths, prompt_lens

    def _next_rows(self):
        n = len(self.train_rows)
        out = []
        while len(out) < self.cfg.batch_size:
            if self.cursor >= n:
                self.epoch, self.cursor = self.epoch + 1, 0
            g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.epoch)
            order = torch.randperm(n, generator=g)
            take = order[self.cursor: self.cursor + self.cfg.batch_size - len(out)].tolist()
            out += [self.train_rows[i] for i in take]
            self.cursor += len(take)
        return out

    # ---------------------------------------------------------------- step
    def _forward(self, rows, generator):
        cfg, dev = self.cfg, self.device
        ids, lengths, prompt_lens = self._collate(rows)
        anchors, anchor_valid = sample_anchors(prompt_lens, lengths, cfg.anchors, generator)
        ids = ids.to(dev)
        with torch.no_grad():
            out = self.target(input_ids=ids, output_hidden_states=True)
            feats = target_features(out.hidden_states, self.drafter.cfg.target_layer_ids)
        blocks = build_blocks(anchors, anchor_valid, ids, lengths, cfg.gamma,
                              self.drafter.cfg.mask_token_id)
        b, a, gamma = blocks.label_pos.shape
        autocast = torch.autocast(dev.type, dtype=self.compute_dtype,
                                  enabled=self.compute_dtype != torch.float32)
        with autocast:
            ctx = self.drafter.context(feats.to(self.compute_dtype))
            hidden = self.drafter.backbone(blocks.block_ids, blocks.positions, ctx,
                                           blocks.ctx_positions, blocks.mask)
        hidden = hidden.view(b, a, gamma, -1)
        flat = blocks.label_pos.view(b, -1)
        labels = ids.gather(1, flat).view(b, a, gamma)
        prev = ids.gather(1, flat - 1).view(b, a, gamma)  # anchor, then x*_1..x*_{γ-1}
        with torch.no_grad():
            rows_idx = torch.arange(b, device=dev)[:, None]
            tlogits = out.logits[rows_idx, flat - 1].view(b, a, gamma, -1)
        with autocast:
            return block_loss(self.drafter, hidden, prev, labels, tlogits,
                              blocks.label_valid, cfg.loss_weights)

    def _lr(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))

    @torch.no_grad()
    def validate(self) -> dict:
        if not self.val_rows:
            return {}
        self.drafter.eval()
        g = torch.Generator().manual_seed(12345)  # the same anchors every time
        tot, n = {}, 0
        top1 = []
        for i in range(0, len(self.val_rows), self.cfg.batch_size):
            res = self._forward(self.val_rows[i: i + self.cfg.batch_size], g)
            for k, v in dict(res.parts, loss=float(res.loss)).items():
                tot[k] = tot.get(k, 0.0) + v
            top1.append(res.top1)
            n += 1
        self.drafter.train()
        mean_top1 = [sum(t[k] for t in top1) / len(top1) for k in range(len(top1[0]))]
        out = {k: v / n for k, v in tot.items()}
        out.update(step=self.step, top1=mean_top1, tau_greedy_est=expected_greedy_tau(mean_top1))
        return out

    def train(self) -> bool:
        """Runs until ``steps`` or the time budget; returns True when training finished."""
        from tqdm import tqdm

        cfg = self.cfg
        self.resume()
        if not self.val_history:
            self.val_history.append(self.validate())
        start = last_save = time.time()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True,
                   disable=None)
        self.drafter.train()
        finished = True
        while self.step < cfg.steps:
            if cfg.max_minutes is not None and time.time() - start > 60 * cfg.max_minutes:
                finished = False
                break
            lr = self._lr(self.step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            res = self._forward(self._next_rows(), self.anchor_gen)
            self.opt.zero_grad(set_to_none=True)
            res.loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip)
            self.opt.step()
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == 1:
                rec = dict(step=self.step, loss=float(res.loss.detach()), lr=lr,
                           grad_norm=float(gnorm), top1=res.top1,
                           tau_greedy_est=expected_greedy_tau(res.top1), **res.parts)
                self.history.append(rec)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tau=f"{rec['tau_greedy_est']:.2f}")
            bar.update(1)
            if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.val_history.append(self.validate())
                self.save(time.time() - last_save, finished=False)
                last_save = time.time()
        bar.close()
        if finished or not self.val_history or self.val_history[-1].get("step") != self.step:
            self.val_history.append(self.validate())
        self.save(time.time() - last_save, finished=finished)
        return finished

    # ---------------------------------------------------------------- state
    def resume(self) -> None:
        path = os.path.join(self.cfg.out, STATE_NAME)
        if not os.path.isfile(path):
            return
        st = torch.load(path, map_location="cpu", weights_only=False)
        if st["draft_config"] != self.draft_config:
            raise ValueError(
                f"{path} was written for another drafter configuration; use a new --out "
                "directory or delete the state file to start over.")
        self.drafter.load_state_dict(st["model"], strict=False)
        self.opt.load_state_dict(st["optimizer"])
        self.step, self.epoch, self.cursor = st["step"], st["epoch"], st["cursor"]
        self.history, self.val_history = st["history"], st["val_history"]
        self.seconds = st["seconds"]
        self.anchor_gen.set_state(st["anchor_rng"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def save(self, elapsed: float, finished: bool) -> None:
        cfg = self.cfg
        self.seconds += elapsed
        os.makedirs(cfg.out, exist_ok=True)
        model_state = {k: v for k, v in self.drafter.state_dict().items()
                       if k not in DSparkDrafter.SHARED_WITH_TARGET}
        st = dict(model=model_state, optimizer=self.opt.state_dict(), step=self.step,
                  epoch=self.epoch, cursor=self.cursor, history=self.history,
                  val_history=self.val_history, seconds=self.seconds,
                  anchor_rng=self.anchor_gen.get_state(), torch_rng=torch.get_rng_state(),
                  draft_config=self.draft_config)
        tmp = os.path.join(cfg.out, STATE_NAME + ".tmp")
        torch.save(st, tmp)
        os.replace(tmp, os.path.join(cfg.out, STATE_NAME))
        export = DSparkDrafter(DSparkConfig.from_dict(self.draft_config))
        export.load_state_dict({k: v.detach().cpu() for k, v in
                                self.drafter.state_dict().items()})
        export.to(getattr(torch, cfg.save_dtype))
        save_drafter(export, cfg.out, self.draft_config)
        self.write_report(finished)

    def write_report(self, finished: bool) -> None:
        cfg = self.cfg
        report = dict(
            finished=finished, step=self.step, epochs=self.epoch, seconds=round(self.seconds, 1),
            command=" ".join(["vllm-dspark", "train"] + sys.argv[2:]) if sys.argv else None,
            config={k: v for k, v in asdict(cfg).items()},
            data=cfg.data, train_rows=len(self.train_rows), val_rows=len(self.val_rows),
            machine=dict(platform=platform.platform(), torch=torch.__version__,
                         device=(torch.cuda.get_device_name() if self.device.type == "cuda"
                                 else platform.processor() or "cpu")),
            history=self.history, validation=self.val_history,
        )
        with open(os.path.join(cfg.out, REPORT_NAME), "w") as f:
            json.dump(report, f, indent=1)
        plot_loss(report, os.path.join(cfg.out, "loss.png"))


def plot_loss(report: dict, path: str) -> None:
    try:
        import matplotlib
    except ImportError:  # a bare GPU image: training.json holds the curve, plot later
        print("matplotlib missing: skipped loss.png", file=sys.stderr)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist, val = report["history"], [v for v in report["validation"] if v]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for key in ("loss", "ce", "tv", "conf"):
        axes[0].plot([h["step"] for h in hist], [h[key] for h in hist], label=f"train {key}")
    if val:
        axes[0].plot([v["step"] for v in val], [v["loss"] for v in val], "k--o", ms=3,
                     label="val loss")
        axes[1].plot([v["step"] for v in val], [v["tau_greedy_est"] for v in val], "k-o", ms=3)
    axes[0].set_xlabel("step")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("teacher-forced greedy τ estimate (val)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
