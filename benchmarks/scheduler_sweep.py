"""Concurrency sweep: no speculation vs fixed γ vs confidence-scheduled verification.

    python benchmarks/scheduler_sweep.py --target T --draft D --prompts gsm8k \
        --concurrency 1 4 16 --out benchmarks/results/scheduler_sweep_cpu.json

One engine per configuration, each in its own process and all alive at once:
``plain`` (no speculation), ``fixed``
(VLLM_DSPARK_SCHEDULER=fixed, every step verifies γ drafts), ``causal`` (the default,
VLLM_DSPARK_DRAFT_COST=measure: Algorithm 1 on the SPS table profiled at start-up plus
the measured drafting time, with the draft gate), ``causal-paper`` (Algorithm 1
verbatim: VLLM_DSPARK_DRAFT_COST=0, always draft), ``async`` (§5.2) and
``plain-control`` (a second plain engine: its ratio to ``plain`` is the spread between
two identical engines, the benchmark's own noise floor). For
each concurrency C, C chat prompts are submitted at once (greedy, ``--max-tokens`` each)
and we record output tokens/s, the mean number of draft tokens verified per request per
step (vLLM's num_draft_tokens / num_drafts, which counts steps that verified nothing
too: engine/patches.py) and the acceptance rate, all from counter differences around
that batch. ``--repeats`` runs each batch n times. Batches run one at a time and
interleaved: for each C and repeat every engine runs its batch in turn (the order
rotated per repeat), so a drift of the machine's speed affects every configuration
alike; the summary prints each mode's median and its median ratio to ``plain`` over
the repeats (paired by repeat).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile

ENGINE = r'''
import json, os, sys, time
job = json.load(open(sys.argv[1]))
os.environ.update(job["env"])
from vllm import LLM, SamplingParams

def counters(llm):
    m = {x.name: getattr(x, "value", None) for x in llm.get_metrics()}
    return {k: m.get("vllm:spec_decode_" + k) or 0
            for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}

if __name__ == "__main__":
    kw = dict(model=job["target"], dtype=job["dtype"], enforce_eager=job["eager"],
              max_model_len=2048, max_num_seqs=max(job["concurrency"]),
              disable_log_stats=False, seed=0)
    if not job["mode"].startswith("plain"):
        kw["speculative_config"] = {"method": "dspark", "model": job["draft"],
                                    "num_speculative_tokens": job["gamma"]}
    t0 = time.perf_counter(); llm = LLM(**kw); startup = time.perf_counter() - t0
    params = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"])
    chats = [[{"role": "user", "content": p}] for p in job["prompts"]]
    llm.chat(chats[:1], params, use_tqdm=False)  # warm-up
    print(json.dumps({"startup_s": startup}), flush=True)
    for line in sys.stdin:  # one batch per line: its concurrency; the driver interleaves
        c = int(line)
        before = counters(llm)
        t0 = time.perf_counter()
        outs = llm.chat(chats[:c], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        after = counters(llm)
        d = {k: after[k] - before[k] for k in after}
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps(dict(concurrency=c, tokens=n, seconds=dt, tokens_per_s=n / dt,
                              verified_per_request_step=(d["num_draft_tokens"] / d["num_drafts"]
                                                         if d["num_drafts"] else 0.0),
                              acceptance_rate=(d["num_accepted_tokens"] / d["num_draft_tokens"]
                                               if d["num_draft_tokens"] else None),
                              steps_with_drafts=d["num_drafts"], **d)), flush=True)
'''


def _read_json_line(proc) -> dict:
    """The engine's next JSON line on stdout (vLLM logs go to stderr)."""
    for line in proc.stdout:
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"engine exited with {proc.wait()}")


MODE_ENV = {
    "plain": None,
    "plain-control": None,  # a second plain engine: the benchmark's own noise floor
    "fixed": {"VLLM_DSPARK_SCHEDULER": "fixed"},
    "causal": {"VLLM_DSPARK_SCHEDULER": "causal", "VLLM_DSPARK_DRAFT_COST": "measure"},
    "causal-paper": {"VLLM_DSPARK_SCHEDULER": "causal", "VLLM_DSPARK_DRAFT_COST": "0"},
    "async": {"VLLM_DSPARK_SCHEDULER": "async"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", default="gsm8k",
                    help="jsonl with {'turns': [...]}, or a name in $VLLM_DSPARK_PROMPT_DIR "
                    "(default there: the packaged reference sets)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--modes", nargs="+", default=["plain", "fixed", "causal"],
                    choices=sorted(MODE_ENV))
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--sps", default="profile", help="VLLM_DSPARK_SPS for causal/async")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    import torch

    from vllm_dspark.launch import engine_dtype, engine_env
    from vllm_dspark.prompts import read_prompts, resolve_dataset

    prompts = read_prompts(resolve_dataset(args.prompts)[1])[: max(args.concurrency)]
    on_gpu = torch.cuda.is_available()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "engine.py")
        open(script, "w").write(ENGINE)
        engines = {}
        try:
            for mode in args.modes:  # started one after another, all kept alive
                env = engine_env({"VLLM_CPU_KVCACHE_SPACE": "2"}, v1=True)  # V1 scheduler
                if MODE_ENV[mode] is not None:
                    env.update(MODE_ENV[mode], VLLM_DSPARK_SPS=args.sps)
                job = dict(target=args.target, draft=args.draft, mode=mode, env=env,
                           gamma=args.gamma, prompts=prompts, concurrency=args.concurrency,
                           max_tokens=args.max_tokens, dtype=engine_dtype("auto"),
                           eager=not on_gpu)
                jp = os.path.join(tmp, f"{mode}.json")
                json.dump(job, open(jp, "w"))
                proc = subprocess.Popen([sys.executable, script, jp], text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        env=dict(os.environ, **env))
                engines[mode] = proc
                results[mode] = dict(_read_json_line(proc), rows=[])
                print(f"{mode}: started in {results[mode]['startup_s']:.0f}s", file=sys.stderr)
            # One batch at a time; each repeat runs every mode once, in an order rotated
            # per repeat, so slow drifts of the machine hit all modes alike.
            for c in args.concurrency:
                for rep in range(args.repeats):
                    k = rep % len(args.modes)
                    for mode in args.modes[k:] + args.modes[:k]:
                        proc = engines[mode]
                        proc.stdin.write(f"{c}\n")
                        proc.stdin.flush()
                        results[mode]["rows"].append(dict(_read_json_line(proc), repeat=rep))
                print(f"C={c}: done", file=sys.stderr)
        finally:
            for proc in engines.values():
                proc.stdin.close()
                proc.wait(timeout=120)
    out = dict(command=" ".join([sys.executable] + sys.argv), target=args.target,
               draft=args.draft, gamma=args.gamma, max_tokens=args.max_tokens,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                            device=torch.cuda.get_device_name() if on_gpu else "cpu"),
               results=results)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(out, open(args.out, "w"), indent=1)
    print(f"{'C':>4} " + " ".join(f"{m + ' tok/s':>18}" for m in args.modes)
          + "   verified/req/step"
          + ("   median ratio to plain" if "plain" in args.modes else ""))
    for c in args.concurrency:
        rows = {m: [r for r in results[m]["rows"] if r["concurrency"] == c] for m in args.modes}
        tps = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in rows.items()}
        ver = [f"{m} {sum(r['verified_per_request_step'] for r in rs) / len(rs):.2f}"
               for m, rs in rows.items() if not m.startswith("plain")]  # plain verifies none
        line = (f"{c:>4} " + " ".join(f"{v:18.1f}" for v in tps.values()) + "   "
                + ", ".join(ver))
        if "plain" in rows:
            ratios = []
            for m, rs in rows.items():
                if m != "plain":
                    paired = [r["tokens_per_s"] / p["tokens_per_s"]
                              for r, p in zip(rs, rows["plain"])]
                    ratios.append(f"{m} {statistics.median(paired):.3f}")
            line += "   " + ", ".join(ratios)
        print(line)


if __name__ == "__main__":
    main()
