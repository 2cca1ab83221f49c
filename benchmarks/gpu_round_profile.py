"""Where one decode round's time goes at concurrency 1 (or ``--concurrency C``): ours vs
upstream (torch profiler).

    python benchmarks/gpu_round_profile.py --target T --draft D --prompts mt-bench.jsonl \
        --out benchmarks/results/gpu_round_profile_h200.json

Each configuration runs in its own process, in-process engine (no worker process, so the
profiler sees the runner), CUDA graphs on: ``ours`` (the plugin) and ``upstream``
(plugin disabled), plus ``plain``; ``ours-budget`` / ``upstream-adaptive`` verify a
device-side budget (Algorithm 1 / vLLM's rule); ``ours-skip`` never drafts (a draft-count
schedule of 0: the step the draft gate runs when it skips); ``ours-tree`` verifies draft trees
(``VLLM_DSPARK_TREE=on``, the sweep's FlashAttention + FULL_AND_PIECEWISE engine arguments;
``ours-tree-piecewise``: PIECEWISE, the tree attention eager);
``ours-eager`` / ``upstream-eager`` run without CUDA graphs, where the ``sequential``
range (the Markov loop, sampling and confidences, ``_sample_sequential``) shows that
stage's share of the draft's GPU time. The runner's phases are wrapped in
``record_function`` ranges: ``target`` (execute_model: inputs + target forward),
``sample`` (sample_tokens: rejection sampling, bookkeeping, and the drafting inside it),
``draft`` (the speculator's propose: context K/V, backbone, sequential stage, as one
FULL-graph replay). After a warm-up, C requests decode ``--tokens`` tokens each
under the profiler; per decode step we report each range's CPU time and the GPU time of
the kernels it launched, the step's wall time, and the host gap (wall − GPU time of all
kernels, i.e. time the GPU waited on the host). The same request is first decoded
without the profiler (``unprofiled``): wall time per step, and per range the time
between CUDA events recorded around it (no sync in the loop) — the numbers to compare,
since the profiler inflates graphs of many small kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

WORKER = r'''
import json, os, sys, time
job = json.load(open(sys.argv[1]))
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
import torch
from torch.profiler import ProfilerActivity, profile, record_function
from vllm import LLM, SamplingParams

# Without the profiler: CUDA events around each range, read after the run (no sync in
# the loop). CUPTI inflates graphs of many small kernels; the events do not.
EVENTS = {"on": False, "pairs": {}}

def ranged(cls, name, label):
    original = getattr(cls, name)
    def wrapped(*a, **k):
        timed = EVENTS["on"] and cuda
        if timed:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        with record_function(label):
            result = original(*a, **k)
        if timed:
            end.record()
            EVENTS["pairs"].setdefault(label, []).append((start, end))
        return result
    setattr(cls, name, wrapped)

cuda = torch.cuda.is_available()
if cuda:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner
    from vllm.v1.worker.gpu.spec_decode.dflash.speculator import DFlashSpeculator
    ranged(DFlashSpeculator, "propose", "draft")
    from vllm.v1.worker.gpu.spec_decode.dspark.speculator import DSparkSpeculator
    # Runs on each step only without CUDA graphs (ours-eager): the sequential stage's
    # share of the draft, the case for a fused kernel.
    ranged(DSparkSpeculator, "_sample_sequential", "sequential")
    if job["spec"] is not None and not job.get("plugin_off"):
        from vllm_dspark.engine.v2.speculator import DSparkV2Speculator
        ranged(DSparkV2Speculator, "_sample_sequential", "sequential")
else:  # CPU smoke test of this script: the V1 runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
ranged(GPUModelRunner, "execute_model", "target")
ranged(GPUModelRunner, "sample_tokens", "sample")

if __name__ == "__main__":
    c = job.get("concurrency", 1)
    kw = dict(model=job["target"], dtype=job["dtype"], max_model_len=2048,
              max_num_seqs=max(4, c),
              seed=0, enforce_eager=job.get("eager", False) or not cuda)
    if job["spec"] is not None:
        kw["speculative_config"] = job["spec"]
    kw.update(job.get("llm_kwargs", {}))
    llm = LLM(**kw)
    chat = [[{"role": "user", "content": p}] for p in job["prompts"][:c]]
    params = SamplingParams(temperature=0.0, max_tokens=job["tokens"], ignore_eos=True)
    llm.chat(chat, params, use_tqdm=False)  # warm-up
    EVENTS["on"] = True  # the same request, unprofiled, timed by wall clock and CUDA events
    t0 = time.perf_counter()
    llm.chat(chat, params, use_tqdm=False)
    if cuda:
        torch.cuda.synchronize()
    plain_wall = time.perf_counter() - t0
    EVENTS["on"] = False
    pairs = EVENTS["pairs"]
    plain_steps = len(pairs.get("target", [])) or 1
    event_ms = {k: sum(a.elapsed_time(b) for a, b in v) / plain_steps for k, v in pairs.items()}
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        llm.chat(chat, params, use_tqdm=False)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    def device_us(e):  # the field's name before torch 2.4: cuda_time_total
        dev = getattr(e, "device_time_total", None)
        return getattr(e, "cuda_time_total", 0.0) if dev is None else dev

    stats, kernels_us, avgs = {}, 0.0, prof.key_averages()
    for e in avgs:
        if e.key in ("target", "sample", "draft", "sequential"):
            stats[e.key] = dict(calls=e.count, cpu_us=e.cpu_time_total, gpu_us=device_us(e))
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels_us += e.device_time
    # The heaviest kernels and host ops of the profiled run: where a slow mode's time goes.
    top_gpu = sorted(avgs, key=device_us, reverse=True)[:15]
    top_cpu = sorted(avgs, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    steps = stats.get("target", {}).get("calls", 0) or 1
    per_step = {k: dict(cpu_ms=v["cpu_us"] / steps / 1e3, gpu_ms=v["gpu_us"] / steps / 1e3,
                        calls_per_step=v["calls"] / steps) for k, v in stats.items()}
    out = dict(steps=steps, wall_ms_per_step=wall / steps * 1e3,
               gpu_ms_per_step=kernels_us / steps / 1e3,
               host_gap_ms_per_step=(wall * 1e6 - kernels_us) / steps / 1e3,
               concurrency=c, tokens=job["tokens"], tok_s=c * job["tokens"] / wall,
               phases=per_step,
               top_gpu_ms_per_step={e.key[:80]: device_us(e) / steps / 1e3 for e in top_gpu},
               top_self_cpu_ms_per_step={e.key[:80]: e.self_cpu_time_total / steps / 1e3
                                         for e in top_cpu},
               unprofiled=dict(steps=plain_steps, wall_ms_per_step=plain_wall / plain_steps * 1e3,
                               tok_s=c * job["tokens"] / plain_wall,
                               event_ms_per_step=event_ms))
    print("RESULT " + json.dumps(out), flush=True)
    # A bare exit would leave vLLM's engine-core process holding its GPU memory (the next
    # configuration's start-up check would fail): end this worker's process group.
    import signal
    os.killpg(os.getpgid(0), signal.SIGKILL)
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--configs", nargs="+", default=["plain", "upstream", "ours"])
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=1, help="requests decoding at once")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from vllm_dspark.prompts import read_prompts

    prompts = read_prompts(args.prompts)
    prompts = (prompts * (args.concurrency // len(prompts) + 1))[:args.concurrency]
    spec = {"method": "dspark", "model": args.draft, "num_speculative_tokens": args.gamma}
    off = {"VLLM_PLUGINS": "vllm-dspark-disabled"}
    plans = {"plain": (None, off), "upstream": (spec, off), "ours": (spec, {}),
             "upstream-eager": (spec, off), "ours-eager": (spec, {}),
             # The verification budget on the device: vLLM's rule and ours (Algorithm 1).
             "upstream-adaptive": (dict(spec, enable_adaptive_verification=True), off),
             "ours-budget": (spec, {"VLLM_DSPARK_SCHEDULER": "causal"}),
             # Tree verification (issue 17): the sweep's engine arguments for it.
             "ours-tree": (spec, {"VLLM_DSPARK_TREE": "on"}),
             "ours-tree-piecewise": (spec, {"VLLM_DSPARK_TREE": "on"}),
             # No step drafts (a draft-count schedule of 0): a step the draft gate skips.
             "ours-skip": (dict(spec, num_speculative_tokens_per_batch_size=[[1, 1, 0]]), {})}
    from gpu_sweep import LLM_KWARGS  # benchmarks/ is this script's directory
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        worker = os.path.join(tmp, "worker.py")
        open(worker, "w").write(WORKER)
        for name in args.configs:  # one at a time: the profiler needs the GPU alone
            spec_cfg, env = plans[name]
            jp = os.path.join(tmp, f"{name}.json")
            json.dump(dict(target=args.target, spec=spec_cfg, prompts=prompts,
                           concurrency=args.concurrency,
                           tokens=args.tokens, dtype=args.dtype, eager=name.endswith("-eager"),
                           plugin_off="VLLM_PLUGINS" in env, llm_kwargs=LLM_KWARGS.get(name, {})),
                      open(jp, "w"))
            proc = subprocess.run([sys.executable, worker, jp], capture_output=True, text=True,
                                  env=dict(os.environ, **env), timeout=900,
                                  start_new_session=True)  # its own process group (WORKER)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
            results[name] = json.loads(line[7:])
            r = results[name]
            u = r["unprofiled"]
            print(f"{name} unprofiled: {u['wall_ms_per_step']:.2f} ms/step wall, "
                  f"{u['tok_s']:.0f} tok/s; CUDA events per step: "
                  + ", ".join(f"{k} {v:.2f} ms" for k, v in u["event_ms_per_step"].items()),
                  file=sys.stderr)
            print(f"{name}: {r['wall_ms_per_step']:.2f} ms/step wall, "
                  f"{r['gpu_ms_per_step']:.2f} GPU, {r['host_gap_ms_per_step']:.2f} host gap; "
                  + ", ".join(f"{k} {v['gpu_ms']:.2f} GPU / {v['cpu_ms']:.2f} CPU ms"
                              for k, v in r["phases"].items()), file=sys.stderr)
    json.dump(dict(command=" ".join([sys.executable] + sys.argv), results=results),
              open(args.out, "w"), indent=1)


if __name__ == "__main__":
    main()
