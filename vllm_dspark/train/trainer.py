"""The training loop: frozen target on the fly, drafter on anchored blocks.

Each step takes a batch of sequences (chat prompt + the target's own answer),
runs the frozen target once to get its hidden states at ``target_layer_ids``
(no disk cache: a 135M target costs a few ms per batch) and its logits, samples
anchors in the answer, drafts all their blocks in one drafter pass
(``blocks.build_blocks``) and applies the DSpark objective. The drafter shares
the target's embedding and LM head, frozen; everything else trains.

State (weights, optimizer, step, data cursor, RNG, loss history) is saved to
``<out>/train_state.pt`` every ``save_every`` steps and when the time budget
runs out, so rerunning the same command resumes exactly. The exported checkpoint
(config.json + model.safetensors, DeepSpec names, no embedding/LM-head copies)
is rewritten at every save; ``training.json`` says whether training finished.

Across machines only the export travels (train_state.pt holds fp32 weights and
AdamW's two moments: 135 MB for the SmolLM2 drafter, over what a lent GPU machine
returns). Without a train_state.pt, a rerun *warm-restarts* from ``config.json`` +
``model.safetensors`` (bf16) + ``training.json``: the bf16 weights become the fp32
master weights, AdamW starts afresh (β2 = 0.95 rebuilds its second moment within a
few tens of steps) and the learning rate ramps back up over ``rewarmup`` steps; the
step, the schedule, the data order (epoch and cursor follow from step × batch) and
the loss history continue. ``training.json`` lists the restarts.
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
from vllm_dspark.train.dataset import describe, load_rows
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
    steps: int | None = 2000  # None: from epochs
    epochs: float | None = None  # passes over the training rows (sets steps)
    batch_size: int = 8
    anchors: int = 128
    max_len: int = 1024
    lr: float = 1e-3
    warmup: int = 100
    rewarmup: int = 10  # LR ramp after a warm restart (fresh optimizer)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "bfloat16"  # compute dtype (autocast); master weights stay fp32
    save_dtype: str = "bfloat16"
    save_every: int = 250
    log_every: int = 10
    max_minutes: float | None = None
    pause_at: int | None = None  # stop (unfinished) at this step of the schedule
    val_fraction: float = 0.02
    max_val_rows: int = 512  # validation runs at every save: bounded for large data sets
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    compile_loss: bool | None = None  # torch.compile the vocabulary-wide terms; None: on CUDA
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
        self.data_info = describe(cfg.data)
        self.data_rows = len(rows)
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(rows), generator=g).tolist()
        n_val = (min(cfg.max_val_rows, max(1, int(len(rows) * cfg.val_fraction)))
                 if len(rows) > 1 else 0)
        self.val_rows = [rows[i] for i in order[:n_val]]
        self.train_rows = [rows[i] for i in order[n_val:]] or rows
        if cfg.epochs is not None:
            cfg.steps = max(1, math.ceil(cfg.epochs * len(self.train_rows) / cfg.batch_size))
        cfg.warmup = min(cfg.warmup, cfg.steps)
        self.step = 0
        self.restarts: list[dict] = []
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
        seqs = [(p + a)[: cfg.max_len] for p, a in rows]  # int32 arrays (dataset.load_rows)
        s = max(len(x) for x in seqs)
        ids = torch.zeros(len(seqs), s, dtype=torch.long)
        for i, x in enumerate(seqs):
            ids[i, : len(x)] = torch.frombuffer(x, dtype=torch.int32)
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
            compiled = cfg.compile_loss if cfg.compile_loss is not None else dev.type == "cuda"
            return block_loss(self.drafter, hidden, prev, labels, tlogits,
                              blocks.label_valid, cfg.loss_weights, compiled=compiled)

    def _lr(self, step: int) -> float:
        """Linear warm-up, cosine to 10 %; after a warm restart, a linear ramp over
        ``rewarmup`` steps on top (the fresh optimizer's first steps)."""
        cfg = self.cfg
        if step < cfg.warmup:
            lr = cfg.lr * (step + 1) / cfg.warmup
        else:
            t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))
        warm = [r["step"] for r in self.restarts if r["kind"] == "warm"]
        if warm and cfg.rewarmup > 0 and step - warm[-1] < cfg.rewarmup:
            lr *= (step - warm[-1] + 1) / cfg.rewarmup
        return lr

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
        # Always shown, on stderr; in a log file (a background GPU run) every 30 s.
        tty = sys.stderr.isatty()
        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=tty,
                   mininterval=0.1 if tty else 30.0, file=sys.stderr, unit="step")
        self.drafter.train()
        run_start_step, paused = self.step, 0.0  # paused: validation and saving
        finished = True
        while self.step < cfg.steps:
            if ((cfg.max_minutes is not None and time.time() - start > 60 * cfg.max_minutes)
                    or (cfg.pause_at is not None and self.step >= cfg.pause_at)):
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
                rate = (self.step - run_start_step) * cfg.batch_size / max(
                    time.time() - start - paused, 1e-6)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", tau=f"{rec['tau_greedy_est']:.2f}",
                                seq_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            if self.step % cfg.save_every == 0 and self.step < cfg.steps:
                t = time.time()
                self.val_history.append(self.validate())
                self._note_throughput(run_start_step, t - start - paused)
                self.save(time.time() - last_save, finished=False)
                last_save = time.time()
                paused += last_save - t
        bar.close()
        self._note_throughput(run_start_step, time.time() - start - paused)
        if finished or not self.val_history or self.val_history[-1].get("step") != self.step:
            self.val_history.append(self.validate())
        self.save(time.time() - last_save, finished=finished)
        return finished

    def _note_throughput(self, since_step: int, seconds: float) -> None:
        """This run's training speed (validation and saving excluded) for the report."""
        steps = self.step - since_step
        if steps <= 0 or seconds <= 0:
            return
        self.throughput = dict(
            steps=steps, seconds=round(seconds, 1), steps_per_s=round(steps / seconds, 3),
            sequences_per_s=round(steps * self.cfg.batch_size / seconds, 1),
            peak_memory_gb=(round(torch.cuda.max_memory_allocated() / 2**30, 2)
                            if self.device.type == "cuda" else None))

    # ---------------------------------------------------------------- state
    def resume(self) -> None:
        """Exact resume from train_state.pt; else a warm restart from the export."""
        path = os.path.join(self.cfg.out, STATE_NAME)
        if not os.path.isfile(path):
            self.warm_restart()
            return
        st = torch.load(path, map_location="cpu", weights_only=False)
        if st["draft_config"] != self.draft_config:
            raise ValueError(
                f"{path} was written for another drafter configuration; use a new --out "
                "directory or delete the state file to start over.")
        self._check_data(st.get("data_rows"), path)
        self.drafter.load_state_dict(st["model"], strict=False)
        self.opt.load_state_dict(st["optimizer"])
        self.step, self.epoch, self.cursor = st["step"], st["epoch"], st["cursor"]
        self.history, self.val_history = st["history"], st["val_history"]
        self.seconds = st["seconds"]
        self.restarts = st.get("restarts", [])
        self.anchor_gen.set_state(st["anchor_rng"])
        torch.set_rng_state(st["torch_rng"])
        print(f"resumed from {path} at step {self.step}", file=sys.stderr)

    def _check_data(self, rows: int | None, where: str) -> None:
        if rows is not None and rows != self.data_rows:
            raise ValueError(
                f"{where} was trained on {rows} data rows, --data {self.cfg.data!r} holds "
                f"{self.data_rows}: the split and the data order would differ. Train on the "
                "same data, or use a new --out directory.")

    def warm_restart(self) -> bool:
        """Continue from config.json + model.safetensors (bf16) + training.json: fp32 master
        weights from the bf16 ones, a fresh AdamW, an LR ramp of ``rewarmup`` steps; step,
        data order, histories and time carry on. False when there is nothing to restart."""
        from safetensors.torch import load_file

        from vllm_dspark.checkpoint import check_weights

        out = self.cfg.out
        report_path = os.path.join(out, REPORT_NAME)
        weights = os.path.join(out, "model.safetensors")
        if not (os.path.isfile(report_path) and os.path.isfile(weights)):
            return False
        with open(report_path) as f:
            rep = json.load(f)
        if not rep.get("step"):
            return False
        old = rep.get("draft_config")
        if old is None:  # a report from before warm restarts: compare the config file
            with open(os.path.join(out, "config.json")) as f:
                old = json.load(f)
            old.pop("dspark_sts_temperatures", None)
        if old != json.loads(json.dumps(self.draft_config)):
            raise ValueError(
                f"{out} holds a drafter of another configuration; use a new --out directory, "
                "or the options it was trained with (training.json: command).")
        self._check_data(rep.get("data_rows"), report_path)
        check_weights(out, DSparkConfig.from_dict(self.draft_config))
        state = load_file(weights)
        with torch.no_grad():
            own = self.drafter.state_dict()
            for k, v in state.items():
                if k in own and k not in DSparkDrafter.SHARED_WITH_TARGET:
                    own[k].copy_(v.to(own[k].dtype))
        self.step = int(rep["step"])
        self.epoch, self.cursor = divmod(self.step * self.cfg.batch_size, len(self.train_rows))
        self.history = rep.get("history", [])
        self.val_history = rep.get("validation", [])
        self.seconds = float(rep.get("seconds", 0.0))
        self.restarts = rep.get("restarts", []) + [dict(
            step=self.step, kind="warm", source="bf16 model.safetensors", machine=_machine(
                self.device))]
        # A new anchor stream, fixed by the seed and the step (the old one did not travel).
        self.anchor_gen.manual_seed(self.cfg.seed + 1 + 1_000_003 * self.step)
        print(f"warm restart from {weights} (bf16) at step {self.step}: fresh optimizer, "
              f"learning rate ramped over {self.cfg.rewarmup} steps", file=sys.stderr)
        return True

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
                  draft_config=self.draft_config, data_rows=self.data_rows,
                  restarts=self.restarts)
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
            finished=finished, step=self.step, steps=cfg.steps, epochs=self.epoch,
            sequences_seen=self.step * cfg.batch_size,
            epochs_seen=round(self.step * cfg.batch_size / len(self.train_rows), 3),
            seconds=round(self.seconds, 1),
            command=" ".join(["vllm-dspark", "train"] + sys.argv[2:]) if sys.argv else None,
            config={k: v for k, v in asdict(cfg).items()},
            draft_config=self.draft_config,
            data=cfg.data, data_rows=self.data_rows, data_info=self.data_info,
            train_rows=len(self.train_rows), val_rows=len(self.val_rows),
            machine=_machine(self.device),
            throughput=getattr(self, "throughput", None), restarts=self.restarts,
            history=self.history, validation=self.val_history,
        )
        with open(os.path.join(cfg.out, REPORT_NAME), "w") as f:
            json.dump(report, f, indent=1)
        plot_loss(report, os.path.join(cfg.out, "loss.png"))


def _machine(device: torch.device) -> dict:
    return dict(platform=platform.platform(), torch=torch.__version__,
                device=(torch.cuda.get_device_name() if device.type == "cuda"
                        else platform.processor() or "cpu"))


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
    for r in report.get("restarts") or []:
        for ax in axes:
            ax.axvline(r["step"], color="grey", lw=0.8, ls=":")
    if report.get("sequences_seen") is not None:
        fig.suptitle(f"{report['step']} steps, {report['sequences_seen']} sequences "
                     f"({report.get('epochs_seen', 0):g} epochs), "
                     f"{report.get('seconds', 0) / 60:.1f} min"
                     + (f"; {len(report['restarts'])} warm restart(s), dotted"
                        if report.get("restarts") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """``python -m vllm_dspark.train.trainer TRAINING_JSON [PNG]``: draw a report's loss
    curve again (a GPU image without matplotlib writes training.json only)."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print(main.__doc__, file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        report = json.load(f)
    out = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(argv[0]), "loss.png")
    plot_loss(report, out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
