"""τ of draft trees against the chain, engine-free (issue 17): greedy decoding through
the plain HF target with tree verification (``vllm_dspark.eval.tree``), per node budget.

    python benchmarks/tree_tau.py --target /tmp/smollm2 --draft models/dspark-smollm2-135m \
        --datasets gsm8k humaneval --num-prompts 6 --max-tokens 64 \
        --budgets 8 16 32 64 --out benchmarks/results/tree_tau_smollm2.json

τ = tokens emitted per round (accepted + 1). The chain is ``chain_spec(γ)`` (γ the
draft's block size); trees branch ``--width`` ways where a node's best child's
confidence is below ``--branch-below``. Greedy output is the target's whatever the
tree, so the script also checks that every configuration wrote the same tokens.
T = 0 only: a sampled comparison needs many more rounds than a CPU affords.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch


def prompt_spread(per_prompt: list[dict], draws: int = 2000, seed: int = 0) -> list[float]:
    """τ's 5th and 95th percentiles over prompts resampled with replacement (bootstrap):
    how much τ moves with which prompts a set happened to contribute."""
    import random

    rng = random.Random(seed)
    taus = []
    for _ in range(draws):
        pick = [rng.choice(per_prompt) for _ in per_prompt]
        rounds = sum(p["rounds"] for p in pick)
        taus.append((sum(p["accepted"] for p in pick) + rounds) / rounds)
    taus.sort()
    return [round(taus[int(0.05 * draws)], 3), round(taus[int(0.95 * draws)], 3)]


def main() -> None:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from vllm_dspark.decode.tree import TreeSpec, chain_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--datasets", nargs="+", default=["gsm8k", "humaneval"])
    ap.add_argument("--num-prompts", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--budgets", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--width", type=int, default=TreeSpec.width)
    ap.add_argument("--branch-below", type=float, default=TreeSpec.branch_below)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_dspark.checkpoint import load_drafter
    from vllm_dspark.eval.tree import greedy_tree_decode
    from vllm_dspark.prompts import chat_prompt_ids, read_prompts, resolve_dataset

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    drafter = load_drafter(args.draft, target_embed=target.model.embed_tokens.weight,
                           target_lm_head=target.lm_head.weight).eval()
    gamma = drafter.cfg.block_size
    specs = {f"chain-{gamma}": chain_spec(gamma)}
    specs.update({f"tree-{n}": TreeSpec(budget=n, width=args.width,
                                        branch_below=args.branch_below) for n in args.budgets})
    rows, t0 = [], time.time()
    for ds in args.datasets:
        prompts = read_prompts(resolve_dataset(ds)[1], limit=args.num_prompts)
        for name, spec in specs.items():
            tot = {"rounds": 0, "accepted": 0, "side_branch": 0, "verified": 0, "drafted": 0}
            outputs, per_prompt = [], []
            for p in prompts:
                ids = chat_prompt_ids(tok, p)
                seq, _, st = greedy_tree_decode(target, drafter, ids, args.max_tokens, spec,
                                                stop_ids={tok.eos_token_id})
                # A round emits up to its accepted path + 1, so the last one can overshoot
                # max_tokens by a different amount per configuration: compare max_tokens.
                outputs.append(seq[len(ids):][: args.max_tokens])
                per_prompt.append({"rounds": st["rounds"], "accepted": st["accepted"]})
                for k in tot:
                    tot[k] += st[k]
            row = {"dataset": ds, "config": name, "budget": spec.budget, "width": spec.width,
                   "branch_below": spec.branch_below, "prompts": len(prompts),
                   "tau": (tot["accepted"] + tot["rounds"]) / tot["rounds"],
                   "verified_per_round": tot["verified"] / tot["rounds"],
                   "side_branch_share": tot["side_branch"] / max(tot["accepted"], 1),
                   "tau_spread": prompt_spread(per_prompt),
                   **tot, "per_prompt": per_prompt, "outputs": outputs}
            rows.append(row)
            print(f"{ds} {name}: tau {row['tau']:.3f} ({tot['rounds']} rounds, "
                  f"{row['verified_per_round']:.1f} nodes verified a round, "
                  f"{row['side_branch_share']:.0%} of accepted tokens off the first child) "
                  f"[{time.time() - t0:.0f}s]", flush=True)
    for ds in args.datasets:  # greedy: every configuration wrote the target's tokens
        outs = [r["outputs"] for r in rows if r["dataset"] == ds]
        for r in rows:
            if r["dataset"] == ds:
                r["identical_to_chain"] = r["outputs"] == outs[0]
    for r in rows:
        r.pop("outputs")
    json.dump({"command": " ".join([sys.executable] + sys.argv), "rows": rows,
               "machine": {"platform": platform.platform(), "torch": torch.__version__,
                           "threads": args.threads},
               "seconds": round(time.time() - t0, 1)}, open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
