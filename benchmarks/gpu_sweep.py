"""Side-by-side GPU sweep: no speculation, upstream vLLM DSpark, and ours (V2 runner).

    python benchmarks/gpu_sweep.py --target T --draft D --prompts mt-bench.jsonl \
        --concurrency 1 2 4 8 16 32 64 128 --temperatures 0 1 \
        --out benchmarks/results/gpu_sweep_h200.json

Every configuration is one engine in its own process, all alive at once on one GPU
(each with a fixed KV-cache size), the same draft and γ:

- ``plain``: no speculation;
- ``upstream``: vLLM's own DSpark speculator (the plugin disabled: ``VLLM_PLUGINS``);
- ``upstream-adaptive``: the same with vLLM's adaptive verification;
- ``ours-fixed``: the plugin's V2 speculator drafting every step and verifying all γ
  (``VLLM_DSPARK_SCHEDULER=fixed``, ``VLLM_DSPARK_DRAFT_COST=0``);
- ``ours``: the plugin's defaults (on the V2 runner: full-γ verification and, with a
  confidence head, the draft gate in vLLM's scheduler, see engine/v2/patches.py);
  ``ours-nogate``: the defaults without the gate (``VLLM_DSPARK_DRAFT_COST=0``: every
  step drafts, the default before 2026-12-07); ``ours-gate``: the gate asked for
  explicitly (``VLLM_DSPARK_DRAFT_COST=measure``, as ``ours`` with a confidence head);
  ``ours-vllm-graphs``: ``ours-nogate`` with vLLM's own CUDA graph sizes (its 512-token
  ceiling, ``VLLM_DSPARK_DECODE_GRAPHS=vllm``); ``ours-budget``: the device-side
  verification budget with Algorithm 1's stop (``VLLM_DSPARK_SCHEDULER=causal``);
  ``ours-async``: with §5.2's rule; ``ours-skip``: no step drafts (a draft-count
  schedule of 0), what a step the gate skips costs; ``ours-tree``: draft trees of γ nodes
  (``VLLM_DSPARK_TREE=on``, experimental) on FlashAttention with the target's FULL
  graphs capturing the tree attention (``ours`` is its chain, ``ours-chain`` in issue
  17's words); ``ours-tree-piecewise``: the same with PIECEWISE target graphs (tree
  attention eager, the first tree mode).

For each temperature and concurrency C, C chat prompts are submitted at once
(``--max-tokens`` each, ``ignore_eos`` so every request decodes the same length), one
engine at a time, the order rotated per repeat; a cell repeats until it has
``--min-seconds`` of decoding per engine and at least ``--repeats`` runs. Rows:
tok/s (all requests), tok/s per user (= tok/s / C: every request decodes the same
number of tokens and they start together), τ = tokens per request per verification
step (1 + accepted / verification steps, from vLLM's counters) and, at T = 0, whether
every output equals plain's. Also writes a PNG beside the JSON (per-user against total
tok/s, the Pareto picture; and ratio to plain against C).
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
import time

ENGINE = r'''
import hashlib, json, os, sys, time
job = json.load(open(sys.argv[1]))
from vllm import LLM, SamplingParams

def counters(llm):
    m = {}
    for x in llm.get_metrics():
        decision = x.labels.get("decision")  # the plugin's draft gate: drafted / skipped
        m[x.name + (f"/{decision}" if decision else "")] = getattr(x, "value", None)
    out = {k: m.get("vllm:spec_decode_" + k) or 0
           for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    for d in ("drafted", "skipped"):  # steps the gate drafted / skipped (0 without it)
        out["gate_" + d] = m.get("vllm:dspark_draft_gate_steps/" + d) or 0
    return out

if __name__ == "__main__":
    kw = dict(model=job["target"], dtype="bfloat16", max_model_len=2048,
              max_num_seqs=job["max_num_seqs"], disable_log_stats=False, seed=0,
              gpu_memory_utilization=job["gpu_memory_utilization"],
              kv_cache_memory_bytes=job["kv_bytes"],
              tensor_parallel_size=job["tensor_parallel_size"])
    if job["spec"] is not None:
        kw["speculative_config"] = job["spec"]
    kw.update(job.get("llm_kwargs", {}))
    t0 = time.perf_counter(); llm = LLM(**kw); startup = time.perf_counter() - t0
    chats = [[{"role": "user", "content": p}] for p in job["prompts"]]
    llm.chat(chats[:2], SamplingParams(max_tokens=16), use_tqdm=False)  # warm-up
    try:  # the widest step the target's CUDA graphs cover
        graphed = llm.llm_engine.vllm_config.compilation_config.max_cudagraph_capture_size
    except AttributeError:
        graphed = None
    print(json.dumps({"startup_s": startup, "max_graph_tokens": graphed}), flush=True)
    for line in sys.stdin:  # one batch per line: {"c": C, "t": T}
        cmd = json.loads(line)
        c = cmd["c"]
        params = SamplingParams(temperature=cmd["t"], max_tokens=job["max_tokens"],
                                ignore_eos=True, seed=cmd.get("seed"))
        before = counters(llm)
        t0, wall0 = time.perf_counter(), time.time()
        outs = llm.chat(chats[:c], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        after = counters(llm)
        d = {k: after[k] - before[k] for k in after}
        n = sum(len(o.outputs[0].token_ids) for o in outs)
        digest = hashlib.sha1(json.dumps([list(o.outputs[0].token_ids) for o in outs])
                              .encode()).hexdigest()
        print(json.dumps(dict(tokens=n, seconds=dt, digest=digest, wall=[wall0, time.time()],
                              **d)), flush=True)
    sys.stdout.flush()
    # vLLM may hang in shutdown after the work is done, and a bare exit leaves its
    # engine-core processes holding their GPU memory (H100, 2026-12-07: six of them,
    # 28 GB, outlived the sweep): end this engine's whole process group (its own session).
    import signal
    os.killpg(os.getpgid(0), signal.SIGKILL)
'''

CONFIGS = ("plain", "upstream", "upstream-adaptive", "ours-fixed", "ours", "ours-nogate",
           "ours-gate", "ours-budget", "ours-async", "ours-tree", "ours-vllm-graphs",
           "ours-skip", "ours-tree-piecewise")
# Configurations whose engines run the draft gate: they write its trace
# (VLLM_DSPARK_GATE_TRACE, <out>_gate_<name>.jsonl; lines carry wall-clock times, as do
# the runs in "raw").
GATED = ("ours", "ours-gate")
# Engine arguments beyond the shared ones, by configuration.
LLM_KWARGS = {"ours-tree": {"attention_backend": "FLASH_ATTN",
                            "compilation_config": {"cudagraph_mode": "FULL_AND_PIECEWISE"}},
              "ours-tree-piecewise": {"attention_backend": "FLASH_ATTN",
                                      "compilation_config": {"cudagraph_mode": "PIECEWISE"}}}


def config_job(name: str, args) -> tuple[dict | None, dict]:
    """(speculative_config, env) of a configuration."""
    spec = {"method": "dspark", "model": args.draft, "num_speculative_tokens": args.gamma,
            "draft_sample_method": "probabilistic"}
    off = {"VLLM_PLUGINS": "vllm-dspark-disabled"}  # an allowlist naming no plugin
    always = {"VLLM_DSPARK_DRAFT_COST": "0"}  # every step drafts: no draft gate
    return {
        "plain": (None, off),
        "upstream": (spec, off),
        "upstream-adaptive": (dict(spec, enable_adaptive_verification=True), off),
        "ours-fixed": (spec, {"VLLM_DSPARK_SCHEDULER": "fixed", **always}),
        "ours": (spec, {}),
        "ours-nogate": (spec, always),
        "ours-gate": (spec, {"VLLM_DSPARK_DRAFT_COST": "measure"}),
        "ours-budget": (spec, {"VLLM_DSPARK_SCHEDULER": "causal"}),
        "ours-async": (spec, {"VLLM_DSPARK_SCHEDULER": "async"}),
        "ours-tree": (spec, {"VLLM_DSPARK_TREE": "on"}),
        "ours-tree-piecewise": (spec, {"VLLM_DSPARK_TREE": "on"}),
        # Every step without drafts (a draft-count schedule of 0 for every batch size,
        # carried to the tail): what a step the draft gate skips costs against plain.
        "ours-skip": (dict(spec, num_speculative_tokens_per_batch_size=[[1, 1, 0]]), {}),
        # vLLM's own CUDA graph sizes (its 512-token ceiling), as before the plugin
        # captured every decode batch (engine/patches.py capture_every_decode_batch);
        # against ours-nogate, both drafting every step (the gate would dodge the ceiling).
        "ours-vllm-graphs": (spec, {"VLLM_DSPARK_DECODE_GRAPHS": "vllm", **always}),
    }[name]


def _read_json_line(proc, name) -> dict:
    for line in proc.stdout:  # vLLM logs go to stderr
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"engine {name} exited with {proc.wait()}")


def plot(rows, configs, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = sorted({r["temperature"] for r in rows})
    fig, axes = plt.subplots(2, len(temps), figsize=(6 * len(temps), 9), squeeze=False)
    for j, t in enumerate(temps):
        plain = {r["concurrency"]: r["tok_s"] for r in rows
                 if r["config"] == "plain" and r["temperature"] == t}
        for name in configs:
            rs = sorted((r for r in rows if r["config"] == name and r["temperature"] == t),
                        key=lambda r: r["concurrency"])
            axes[0][j].plot([r["tok_s"] for r in rs], [r["tok_s_per_user"] for r in rs],
                            "o-", label=name)
            if plain:
                axes[1][j].plot([r["concurrency"] for r in rs],
                                [r["tok_s"] / plain[r["concurrency"]] for r in rs], "o-",
                                label=name)
        axes[0][j].set(xlabel="total tok/s", ylabel="tok/s per user", xscale="log",
                       yscale="log", title=f"T = {t}")
        axes[1][j].set(xlabel="concurrency", ylabel="tok/s / plain", xscale="log")
        axes[1][j].axhline(1.0, color="grey", lw=0.8)
        axes[0][j].legend(fontsize=8)
        axes[1][j].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--prompts", required=True, help="jsonl with {'turns': [...]}")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS[:6]), choices=CONFIGS)
    ap.add_argument("--concurrency", type=int, nargs="+",
                    default=[1, 2, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="at least this many runs a cell")
    ap.add_argument("--min-seconds", type=float, default=0.0,
                    help="and at least this much decoding per engine and cell")
    ap.add_argument("--kv-gib", type=float, default=4.0, help="KV cache per engine")
    ap.add_argument("--tensor-parallel-size", type=int, default=1,
                    help="the target's TP degree (the draft follows vLLM's default)")
    ap.add_argument("--cap", nargs="*", default=[], metavar="NAME=C",
                    help="run configuration NAME only at concurrency <= C (a slow one "
                         "would otherwise take most of a window at high load)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        caps = {k: int(v) for k, v in (c.split("=") for c in args.cap)}
    except ValueError:
        raise SystemExit(f"--cap takes NAME=C pairs (e.g. ours-tree=8), got {args.cap}") from None
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

    from vllm_dspark.prompts import read_prompts

    prompts = read_prompts(args.prompts)
    prompts = (prompts * (max(args.concurrency) // len(prompts) + 1))[: max(args.concurrency)]
    raw: dict = {name: [] for name in args.configs}
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "engine.py")
        open(script, "w").write(ENGINE)
        engines, startup, failed, graph_tokens = {}, {}, {}, {}
        try:
            for name in args.configs:  # started together, all kept alive
                spec, env = config_job(name, args)
                if name in GATED:  # the gate's samples and choices, beside the JSON
                    env = dict(env, VLLM_DSPARK_GATE_TRACE=os.path.splitext(
                        os.path.abspath(args.out))[0] + f"_gate_{name}.jsonl")
                job = dict(target=args.target, spec=spec, prompts=prompts,
                           max_num_seqs=max(args.concurrency), max_tokens=args.max_tokens,
                           kv_bytes=int(args.kv_gib * 2**30), gpu_memory_utilization=0.5,
                           tensor_parallel_size=args.tensor_parallel_size,
                           llm_kwargs=LLM_KWARGS.get(name, {}))
                jp = os.path.join(tmp, f"{name}.json")
                json.dump(job, open(jp, "w"))
                engines[name] = subprocess.Popen(
                    [sys.executable, script, jp], text=True, stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE, env=dict(os.environ, **env),
                    start_new_session=True)  # its process group ends with it (ENGINE)
                time.sleep(5)  # staggered: each start-up checks free GPU memory
            for name, proc in list(engines.items()):
                try:
                    ready = _read_json_line(proc, name)
                    startup[name] = ready["startup_s"]
                    graph_tokens[name] = ready.get("max_graph_tokens")
                except RuntimeError as e:
                    # One configuration that cannot start (its traceback is in this log)
                    # must not cost the others' measurements: it is left out and named.
                    failed[name] = str(e)
                    del engines[name]
                    print(f"{name}: FAILED to start, left out", file=sys.stderr, flush=True)
                    continue
                print(f"{name}: started in {startup[name]:.0f}s", file=sys.stderr, flush=True)
            args.configs = [n for n in args.configs if n in engines]
            if "plain" not in engines:
                raise SystemExit(f"plain did not start: {failed.get('plain')}")
            for t in args.temperatures:
                for c in args.concurrency:
                    rep = 0
                    spent = {n: 0.0 for n in args.configs if c <= caps.get(n, c)}
                    while spent and (rep < args.repeats or min(spent.values()) < args.min_seconds):
                        names = list(spent)
                        k = rep % len(names)
                        for name in names[k:] + names[:k]:
                            proc = engines[name]
                            try:
                                proc.stdin.write(json.dumps({"c": c, "t": t, "seed": rep})
                                                 + "\n")
                                proc.stdin.flush()
                                r = _read_json_line(proc, name)
                            except (RuntimeError, OSError) as e:
                                # An engine that dies mid-sweep (its traceback is in this
                                # log) is left out from here on; the others go on.
                                failed[name] = f"died at T={t} C={c}: {e}"
                                del engines[name], spent[name]
                                print(f"{name}: DIED at T={t} C={c}, left out",
                                      file=sys.stderr, flush=True)
                                continue
                            spent[name] += r["seconds"]
                            raw[name].append(dict(r, concurrency=c, temperature=t, repeat=rep))
                        args.configs = [n for n in args.configs if n in engines]
                        rep += 1
                    print(f"T={t} C={c}: {rep} repeats", file=sys.stderr, flush=True)
                    # After every cell: a window cut short still brings back what it measured.
                    write_results(raw, args, startup, failed, graph_tokens, plot_it=True)
        finally:
            for proc in engines.values():
                try:
                    proc.stdin.close()
                    proc.wait(timeout=60)
                except Exception:
                    proc.kill()
    rows = write_results(raw, args, startup, failed, graph_tokens, plot_it=True)
    print_table(rows, [n for n in raw if raw[n]])


def write_results(raw, args, startup, failed, graph_tokens, plot_it: bool) -> list[dict]:
    """Summarise the cells measured so far and write the JSON (and the PNG)."""
    import torch

    rows = summarize(raw, args)
    out = dict(command=" ".join([sys.executable] + sys.argv), target=args.target,
               draft=args.draft, gamma=args.gamma, max_tokens=args.max_tokens,
               tensor_parallel_size=args.tensor_parallel_size,
               machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                            device=torch.cuda.get_device_name(),
                            gpus=torch.cuda.device_count()),
               versions=_versions(), startup_s=startup, max_graph_tokens=graph_tokens,
               failed_to_start=failed, rows=rows,
               raw=raw)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    json.dump(out, open(args.out + ".tmp", "w"), indent=1)
    os.replace(args.out + ".tmp", args.out)
    if plot_it:
        plot(rows, [n for n in raw if raw[n]], os.path.splitext(args.out)[0] + ".png")
    return rows


def summarize(raw, args) -> list[dict]:
    rows = []
    for t in args.temperatures:
        for c in args.concurrency:
            cell = {n: [r for r in raw[n] if r["concurrency"] == c and r["temperature"] == t]
                    for n in raw}
            cell = {n: rs for n, rs in cell.items() if rs}  # not measured (yet), or died
            if not cell:
                continue
            plain = cell.get("plain")
            for name, rs in cell.items():
                tps = [r["tokens"] / r["seconds"] for r in rs]
                drafts = sum(r["num_drafts"] for r in rs)
                row = dict(config=name, concurrency=c, temperature=t,
                           tok_s=statistics.median(tps), tok_s_per_user=statistics.median(tps) / c,
                           tok_s_min=min(tps), tok_s_max=max(tps), runs=len(rs),
                           tau=(1 + sum(r["num_accepted_tokens"] for r in rs) / drafts
                                if drafts else None),
                           verified_per_step=(sum(r["num_draft_tokens"] for r in rs) / drafts
                                              if drafts else None))
                gated = sum(r.get("gate_drafted", 0) + r.get("gate_skipped", 0) for r in rs)
                if gated:  # the draft gate ran: the share of its steps without drafts
                    row["gate_skipped_share"] = sum(r["gate_skipped"] for r in rs) / gated
                if plain and name != "plain":
                    row["ratio_to_plain"] = statistics.median(
                        (r["tokens"] / r["seconds"]) / (p["tokens"] / p["seconds"])
                        for r, p in zip(rs, plain))
                    if t == 0:
                        row["identical_to_plain"] = all(
                            r["digest"] == p["digest"] for r, p in zip(rs, plain))
                rows.append(row)
    return rows


def print_table(rows, configs) -> None:
    for t in sorted({r["temperature"] for r in rows}):
        print(f"T = {t}: tok/s (ratio to plain, τ)")
        print(f"{'C':>4} " + " ".join(f"{n:>26}" for n in configs))
        for c in sorted({r["concurrency"] for r in rows}):
            cells = []
            for n in configs:
                r = next((x for x in rows if x["config"] == n and x["concurrency"] == c
                          and x["temperature"] == t), None)
                if r is None:  # died before this cell
                    cells.append(f"{'-':>26}")
                    continue
                extra = (f" ({r.get('ratio_to_plain', 1):.2f}, "
                         f"{r['tau'] if r['tau'] is None else round(r['tau'], 2)})")
                cells.append(f"{r['tok_s']:>10.0f}{extra:>16}")
            print(f"{c:>4} " + " ".join(cells))


def _versions() -> dict:
    import torch
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__}


if __name__ == "__main__":
    main()
