"""Offline generation with DSpark through LLM(...), printing vLLM's acceptance statistics.

    python examples/offline.py --target TARGET_DIR --draft DRAFT_DIR [--gamma 4]

Without --target/--draft it builds the tests' tiny random Qwen3 target and an
oracle drafter (tests/tiny_models.py) so it runs anywhere, including a CPU box.
"""

import argparse
import os
import sys
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target")
    ap.add_argument("--draft")
    ap.add_argument("--gamma", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if not (args.target and args.draft):
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
        from tiny_models import make_oracle_pair

        args.target, args.draft = make_oracle_pair(tempfile.mkdtemp(), "qwen3", 0.2)

    from vllm import LLM, SamplingParams

    # float32: vLLM-CPU 0.32's bf16 attention kernel dies with SIGILL on the tiny
    # bigram target, with or without dspark (see README Limitations).
    llm = LLM(
        args.target, enforce_eager=True, max_model_len=1024, disable_log_stats=False,
        dtype="float32",
        speculative_config={"method": "dspark", "model": args.draft,
                            "num_speculative_tokens": args.gamma,
                            "draft_sample_method": "probabilistic"},
    )
    prompts = ["The quick brown fox", "def add(a, b):", "Once upon a time"]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            ignore_eos=True)
    t0 = time.time()
    outputs = llm.generate(prompts, params)
    elapsed = time.time() - t0
    for o in outputs:
        print(repr(o.prompt), "->", repr(o.outputs[0].text[:80]))

    m = {x.name: getattr(x, "values", None) or getattr(x, "value", None)
         for x in llm.get_metrics() if x.name.startswith("vllm:spec_decode")}
    drafts = m.get("vllm:spec_decode_num_drafts", 0) or 0
    drafted = m.get("vllm:spec_decode_num_draft_tokens", 0) or 0
    accepted = m.get("vllm:spec_decode_num_accepted_tokens", 0) or 0
    per_pos = m.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
    n_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    print(f"generated {n_tokens} tokens in {elapsed:.2f}s ({n_tokens / elapsed:.1f} tok/s)")
    if drafts:
        print(f"acceptance rate {accepted / max(drafted, 1):.3f}; "
              f"mean accepted length tau = {1 + accepted / drafts:.2f} (incl. bonus token)")
        print("accepted per position:", [round(x / drafts, 3) for x in per_pos])


if __name__ == "__main__":
    main()
