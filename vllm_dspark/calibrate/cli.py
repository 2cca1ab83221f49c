"""``vllm-dspark calibrate``: fit confidence temperatures for a DSpark draft.

    vllm-dspark calibrate --target DIR --draft DIR --prompts FILE.jsonl [--num-prompts 64]
        [--temperature 0] [--max-new-tokens 256] [--anchor-stride 1] [--device auto]
        [--holdout 0.25] [--fit sts|nll] [--out-json report.json] [--plot reliability.png]
        [--save-outcomes outcomes.npz] [--dry-run]

Drafts on held-out prompts in plain torch (``collect``), fits one temperature per
position — by default each position's maximum-likelihood temperature (``sts.fit_nll``),
with ``--fit sts`` the paper's Sequential Temperature Scaling (§3.2.1) — on all but the
last ``--holdout`` fraction of the prompts, prints the per-position table on the
fitting blocks and on the held-out prompts' blocks (ECE measured where it was not
fitted), and writes ``dspark_sts_temperatures`` into the draft's
config.json (the previous file is kept as config.json.bak), which the engine
applies to the confidence logits. ``--dry-run`` writes nothing into the draft.
Use prompts the drafter was not trained on: the paper calibrates on a held-out set.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

from vllm_dspark.cli import add_dtype_argument, require_positive

STS_KEY = "dspark_sts_temperatures"
REPORT_NAME = "sts_calibration.json"
PLOT_NAME = "sts_reliability.png"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="HF directory of the target model")
    p.add_argument("--draft", required=True, help="DSpark draft directory (with a confidence "
                   "head); its config.json receives the temperatures")
    p.add_argument("--prompts", required=True, metavar="NAME_OR_PATH",
                   help="held-out prompts: a jsonl file ({'turns': [...]} per line) or the "
                   "name of <name>.jsonl in --prompt-dir (e.g. math500)")
    p.add_argument("--prompt-dir", default=None,
                   help="where a --prompts name resolves (default: $VLLM_DSPARK_PROMPT_DIR, "
                   "else the reference sets shipped in the package)")
    p.add_argument("--num-prompts", type=int, default=64, help="first N prompts of --prompts")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature to calibrate for (0 = greedy verification)")
    p.add_argument("--draft-sample-method", default="probabilistic",
                   choices=["probabilistic", "greedy"],
                   help="at T > 0: sample drafts and verify with q (probabilistic) or verify "
                   "argmax drafts as one-hot q (greedy), as vLLM's knob of the same name")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="answer tokens the target generates per prompt")
    p.add_argument("--anchor-stride", type=int, default=1,
                   help="draft a block at every N-th answer token")
    p.add_argument("--device", default="auto", help="torch device; auto = cuda when available")
    add_dtype_argument(p, "torch dtype of target and drafter; auto = bfloat16 on GPU, float32 "
                       "on CPU")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--gen-batch-size", type=int, default=8,
                   help="prompts generated together (plain torch)")
    p.add_argument("--fit", choices=["sts", "nll"], default="nll",
                   help="nll (default, beyond the paper) = maximum likelihood of each "
                   "position's conditional survival; sts = the paper's sequential fit (T_k "
                   "minimises the ECE of the cumulative product, left to right). On both "
                   "SmolLM2 drafters nll generalised better to held-out prompts "
                   "(benchmarks/README.md)")
    p.add_argument("--n-bins", type=int, default=15, help="ECE bins")
    p.add_argument("--holdout", type=float, default=0.25,
                   help="fraction of the prompts (the last ones) whose blocks are not fitted "
                   "on, only evaluated: the report's held-out ECE/AUROC and the diagram; "
                   "0 = fit and report on everything (in-sample)")
    p.add_argument("--min-blocks", type=int, default=100,
                   help="refuse to fit on fewer drafted blocks")
    p.add_argument("--out-json", default=None, help=f"report (default <draft>/{REPORT_NAME}; "
                   "none with --dry-run)")
    p.add_argument("--plot", default=None, help=f"reliability diagram PNG (default "
                   f"<draft>/{PLOT_NAME}; none with --dry-run)")
    p.add_argument("--save-outcomes", default=None,
                   help="also save z, s, mask and each block's prompt index as .npz here "
                   "(default: not saved)")
    p.add_argument("--dry-run", action="store_true",
                   help="fit and report, but leave the draft's config.json alone")


def _check(args: argparse.Namespace):
    from vllm_dspark.config import DSparkConfig, DSparkConfigError

    if not os.path.isfile(os.path.join(args.target, "config.json")):
        raise SystemExit(f"error: --target {args.target!r} is not a HF model directory "
                         "(no config.json).")
    try:
        cfg = DSparkConfig.from_dir(args.draft)
    except DSparkConfigError as e:
        raise SystemExit(f"error: {e}") from e
    if not cfg.enable_confidence_head:
        raise SystemExit(f"error: cannot calibrate {args.draft!r}: it has no confidence head "
                         "(enable_confidence_head is false in its config.json), so there are "
                         "no confidences to scale. Train the draft with a confidence head.")
    from vllm_dspark.prompts import PromptFileError, resolve_dataset

    try:
        args.prompts = resolve_dataset(args.prompts, args.prompt_dir)[1]
    except PromptFileError as e:
        raise SystemExit(f"error: --prompts: {e}") from e
    require_positive(args, "num_prompts", "max_new_tokens", "anchor_stride", "n_bins",
                     "gen_batch_size")
    if args.temperature < 0:
        raise SystemExit("error: --temperature must be >= 0.")
    if not 0 <= args.holdout < 1:
        raise SystemExit(f"error: --holdout {args.holdout} is not a fraction in [0, 1); "
                         "e.g. 0.25 holds out a quarter of the prompts, 0 none.")
    return cfg


def write_temperatures(draft_dir: str, temperatures: list[float]) -> str:
    """Set ``dspark_sts_temperatures`` in config.json: backup, then atomic replace."""
    from vllm_dspark.config import DSparkConfig

    path = os.path.join(draft_dir, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg[STS_KEY] = [round(float(t), 6) for t in temperatures]
    DSparkConfig.from_dict(cfg, source=path)  # never write a config the engine rejects
    shutil.copy2(path, path + ".bak")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(cfg, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from vllm_dspark.calibrate.collect import collect
    from vllm_dspark.calibrate.sts import FITS, evaluate, format_table, reliability_diagram
    from vllm_dspark.prompts import read_prompts

    cfg = _check(args)
    try:
        prompts = read_prompts(args.prompts)[: args.num_prompts]
    except (ValueError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: cannot read --prompts: {e}") from e
    if not prompts:
        raise SystemExit(f"error: --prompts {args.prompts!r} holds no prompts.")
    t0 = time.time()
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    outcomes = collect(
        args.target, args.draft, prompts, temperature=args.temperature,
        max_new_tokens=args.max_new_tokens, anchor_stride=args.anchor_stride,
        device=args.device, dtype=dtype, seed=args.seed,
        probabilistic=args.draft_sample_method == "probabilistic",
        gen_batch_size=args.gen_batch_size, log=lambda m: print(m, file=sys.stderr))
    fit, held = outcomes.split(args.holdout)
    n_blocks = int(fit.mask[:, 0].sum()) if fit.mask.size else 0
    if n_blocks < args.min_blocks:
        raise SystemExit(
            f"error: too few outcomes to calibrate: {n_blocks} drafted blocks to fit on < "
            f"--min-blocks {args.min_blocks}. Use more prompts (--num-prompts), longer answers "
            "(--max-new-tokens) or a smaller --anchor-stride.")
    temps, report = FITS[args.fit](fit.z, fit.s, fit.mask, n_bins=args.n_bins)
    print(f"fitted ({args.fit}) on {n_blocks} blocks (in-sample):")
    print(format_table(report))
    heldout = None
    if held is not None:
        heldout = evaluate(held.z, held.s, held.mask, temps, n_bins=args.n_bins)
        for position, fitted in zip(heldout["positions"], report["positions"]):
            position.update({k: fitted[k] for k in ("temperature", "fitted", "at_grid_edge")})
        heldout["prompts"] = int(len(set(held.prompt.tolist())))
        print(f"held out: {heldout['n_blocks']} blocks of the last {heldout['prompts']} "
              "prompts, not fitted on:")
        print(format_table(heldout))
    else:
        print("no held-out prompts (--holdout 0 or a single prompt): the ECE above is "
              "in-sample")
    print(f"temperatures: {[round(t, 4) for t in temps]}   τ (measured, incl. bonus) "
          f"{outcomes.tau():.3f}   {time.time() - t0:.0f}s")

    written = None if args.dry_run else write_temperatures(args.draft, temps)
    out_json = args.out_json or (None if args.dry_run else os.path.join(args.draft, REPORT_NAME))
    plot = args.plot or (None if args.dry_run else os.path.join(args.draft, PLOT_NAME))
    if plot:  # on the held-out blocks when there are some: what deployment will see
        shown = held if held is not None else fit
        reliability_diagram(shown.z, shown.s, shown.mask, temps, plot, n_bins=args.n_bins)
    if args.save_outcomes:
        np.savez_compressed(args.save_outcomes, z=outcomes.z, s=outcomes.s, mask=outcomes.mask,
                            prompt=outcomes.prompt)
    if out_json:
        full = dict(
            command=" ".join(["vllm-dspark", "calibrate"] + sys.argv[2:]) if sys.argv else None,
            target=args.target, draft=args.draft, prompts=args.prompts,
            collection=outcomes.meta, blocks=n_blocks, tau=outcomes.tau(),
            holdout=args.holdout, fit=args.fit, previous_temperatures=cfg.sts_temperatures,
            temperatures=temps, config_written=written, plot=plot,
            plot_data="held out" if held is not None else "fitted",
            seconds=round(time.time() - t0, 1), sts=report, heldout=heldout)
        text = json.dumps(full, indent=1)  # serialise first: no half-written report
        with open(out_json, "w") as f:
            f.write(text)
    if written:
        print(f"wrote {STS_KEY} to {written} (backup: {written}.bak)")
    else:
        print("dry run: the draft's config.json is unchanged")
    return 0
