"""``vllm-dspark eval``: acceptance of a DSpark draft measured through vLLM.

The DSpark paper's protocol: chain drafting with a fixed γ, no scheduler (every
step verifies γ drafts). For each dataset and temperature it reports

- τ, the mean accepted length per verification step including the bonus token,
  ``1 + accepted / drafts`` (vLLM's "mean acceptance length");
- the acceptance rate ``accepted / drafted``;
- per-position acceptance: unconditional ``per_pos[k] / drafts`` and conditional
  (paper Fig. 2) ``P(k accepted | 1..k-1 accepted) = per_pos[k] / per_pos[k-1]``
  (``per_pos[0] / drafts`` for the first position).

Counts come from vLLM's own spec-decode counters (``vllm:spec_decode_num_drafts``,
``_num_draft_tokens``, ``_num_accepted_tokens``, ``_num_accepted_tokens_per_pos``).
They are cumulative per engine, so one engine serves every (dataset, temperature)
and each run is the difference of the counters around its ``generate`` call; vLLM's
per-request spec-decode metrics are summed alongside as a cross-check (and give
the number of drafted tokens per position, which the counters lack).

Each engine runs in its own process (``python -m vllm_dspark.eval.acceptance
JOB OUT``), so this module never imports vLLM in the caller's process: ``--upstream``
can then hide this plugin from vLLM (``VLLM_PLUGINS``) in the engine process only,
and ``evaluate`` works from scripts that already hold an engine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from vllm_dspark.cli import add_dtype_argument
from vllm_dspark.config import DSparkConfig
from vllm_dspark.launch import CPU_KV_CACHE_GIB, CPU_KV_ENV, engine_dtype, engine_env
from vllm_dspark import prompts as prompts_mod
from vllm_dspark.prompts import PROMPT_DIR_ENV, chat_prompt_ids, read_prompts

OUR_PLUGIN = "dspark"  # our name under vllm.general_plugins (pyproject entry point)
PLUGIN_GROUPS = ("vllm.general_plugins", "vllm.platform_plugins", "vllm.io_processor_plugins",
                 "vllm.stat_logger_plugins", "vllm.endpoint_plugins")
NUM_DRAFTS = "vllm:spec_decode_num_drafts"
NUM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
NUM_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


class EvalError(ValueError):
    """An evaluation that cannot run as asked, and how to fix it."""


# --------------------------------------------------------------------------- metrics
def acceptance_metrics(num_drafts: int, num_draft_tokens: int, num_accepted_tokens: int,
                       accepted_per_pos: Sequence[int]) -> dict[str, Any]:
    """τ, acceptance rate and per-position acceptance from vLLM's spec-decode counts.

    ``accepted_per_pos[k]`` counts the verification steps whose draft tokens 1..k+1
    were all accepted (vLLM's ``observe_draft``), so it is non-increasing in k and
    sums to ``num_accepted_tokens``. Undefined ratios (nothing to divide by) are None.
    """
    per_pos = [int(x) for x in accepted_per_pos]
    out: dict[str, Any] = {
        "tau": None, "acceptance_rate": None,
        "per_position_conditional": [None] * len(per_pos),
        "per_position": [None] * len(per_pos),
        "num_drafts": int(num_drafts), "num_draft_tokens": int(num_draft_tokens),
        "num_accepted_tokens": int(num_accepted_tokens),
        "accepted_per_position": per_pos,
    }
    if num_draft_tokens > 0:
        out["acceptance_rate"] = num_accepted_tokens / num_draft_tokens
    if num_drafts <= 0:
        return out
    out["tau"] = 1.0 + num_accepted_tokens / num_drafts
    out["per_position"] = [c / num_drafts for c in per_pos]
    cond, prev = [], num_drafts
    for c in per_pos:
        cond.append(c / prev if prev > 0 else None)
        prev = c
    out["per_position_conditional"] = cond
    return out


def spec_counters(metrics: Sequence[Any]) -> dict[str, Any]:
    """The spec-decode counters in a ``llm.get_metrics()`` snapshot, summed over engines."""
    out: dict[str, Any] = {NUM_DRAFTS: 0, NUM_DRAFT_TOKENS: 0, NUM_ACCEPTED: 0,
                           ACCEPTED_PER_POS: []}
    for m in metrics:
        if m.name in (NUM_DRAFTS, NUM_DRAFT_TOKENS, NUM_ACCEPTED):
            out[m.name] += int(m.value)
        elif m.name == ACCEPTED_PER_POS:
            vals = [int(v) for v in m.values]
            acc = out[ACCEPTED_PER_POS]
            acc.extend([0] * (len(vals) - len(acc)))
            for i, v in enumerate(vals):
                acc[i] += v
    return out


def diff_counters(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What one run added to the cumulative counters."""
    out = {k: after[k] - before.get(k, 0) for k in (NUM_DRAFTS, NUM_DRAFT_TOKENS, NUM_ACCEPTED)}
    b, a = before.get(ACCEPTED_PER_POS) or [], after.get(ACCEPTED_PER_POS) or []
    b = list(b) + [0] * (len(a) - len(b))
    out[ACCEPTED_PER_POS] = [x - y for x, y in zip(a, b)]
    return out


def metrics_from_counters(c: dict[str, Any]) -> dict[str, Any]:
    return acceptance_metrics(c[NUM_DRAFTS], c[NUM_DRAFT_TOKENS], c[NUM_ACCEPTED],
                              c[ACCEPTED_PER_POS])


def aggregate_request_metrics(items: Sequence[dict], gamma: int) -> dict[str, Any]:
    """Sum vLLM's per-request spec-decode metrics (``RequestSpecDecodeMetrics.to_dict``).

    Returns the same counts as the Prometheus counters, plus ``drafted_per_position``
    when vLLM recorded the per-step arrays (``per_request_spec_decode_metrics=detailed``).
    """
    hist = [0] * (gamma + 1)
    drafted = 0
    drafted_per_pos = [0] * gamma
    detailed = bool(items)
    for it in items:
        for j, n in enumerate(it.get("acceptance_histogram", [])):
            if j >= len(hist):
                hist.extend([0] * (j + 1 - len(hist)))
            hist[j] += int(n)
        drafted += int(it.get("num_draft_tokens", 0))
        steps = it.get("per_step_drafted")
        if steps is None:
            detailed = False
            continue
        for d in steps:
            for k in range(min(int(d), gamma)):
                drafted_per_pos[k] += 1
    per_pos = [sum(hist[j] for j in range(k + 1, len(hist))) for k in range(gamma)]
    return {NUM_DRAFTS: sum(hist), NUM_DRAFT_TOKENS: drafted,
            NUM_ACCEPTED: sum(j * n for j, n in enumerate(hist)), ACCEPTED_PER_POS: per_pos,
            "acceptance_histogram": hist,
            "drafted_per_position": drafted_per_pos if detailed else None}


# --------------------------------------------------------------------------- datasets
def resolve_dataset(spec: str, prompt_dir: str | None = None) -> tuple[str, str]:
    """(name, path) for a dataset given as a .jsonl path or a name in ``prompt_dir``
    (default: $VLLM_DSPARK_PROMPT_DIR, else the packaged reference sets)."""
    try:
        return prompts_mod.resolve_dataset(spec, prompt_dir)
    except prompts_mod.PromptFileError as e:
        raise EvalError(str(e)) from e


def load_prompts(path: str, num_prompts: int | None = None) -> list[str]:
    """The first user turn of the first ``num_prompts`` records of a jsonl file."""
    try:
        prompts = read_prompts(path, num_prompts)
    except ValueError as e:
        raise EvalError(str(e)) from e
    if not prompts:
        raise EvalError(f"{path} holds no prompts")
    return prompts


# --------------------------------------------------------------------------- engine process
def env_without_our_plugin(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` whose ``VLLM_PLUGINS`` lets vLLM load every plugin but ours.

    vLLM (``vllm.plugins.load_plugins_by_group``) loads only the entry points named in
    the comma-separated ``VLLM_PLUGINS`` when it is set (in every plugin group), all of
    them when it is unset; "" loads none.
    """
    env = dict(os.environ if environ is None else environ)
    if "VLLM_PLUGINS" in env:
        names = [n for n in env["VLLM_PLUGINS"].split(",") if n and n != OUR_PLUGIN]
    else:
        from importlib.metadata import entry_points

        names = sorted({ep.name for g in PLUGIN_GROUPS for ep in entry_points(group=g)}
                       - {OUR_PLUGIN})
    env["VLLM_PLUGINS"] = ",".join(names)
    return env


def _machine_info(current_platform: Any) -> dict[str, Any]:
    import torch
    import vllm

    import vllm_dspark

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    gpu = None
    if torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "gpu": gpu,
            "device_type": getattr(current_platform, "device_type", None),
            "vllm": vllm.__version__, "torch": torch.__version__,
            "vllm_dspark": vllm_dspark.__version__}


def _engine_main(job_path: str, out_path: str) -> int:
    """Run one engine on a job (see ``evaluate``) and write its raw counts."""
    with open(job_path) as f:
        job = json.load(f)

    def fail(msg: str) -> int:
        with open(out_path, "w") as f:
            json.dump({"error": msg}, f)
        return 3

    from vllm.platforms import current_platform

    if job["upstream"] and job["draft"] and current_platform.is_cpu():
        return fail(
            "--upstream uses vLLM's own DSpark, which vLLM 0.32 runs only on its V2 GPU "
            "model runner; the CPU backend (V1 runner) refuses it. Run without --upstream "
            "on CPU (this plugin serves DSpark on the V1 runner), or on a GPU machine."
        )
    dtype = engine_dtype(job["dtype"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(job["target"])
    chat = bool(getattr(tokenizer, "chat_template", None))
    if not chat:
        print("vllm-dspark eval: the target tokenizer has no chat template; prompts are "
              "used as plain text", file=sys.stderr)
    limit = job["max_model_len"] - job["max_tokens"]
    runs = []
    for run in job["runs"]:
        ids = [chat_prompt_ids(tokenizer, p) for p in run["prompts"]]
        kept = [x for x in ids if len(x) <= limit]
        runs.append(dict(run, prompt_ids=kept, num_skipped=len(ids) - len(kept)))

    from vllm import LLM, SamplingParams

    kwargs: dict[str, Any] = dict(
        model=job["target"], dtype=dtype, seed=job["seed"], max_model_len=job["max_model_len"],
        enforce_eager=job["enforce_eager"], disable_log_stats=False,
    )
    if job.get("gpu_memory_utilization") is not None:
        kwargs["gpu_memory_utilization"] = job["gpu_memory_utilization"]
    if job.get("max_num_seqs") is not None:
        kwargs["max_num_seqs"] = job["max_num_seqs"]
    if job["draft"]:
        kwargs["speculative_config"] = {
            "method": "dspark", "model": job["draft"], "num_speculative_tokens": job["gamma"],
            # Lossless at every T; at T = 0 the drafter takes the argmax all the same
            # (vllm_dspark.decode.draft.sample_block: greedy rows take the argmax).
            "draft_sample_method": "probabilistic",
        }
        kwargs["per_request_spec_decode_metrics"] = "detailed"
    t0 = time.time()
    llm = LLM(**kwargs)
    startup_s = time.time() - t0

    results = []
    for run in runs:
        params = SamplingParams(temperature=run["temperature"], max_tokens=job["max_tokens"],
                                ignore_eos=job["ignore_eos"])
        prompts = [{"prompt_token_ids": ids} for ids in run["prompt_ids"]]
        before = spec_counters(llm.get_metrics())
        t1 = time.time()
        outputs = llm.generate(prompts, params, use_tqdm=False) if prompts else []
        elapsed = time.time() - t1
        counters = diff_counters(before, spec_counters(llm.get_metrics()))
        per_request = [o.outputs[0].spec_decode_metrics.to_dict() for o in outputs
                       if o.outputs and o.outputs[0].spec_decode_metrics is not None]
        results.append({
            "dataset": run["dataset"], "temperature": run["temperature"],
            "num_prompts": len(prompts), "num_skipped": run["num_skipped"],
            "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
            "prompt_tokens": sum(len(ids) for ids in run["prompt_ids"]),
            "elapsed_s": elapsed, "counters": counters, "per_request": per_request,
        })
    out = {"results": results, "startup_s": startup_s, "dtype": dtype, "chat_template": chat,
           "machine": _machine_info(current_platform)}
    with open(out_path, "w") as f:
        json.dump(out, f)
    return 0


LOG_TAIL_LINES = 30


def log_tail(text: str, n: int = LOG_TAIL_LINES) -> str:
    """The last ``n`` lines of an engine log, and the last exception line before them
    (vLLM's shutdown lines often follow the error that matters)."""
    lines = text.rstrip("\n").splitlines()
    tail = lines[-n:]
    for line in reversed(lines[:-n] if len(lines) > n else []):
        if re.match(r"^\s*(\S+ )*\w*(Error|Exception)\b.*:", line) and "Traceback" not in line:
            return "\n".join([line, "..."] + tail)
    return "\n".join(tail)


def _run_engine(job: dict, *, upstream: bool, quiet: bool) -> dict:
    # Sized CPU KV cache unless the job sizes memory itself (vLLM-CPU's env var would
    # override the fraction).
    sized = job.get("gpu_memory_utilization") is not None
    env = env_without_our_plugin() if upstream else engine_env(cpu_kv_cache=not sized)
    if upstream and not sized and not env.get(CPU_KV_ENV):  # upstream: vLLM's runner choice
        env[CPU_KV_ENV] = str(CPU_KV_CACHE_GIB)
    # The paper's acceptance protocol verifies every drafted token (no scheduler).
    env["VLLM_DSPARK_SCHEDULER"] = "fixed"
    with tempfile.TemporaryDirectory(prefix="vllm-dspark-eval-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        log_path = os.path.join(tmp, "engine.log")
        with open(job_path, "w") as f:
            json.dump(job, f)
        cmd = [sys.executable, "-m", "vllm_dspark.eval.acceptance", job_path, out_path]
        with open(log_path, "w") as log:  # --quiet: kept, and shown if the engine fails
            sink = dict(stdout=log, stderr=subprocess.STDOUT) if quiet else {}
            rc = subprocess.run(cmd, env=env, **sink).returncode
        res = None
        if os.path.isfile(out_path):
            with open(out_path) as f:
                res = json.load(f)
        if res and "error" in res:
            raise EvalError(res["error"])
        if rc != 0 or res is None:
            msg = f"the vLLM engine process failed (exit status {rc})"
            if not quiet:
                raise EvalError(msg + "; its log is above")
            with open(log_path, errors="replace") as f:
                text = f.read()
            kept = tempfile.NamedTemporaryFile("w", prefix="vllm-dspark-eval-", suffix=".log",
                                               delete=False)
            with kept:
                kept.write(text)
            raise EvalError(f"{msg}. The last lines of its log (all of it: {kept.name}):\n"
                            + (log_tail(text) or "(the engine wrote nothing)"))
        return res


# --------------------------------------------------------------------------- evaluate
def _temp_key(t: float) -> str:
    return f"T={t:g}"


def _draft_gamma(draft: str, upstream: bool) -> int:
    """The draft's block_size, after checking (this plugin's path) it is a DSpark draft."""
    if not upstream:
        return DSparkConfig.from_dir(draft).block_size  # DSparkConfigError before vLLM starts
    cfg_path = os.path.join(draft, "config.json")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"cannot read the draft config {cfg_path!r}: {e}") from e
    for key in ("block_size", "dspark_block_size"):
        if key in cfg:
            return int(cfg[key])
    raise EvalError(f"{cfg_path} names no block_size; pass --gamma")


def evaluate(
    target: str,
    draft: str,
    datasets: Sequence[str],
    *,
    prompt_dir: str | None = None,
    num_prompts: int = 80,
    gamma: int | None = None,
    temperatures: Sequence[float] = (0.0, 1.0),
    max_tokens: int = 256,
    dtype: str = "auto",
    seed: int = 0,
    max_model_len: int = 2048,
    enforce_eager: bool = False,
    gpu_memory_utilization: float | None = None,
    max_num_seqs: int | None = None,
    ignore_eos: bool = False,
    upstream: bool = False,
    baseline: bool = False,
    out: str | None = None,
    plot: str | None = None,
    command: str | None = None,
    quiet: bool = False,
) -> dict:
    """Measure τ and per-position acceptance of ``draft`` on ``target`` (see module doc).

    One engine (its own process) serves every dataset and temperature; ``baseline``
    adds a second engine without speculative decoding for tokens/s and speedup.
    Returns the result dict that ``out`` (JSON) receives.
    """
    if not os.path.isfile(os.path.join(target, "config.json")):
        raise EvalError(f"target {target!r} is not a model directory (no config.json)")
    with open(os.path.join(target, "config.json")) as f:
        target_cfg = json.load(f)
    max_pos = (target_cfg.get("max_position_embeddings")
               or (target_cfg.get("text_config") or {}).get("max_position_embeddings"))
    if max_pos and max_model_len > int(max_pos):
        print(f"vllm-dspark eval: --max-model-len {max_model_len} exceeds the target's "
              f"max_position_embeddings; using {int(max_pos)}", file=sys.stderr)
        max_model_len = int(max_pos)
    block_size = _draft_gamma(draft, upstream)
    gamma = block_size if gamma is None else int(gamma)
    if gamma < 1:
        raise EvalError(f"--gamma must be >= 1, got {gamma}")
    if not temperatures:
        raise EvalError("no temperatures given")
    if num_prompts < 1 or max_tokens < 1:
        raise EvalError("--num-prompts and --max-tokens must be >= 1")
    if max_tokens >= max_model_len:
        raise EvalError(f"--max-tokens ({max_tokens}) must be below --max-model-len "
                        f"({max_model_len}), which must also hold the prompt")
    resolved: dict[str, str] = {}
    for spec in datasets:
        name, path = resolve_dataset(spec, prompt_dir)
        base, i = name, 2
        while name in resolved and resolved[name] != path:
            name, i = f"{base}-{i}", i + 1
        resolved[name] = path
    if not resolved:
        raise EvalError("no datasets given")
    prompts = {name: load_prompts(path, num_prompts) for name, path in resolved.items()}

    runs = [{"dataset": name, "temperature": float(t), "prompts": prompts[name]}
            for t in temperatures for name in resolved]
    job = {"target": os.path.abspath(target), "draft": os.path.abspath(draft), "gamma": gamma,
           "dtype": dtype, "seed": seed, "max_model_len": max_model_len,
           "max_tokens": max_tokens, "enforce_eager": enforce_eager,
           "gpu_memory_utilization": gpu_memory_utilization, "max_num_seqs": max_num_seqs,
           "ignore_eos": ignore_eos, "upstream": upstream, "runs": runs}
    spec_out = _run_engine(job, upstream=upstream, quiet=quiet)
    base_out = None
    if baseline:
        base_out = _run_engine(dict(job, draft=None, upstream=False), upstream=False,
                               quiet=quiet)

    results: dict[str, dict[str, Any]] = {name: {} for name in resolved}
    for i, r in enumerate(spec_out["results"]):
        m = metrics_from_counters(r["counters"])
        agg = aggregate_request_metrics(r["per_request"], gamma)
        m.update(
            num_prompts=r["num_prompts"], num_skipped_prompts=r["num_skipped"],
            prompt_tokens=r["prompt_tokens"], generated_tokens=r["generated_tokens"],
            elapsed_s=r["elapsed_s"],
            # Tokens the requests kept per step (first token comes from prefill). vLLM's
            # counters also count accepted tokens cut by max_tokens / EOS at a request's
            # last step, so this is <= tau; the gap is at most γ tokens per request.
            tau_emitted=((r["generated_tokens"] - r["num_prompts"]) / m["num_drafts"]
                         if m["num_drafts"] else None),
            tokens_per_s=r["generated_tokens"] / r["elapsed_s"] if r["elapsed_s"] > 0 else None,
            drafted_per_position=agg["drafted_per_position"],
            acceptance_histogram=agg["acceptance_histogram"],
            per_request_metrics_agree=(
                all(agg[k] == r["counters"][k] for k in
                    (NUM_DRAFTS, NUM_DRAFT_TOKENS, NUM_ACCEPTED, ACCEPTED_PER_POS))
                if r["per_request"] else None),
        )
        if base_out is not None:
            b = base_out["results"][i]
            tps = b["generated_tokens"] / b["elapsed_s"] if b["elapsed_s"] > 0 else None
            m["baseline_tokens_per_s"] = tps
            m["speedup"] = m["tokens_per_s"] / tps if tps and m["tokens_per_s"] else None
        results[r["dataset"]][_temp_key(r["temperature"])] = m

    result = {
        "target": os.path.abspath(target), "draft": os.path.abspath(draft), "gamma": gamma,
        "draft_block_size": block_size, "implementation": "upstream" if upstream else "vllm-dspark",
        "protocol": "chain drafting, fixed gamma, no scheduler; tau includes the bonus token",
        "datasets": resolved, "temperatures": [float(t) for t in temperatures],
        "num_prompts": num_prompts, "max_tokens": max_tokens, "max_model_len": max_model_len,
        "dtype": spec_out["dtype"], "seed": seed, "ignore_eos": ignore_eos,
        "chat_template": spec_out["chat_template"], "startup_s": spec_out["startup_s"],
        "machine": spec_out["machine"],
        "command": command if command is not None else shlex.join([sys.executable] + sys.argv),
        "results": results,
    }
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    if plot:
        plot_results(result, plot)
    return result


# --------------------------------------------------------------------------- report
def plot_results(result: dict, path: str) -> None:
    """Per-position conditional acceptance (one line per dataset × T) and a τ bar chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gamma = result["gamma"]
    datasets = list(result["results"])
    temps = sorted({k for d in result["results"].values() for k in d},
                   key=lambda k: float(k[2:]))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for di, name in enumerate(datasets):
        for ti, tk in enumerate(temps):
            m = result["results"][name].get(tk)
            if not m:
                continue
            ys = [float("nan") if v is None else v for v in m["per_position_conditional"]]
            ax1.plot(range(1, len(ys) + 1), ys, styles[ti % len(styles)], marker="o",
                     color=colors[di % len(colors)], label=f"{name} {tk}")
    ax1.set_xlabel("draft position k")
    ax1.set_ylabel("P(k accepted | 1..k-1 accepted)")
    ax1.set_title("Per-position conditional acceptance")
    ax1.set_xticks(range(1, gamma + 1))
    ax1.set_ylim(0, 1.02)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    width = 0.8 / max(len(temps), 1)
    for ti, tk in enumerate(temps):
        xs = [di + (ti - (len(temps) - 1) / 2) * width for di in range(len(datasets))]
        taus = [(result["results"][n].get(tk) or {}).get("tau") or 0.0 for n in datasets]
        bars = ax2.bar(xs, taus, width, label=tk)
        ax2.bar_label(bars, fmt="%.2f", fontsize=8)
    ax2.axhline(gamma + 1, color="gray", ls="--", lw=1, label=f"γ+1 = {gamma + 1}")
    ax2.set_xticks(range(len(datasets)))
    ax2.set_xticklabels(datasets)
    ax2.set_ylabel("τ (accepted length per step, incl. bonus)")
    ax2.set_title(f"Mean accepted length τ (γ = {gamma})")
    ax2.legend(fontsize=8)
    fig.suptitle(f"{os.path.basename(result['draft'])} on {os.path.basename(result['target'])}"
                 f" ({result.get('implementation', '')})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_table(result: dict) -> str:
    lines = [f"{'dataset':<14}{'T':>4}{'tau':>7}{'acc.rate':>10}{'drafts':>9}{'tok/s':>9}"
             "  conditional acceptance per position"]
    for name, by_t in result["results"].items():
        for tk, m in by_t.items():
            fmt = (lambda v, w, p: f"{'-':>{w}}" if v is None else f"{v:>{w}.{p}f}")  # noqa: E731
            cond = " ".join("  - " if v is None else f"{v:.2f}"
                            for v in m["per_position_conditional"])
            lines.append(f"{name:<14}{tk[2:]:>4}{fmt(m['tau'], 7, 3)}"
                         f"{fmt(m['acceptance_rate'], 10, 3)}{m['num_drafts']:>9}"
                         f"{fmt(m['tokens_per_s'], 9, 1)}  {cond}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- CLI
def _reference_names() -> str:
    return ", ".join(prompts_mod.available_datasets(prompts_mod.REFERENCE_PROMPT_DIR))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Measure DSpark acceptance through vLLM (paper protocol: chain drafting, fixed γ, "
        "no scheduler): τ = 1 + accepted/drafts (incl. the bonus token), acceptance rate, "
        "per-position (conditional) acceptance, per dataset and temperature."
    )
    p.add_argument("--target", required=True, help="target model directory (HF format)")
    p.add_argument("--draft", required=True, help="DSpark draft directory")
    p.add_argument("--datasets", nargs="+", required=True, metavar="NAME_OR_PATH",
                   help="jsonl prompt files, or names of <name>.jsonl in --prompt-dir")
    p.add_argument("--prompt-dir", default=None,
                   help=f"where dataset names resolve (default: ${PROMPT_DIR_ENV}, else the "
                        f"reference sets shipped in the package: {_reference_names()})")
    p.add_argument("--num-prompts", type=int, default=80, help="first N prompts per dataset")
    p.add_argument("--gamma", type=int, default=None,
                   help="draft tokens per step γ (default: the draft's block_size)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0],
                   help="sampling temperatures; each dataset runs at each")
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens per prompt at most")
    add_dtype_argument(p, "vLLM dtype; auto = the model's on GPU, float32 on CPU")
    p.add_argument("--seed", type=int, default=0, help="vLLM seed")
    p.add_argument("--max-model-len", type=int, default=2048,
                   help="vLLM max_model_len (capped at the target's); longer prompts are "
                   "skipped")
    p.add_argument("--enforce-eager", action="store_true",
                   help="vLLM enforce_eager: no torch.compile / CUDA graphs (faster start-up)")
    p.add_argument("--gpu-memory-utilization", type=float, default=None,
                   help="vLLM gpu_memory_utilization (default: vLLM's)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="vLLM max_num_seqs (default: vLLM's)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="always generate --max-tokens tokens")
    p.add_argument("--no-spec-baseline", action="store_true",
                   help="also run the target without speculative decoding (tokens/s, speedup)")
    p.add_argument("--upstream", action="store_true",
                   help="use vLLM's own DSpark instead of this plugin (GPU / V2 runner only)")
    p.add_argument("--out", default=None,
                   help="write the results as JSON here (default: print the table only)")
    p.add_argument("--plot", default=None, help="write a PNG of the results here (default: none)")
    p.add_argument("--quiet", action="store_true",
                   help="hide the engine's log (its last lines are still printed if it fails)")


def run(args: argparse.Namespace) -> int:
    from vllm_dspark.config import DSparkConfigError

    try:
        result = evaluate(
            args.target, args.draft, args.datasets, prompt_dir=args.prompt_dir,
            num_prompts=args.num_prompts, gamma=args.gamma, temperatures=args.temperatures,
            max_tokens=args.max_tokens, dtype=args.dtype, seed=args.seed,
            max_model_len=args.max_model_len, enforce_eager=args.enforce_eager,
            gpu_memory_utilization=args.gpu_memory_utilization,
            max_num_seqs=args.max_num_seqs, ignore_eos=args.ignore_eos,
            upstream=args.upstream, baseline=args.no_spec_baseline, out=args.out,
            plot=args.plot, quiet=args.quiet,
            command=shlex.join(["vllm-dspark"] + sys.argv[1:]),
        )
    except (EvalError, DSparkConfigError) as e:
        print(f"vllm-dspark eval: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.out:
        print(f"results: {args.out}")
    if args.plot:
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m vllm_dspark.eval.acceptance JOB.json OUT.json "
                 "(the engine process of `vllm-dspark eval`)")
    sys.exit(_engine_main(sys.argv[1], sys.argv[2]))
