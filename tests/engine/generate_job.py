"""Run one vLLM engine (CPU in CI) on a job and write what the tests compare.

Usage: python generate_job.py job.json result.json

Each engine gets its own process: vLLM engines spawn workers and hold global
state, so the tests never build two in one interpreter.
"""

import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def metrics_summary(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith(("vllm:spec_decode", "vllm:num_preemptions", "vllm:prefix_cache")):
            out[m.name] = getattr(m, "values", None) or getattr(m, "value", None)
        elif m.name.startswith("vllm:dspark_") or m.name == "vllm:iteration_tokens_total":
            # The plugin's metrics (vllm_dspark/engine/metrics.py), keyed by name and their
            # own label (decision, position): "name{label=value}"; histograms as dicts.
            own = [f"{k}={v}" for k, v in m.labels.items() if k not in ("model_name", "engine")]
            key = m.name + ("{" + ",".join(own) + "}" if own else "")
            if hasattr(m, "buckets"):
                out[key] = {"count": m.count, "sum": m.sum, "buckets": m.buckets}
            else:
                out[key] = m.value
    return out


def main() -> None:
    job = json.load(open(sys.argv[1]))
    os.environ.update(job.get("env", {}))  # plugin knobs, before vLLM is imported
    if job.get("trace"):
        os.environ["VLLM_DSPARK_TRACE_FILE"] = job["trace"]
    from vllm import LLM, SamplingParams

    decider_calls = None
    if job.get("count_decider_calls"):  # needs VLLM_ENABLE_V1_MULTIPROCESSING=0
        from vllm_dspark.schedule import triton_prefix

        decider_calls = [0]
        decide = triton_prefix.GraphedDecider.decide

        def counted(self, *args, **kwargs):
            decider_calls[0] += 1
            return decide(self, *args, **kwargs)

        triton_prefix.GraphedDecider.decide = counted

    kwargs = dict(
        model=job["target"], enforce_eager=True, dtype="float32", max_model_len=512,
        max_num_seqs=job.get("max_num_seqs", 8), disable_log_stats=False, seed=0,
        skip_tokenizer_init=job.get("skip_tokenizer_init", False),
    )
    kwargs.update(job.get("llm_kwargs", {}))
    if job.get("draft"):
        spec = {"method": "dspark", "model": job["draft"],
                "num_speculative_tokens": job["gamma"]}
        spec.update(job.get("spec_extra", {}))
        kwargs["speculative_config"] = spec
    t0 = time.time()
    llm = LLM(**kwargs)
    startup = time.time() - t0
    results = []
    t1 = time.time()
    for batch in job["batches"]:  # successive generate() calls (prefix-cache reuse)
        prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p
                   for p in batch["prompts"]]
        params = SamplingParams(**batch["sampling"])
        for o in llm.generate(prompts, params, use_tqdm=False):
            row = {"request_id": o.request_id, "prompt_token_ids": o.prompt_token_ids,
                   "outputs": [c.token_ids and list(c.token_ids) for c in o.outputs]}
            if batch["sampling"].get("logprobs"):  # per position: [[token, logprob], ...]
                row["logprobs"] = [[[[t, lp.logprob] for t, lp in pos.items()]
                                    for pos in (c.logprobs or [])] for c in o.outputs]
            results.append(row)
    elapsed = time.time() - t1
    json.dump({"results": results, "metrics": metrics_summary(llm), "startup_s": startup,
               "generate_s": elapsed,
               "decider_calls": decider_calls[0] if decider_calls else None},
              open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
