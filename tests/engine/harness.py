"""Helpers shared by the engine tests: run a job in a fresh process, read its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def run_job(job: dict, timeout: int = 600) -> dict:
    # Tests of drafting and verification pin full-γ verification: the default (causal)
    # scheduler shortens drafts by an SPS profile timed on this machine, which would
    # make their acceptance counts depend on load. Scheduler tests set the mode.
    job = dict(job, env={"VLLM_DSPARK_SCHEDULER": "fixed", **job.get("env", {})})
    with tempfile.TemporaryDirectory() as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "out.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "generate_job.py"), job_path, out_path],
            capture_output=True, text=True, timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"engine job failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
        with open(out_path) as f:
            return json.load(f)


def tokens(result: dict) -> list[list[int]]:
    return [r["outputs"][0] for r in result["results"]]


def acceptance(result: dict) -> tuple[int, int, list[int]]:
    """(draft tokens, accepted tokens, accepted per position) from vLLM's spec metrics."""
    m = result["metrics"]
    drafted = int(m.get("vllm:spec_decode_num_draft_tokens", 0) or 0)
    accepted = int(m.get("vllm:spec_decode_num_accepted_tokens", 0) or 0)
    per_pos = [int(x) for x in (m.get("vllm:spec_decode_num_accepted_tokens_per_pos") or [])]
    return drafted, accepted, per_pos


def read_trace(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def divergences(result: dict, reference: dict) -> list[tuple[int, int, float | None]]:
    """Where ``result``'s first outputs leave ``reference``'s: (request, first differing
    position, the reference's top-2 logprob margin there, if it recorded logprobs) — a
    margin near 0 is a near-tie, which another attention kernel's rounding may flip."""
    out = []
    for i, (got, ref) in enumerate(zip(tokens(result), tokens(reference))):
        at = next((k for k, (a, b) in enumerate(zip(got, ref)) if a != b),
                  None if len(got) == len(ref) else min(len(got), len(ref)))
        if at is None:
            continue
        margin = None
        lps = reference["results"][i].get("logprobs")
        if lps and at < len(lps[0]) and len(lps[0][at]) >= 2:
            top = sorted((lp for _, lp in lps[0][at]), reverse=True)
            margin = top[0] - top[1]
        out.append((i, at, margin))
    return out
