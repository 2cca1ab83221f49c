"""The plugin's Prometheus metrics end to end (vllm_dspark/engine/metrics.py): through
LLM.get_metrics() (generate_job) and scraped from a running server's /metrics.

Both run Algorithm 1 with the measured draft gate on CPU (SPS from a table, so the
lengths do not hinge on this machine's timing) and check the metrics against each
other and against vLLM's own counters. The aggregation alone: test_metrics_unit.py."""

import json
import os
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import requires_vllm
from harness import run_job
from test_scheduler import sps_table
from test_server import PROMPTS, Server, free_port, request

from vllm_dspark.engine import metrics as M

pytestmark = [requires_vllm, pytest.mark.engine]

GAMMA = 4


def env_for(tmp_path) -> dict:
    # k = 16: Algorithm 1 admits about one of the tiny drafter's tokens per request.
    return {"VLLM_DSPARK_SCHEDULER": "causal", "VLLM_DSPARK_DRAFT_COST": "measure",
            "VLLM_DSPARK_SPS": sps_table(tmp_path / "sps.json", 16.0)}


def check(m: dict, exact: bool) -> None:
    """The invariants, on {name or "name{label=value}": value or histogram dict}.
    ``exact``: no request was aborted, so every admitted draft was verified."""
    v = m[M.VERIFIED]
    n_steps = v["count"]  # request steps that decoded with an admitted draft
    assert n_steps > 0
    buckets = [v["buckets"][f"{k:.1f}"] for k in range(GAMMA + 1)]
    assert buckets[-1] == v["buckets"]["+Inf"] == n_steps  # every ℓ_r ≤ γ
    assert 0 < v["sum"] < GAMMA * n_steps  # shortened, not to nothing
    assert buckets[0] < n_steps
    # Every drafting round is one engine step that ran the model (vLLM observes its
    # iteration tokens once per such step here: short prompts, no chunked prefill).
    drafted, skipped = (m[f"{M.GATE}{{decision={d}}}"] for d in ("drafted", "skipped"))
    assert drafted >= 1 and skipped >= 0
    assert drafted + skipped == m["vllm:iteration_tokens_total"]["count"]
    # Algorithm 1 decided in every round (the gate's alone when it skipped).
    d = m[M.DECISION]
    assert d["count"] == drafted + skipped
    assert 0 < d["sum"] / d["count"] < 0.05, d
    # Per position: how many requests verified k (non-increasing), how many accepted it.
    verified = [m[f"{M.VERIFIED_PER_POS}{{position={k}}}"] for k in range(GAMMA)]
    accepted = [m[f"{M.ACCEPTED_PER_POS}{{position={k}}}"] for k in range(GAMMA)]
    assert verified[0] > 0 and all(a >= b for a, b in zip(verified, verified[1:])), verified
    assert all(0 <= a <= n for a, n in zip(accepted, verified)), (accepted, verified)
    assert sum(accepted) > 0
    for k in range(GAMMA):
        rate = m.get(f"{M.ACCEPTANCE_PER_POS}{{position={k}}}")
        if verified[k]:
            assert 0.0 <= rate <= 1.0 and rate == pytest.approx(accepted[k] / verified[k])
        else:
            assert rate is None
    # Against vLLM's counters (num_drafts counts every request decode step, with the
    # zero-length ones: patches.count_unverified_decode_steps).
    assert accepted == list(m["vllm:spec_decode_num_accepted_tokens_per_pos"])
    assert sum(verified) == m["vllm:spec_decode_num_draft_tokens"]
    if exact:  # what the scheduler admitted is what vLLM verified
        assert n_steps == m["vllm:spec_decode_num_drafts"]
        assert v["sum"] == m["vllm:spec_decode_num_draft_tokens"]
        # Requests that verified position k = those admitted more than k tokens.
        assert verified == [n_steps - b for b in buckets[:GAMMA]]
    else:
        assert n_steps >= m["vllm:spec_decode_num_drafts"]
        assert v["sum"] >= m["vllm:spec_decode_num_draft_tokens"]


def test_llm_get_metrics_has_the_plugins_metrics(corrupted_oracle_pair, tmp_path):
    target, draft = corrupted_oracle_pair
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(10)] for _ in range(8)]
    res = run_job({"target": target, "draft": draft, "gamma": GAMMA, "env": env_for(tmp_path),
                   "batches": [{"prompts": prompts[:5], "sampling": {
                       "temperature": 0.0, "max_tokens": 24, "ignore_eos": True}},
                               {"prompts": prompts[5:], "sampling": {
                                   "temperature": 0.0, "max_tokens": 40, "ignore_eos": True}}]})
    check(res["metrics"], exact=True)


def scrape(url: str) -> dict:
    """/metrics as {name or "name{label=value}": value or histogram dict}, the plugin's own
    label (decision, position) kept, model_name and engine dropped; the same keys as
    generate_job's summary of LLM.get_metrics()."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in family.samples:
            own = {k: v for k, v in s.labels.items() if k not in ("model_name", "engine")}
            if family.type == "histogram":
                h = out.setdefault(family.name, {"buckets": {}})
                if s.name.endswith("_bucket"):
                    h["buckets"][own["le"]] = s.value
                else:
                    h[s.name[len(family.name) + 1:]] = s.value
                continue
            if s.name.endswith("_created"):
                continue
            label = ",".join(f"{k}={v}" for k, v in own.items())
            out[family.name + ("{" + label + "}" if label else "")] = s.value
    # vLLM's per-position counter as the vector LLM.get_metrics() makes of it.
    pos = "vllm:spec_decode_num_accepted_tokens_per_pos"
    out[pos] = [out.get(f"{pos}{{position={k}}}", 0) for k in range(GAMMA)]
    for name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens"):
        out[name] = out.get(name)
    return out


class MetricsServer(Server):
    """test_server's Server with the plugin's knobs set (its own env pins ``fixed``)."""

    def __init__(self, target, log_path, spec, env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target,
               "--host", "127.0.0.1", "--port", str(self.port), "--enforce-eager",
               "--max-model-len", "512", "--dtype", "float32", "--served-model-name", "tiny",
               "--max-num-seqs", "8", "--speculative-config", json.dumps(spec)]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", **env},
                                     start_new_session=True)


def test_server_metrics_endpoint_has_the_plugins_metrics(corrupted_oracle_pair, tmp_path):
    target, draft = corrupted_oracle_pair
    spec = {"method": "dspark", "model": draft, "num_speculative_tokens": GAMMA}
    server = MetricsServer(target, str(tmp_path / "server.log"), spec, env_for(tmp_path))
    try:
        server.wait_ready()
        jobs = [(kind, p, i % 2 == 0) for i, p in enumerate(PROMPTS)
                for kind in ("chat", "completion")]
        with ThreadPoolExecutor(8) as pool:
            texts = list(pool.map(lambda j: request(server.url, *j), jobs))
        assert sum(len(t) for t in texts) > 0
        deadline = time.time() + 30  # the last step's stats reach the frontend
        while time.time() < deadline:
            m = scrape(server.url)
            if m.get("vllm:num_requests_running") == 0 and M.VERIFIED in m:
                break
            time.sleep(0.5)
        for name in M.NAMES:
            assert any(k == name or k.startswith(name + "{") for k in m), name
        check(m, exact=False)
    finally:
        server.stop()
    assert server.proc.returncode is not None
