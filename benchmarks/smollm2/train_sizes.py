#!/usr/bin/env python3
"""What a SmolLM2 drafter's training state weighs, and what one training step holds.

    python benchmarks/smollm2/train_sizes.py                    # sizes of every variant
    python benchmarks/smollm2/train_sizes.py --memory 2 32 512  # + step memory at B, A, S

Sizes: each variant (layers × Markov rank × head) is built from the committed
drafter's config (``models/dspark-smollm2-135m/config.json``), exported the way
``vllm-dspark train`` exports it (bf16 ``model.safetensors``) and saved the way it
saves its state (``train_state.pt``: fp32 weights + AdamW moments after one step);
the table gives the files' sizes and whether they fit what one lent GPU call returns
(8 files of 16 MiB, 64 MiB in all) and the repository's 25 MB budget for a committed
drafter.

Memory (``--memory B A S``): one training step's drafter side (blocks, backbone,
eq. 9-12 loss) on random target features and logits, counting the bytes autograd
saves for the backward pass (a lower bound of the activation memory), per block
token (B × A × γ), plus the target side that the trainer holds (its logits [B, S, V]
and the gathered [B, A·γ, V], bf16). Runs on CPU in float32; halve the activation
part for bf16 autocast on a GPU, where ``training.json`` → ``throughput`` →
``peak_memory_gb`` is the real number.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
MIB = 2**20


def variants(base: dict, layers, ranks, heads):
    for n in layers:
        for r in ranks:
            for h in heads if r > 0 else ["vanilla"]:
                yield dict(base, num_hidden_layers=n, layer_types=["full_attention"] * n,
                           markov_rank=r, markov_head_type=h,
                           confidence_head_with_markov=r > 0)


def sizes(cfg: dict) -> dict:
    from vllm_dspark.checkpoint import save_drafter
    from vllm_dspark.config import DSparkConfig
    from vllm_dspark.model.drafter import DSparkDrafter

    d = DSparkDrafter(DSparkConfig.from_dict(cfg))
    trainable = [p for n, p in d.named_parameters() if n not in DSparkDrafter.SHARED_WITH_TARGET]
    opt = torch.optim.AdamW(trainable, lr=1e-3, betas=(0.9, 0.95))
    sum((p.float() ** 2).sum() for p in trainable).backward()
    opt.step()
    model = {k: v for k, v in d.state_dict().items() if k not in DSparkDrafter.SHARED_WITH_TARGET}
    buf = io.BytesIO()
    torch.save(dict(model=model, optimizer=opt.state_dict()), buf)
    with tempfile.TemporaryDirectory() as tmp:
        save_drafter(d.to(torch.bfloat16), tmp, cfg)
        export = os.path.getsize(os.path.join(tmp, "model.safetensors"))
    return dict(params=sum(p.numel() for p in trainable), export=export, state=buf.tell())


def step_memory(cfg: dict, b: int, a: int, s: int) -> dict:
    from vllm_dspark.config import DSparkConfig
    from vllm_dspark.model.drafter import DSparkDrafter
    from vllm_dspark.train.blocks import build_blocks, sample_anchors
    from vllm_dspark.train.objective import block_loss

    torch.manual_seed(0)
    dc = DSparkConfig.from_dict(cfg)
    d = DSparkDrafter(dc)
    gamma, v, h = dc.block_size, dc.vocab_size, dc.hidden_size
    ids = torch.randint(0, v, (b, s))
    lengths = torch.full((b,), s)
    prompt_lens = torch.full((b,), 32)
    anchors, valid = sample_anchors(prompt_lens, lengths, a, torch.Generator().manual_seed(0))
    feats = torch.randn(b, s, len(dc.target_layer_ids) * h)
    blocks = build_blocks(anchors, valid, ids, lengths, gamma, dc.mask_token_id)
    flat = blocks.label_pos.view(b, -1)
    tlogits = torch.randn(b, a, gamma, v)
    saved: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            st = t.untyped_storage()
            saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ctx = d.context(feats)
        hidden = d.backbone(blocks.block_ids, blocks.positions, ctx, blocks.ctx_positions,
                            blocks.mask).view(b, a, gamma, -1)
        labels = ids.gather(1, flat).view(b, a, gamma)
        prev = ids.gather(1, flat - 1).view(b, a, gamma)
        res = block_loss(d, hidden, prev, labels, tlogits, blocks.label_valid)
    res.loss.backward()
    tokens = int(blocks.label_valid.sum())
    act = sum(saved.values())
    return dict(block_tokens=tokens, saved_bytes=act, per_token=act / max(tokens, 1),
                target_bytes=2 * (b * s * v + b * a * gamma * v))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--config", default=os.path.join(ROOT, "models", "dspark-smollm2-135m",
                                                    "config.json"))
    p.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--ranks", type=int, nargs="+", default=[0, 32, 64, 128])
    p.add_argument("--heads", nargs="+", default=["vanilla", "gated", "rnn"])
    p.add_argument("--memory", type=int, nargs=3, metavar=("B", "A", "S"), default=None)
    p.add_argument("--json", help="also write the numbers here")
    args = p.parse_args(argv)
    with open(args.config) as f:
        base = json.load(f)
    base.pop("dspark_sts_temperatures", None)
    rows = []
    print("| layers | head | rank | trainable params | bf16 export | train_state.pt | "
          "state fits one call (8 × 16 MiB, 64 MiB) | export ≤ 25 MB |")
    print("|---|---|---|---|---|---|---|---|")
    for cfg in variants(base, args.layers, args.ranks, args.heads):
        r = dict(layers=cfg["num_hidden_layers"], rank=cfg["markov_rank"],
                 head=cfg["markov_head_type"] if cfg["markov_rank"] else "none", **sizes(cfg))
        rows.append(r)
        fits = r["state"] <= 64 * MIB
        print(f"| {r['layers']} | {r['head']} | {r['rank']} | {r['params'] / 1e6:.2f} M | "
              f"{r['export'] / 1e6:.1f} MB | {r['state'] / 1e6:.1f} MB | "
              f"{'yes' if fits else 'no'} | {'yes' if r['export'] <= 25e6 else 'no'} |")
    out = {"sizes": rows}
    if args.memory:
        b, a, s = args.memory
        cfg = dict(base)
        m = step_memory(cfg, b, a, s)
        out["memory"] = dict(m, batch=b, anchors=a, seq_len=s)
        print(f"\nstep at B={b}, A={a}, S={s} (the committed config, float32 on CPU): "
              f"{m['block_tokens']} block tokens, {m['saved_bytes'] / 2**30:.2f} GiB saved for "
              f"backward = {m['per_token'] / MIB:.2f} MiB per block token; target side "
              f"{m['target_bytes'] / 2**30:.2f} GiB (bf16)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    raise SystemExit(main())
