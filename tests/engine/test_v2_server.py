"""A served OpenAI endpoint on the V2 runner (GPU only): load, aborts, mixed sampling.

Two servers with CUDA graphs on one GPU (the plugin's V2 speculator, and no
speculation) get the same 64 concurrent requests: chat and completion, streaming and
not, half greedy and half sampled (T = 1, seeded); 16 more streaming requests are
aborted after a few chunks, at random points. Greedy texts must be identical across
the servers, every request must finish or be aborted, and the KV cache must be back to
empty (vLLM's ``kv_cache_usage_perc`` = 0: every block the requests held, aborted ones
included, returned).
"""

import random
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import requires_vllm
from test_server import PROMPTS, Server, metric, request

pytestmark = [requires_vllm, pytest.mark.engine, pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_ARGS = ["--max-num-seqs", "64", "--gpu-memory-utilization", "0.3",
            "--kv-cache-memory-bytes", str(1 << 30)]
V2 = {"VLLM_USE_V2_MODEL_RUNNER": "1"}


def _request(url, i, greedy):
    """Request i: chat or completion, streaming or not, greedy or sampled (seeded)."""
    return request(url, ("chat", "completion")[i % 2], f"{PROMPTS[i % len(PROMPTS)]} #{i}",
                   i % 4 < 2, max_tokens=48, temperature=0.0 if greedy else 1.0, seed=i)


def _abort(url, i, after_chunks):
    body = {"model": "tiny", "prompt": f"{PROMPTS[i % len(PROMPTS)]} abort {i}",
            "max_tokens": 400, "temperature": float(i % 2), "stream": True, "ignore_eos": True}
    n = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            n += line.startswith("data: ")
            if n >= after_chunks:
                break  # closing the stream aborts the request
    return n


def _load(url, seed=0):
    rng = random.Random(seed)
    greedy = [i % 2 == 0 for i in range(64)]
    with ThreadPoolExecutor(80) as pool:
        aborts = [pool.submit(_abort, url, i, rng.randrange(2, 30)) for i in range(16)]
        texts = list(pool.map(lambda i: _request(url, i, greedy[i]), range(64)))
    assert all(a.result() >= 2 for a in aborts)
    return [t for t, g in zip(texts, greedy) if g], [t for t, g in zip(texts, greedy) if not g]


def _drained(url, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (metric(url, "vllm:num_requests_running") == 0
                and metric(url, "vllm:num_requests_waiting") == 0
                and metric(url, "vllm:kv_cache_usage_perc") == 0):
            return True
        time.sleep(0.5)
    return False


def test_v2_server_under_load_with_aborts(targets, drafter_factory, tmp_path):
    draft = drafter_factory("qwen3", "rnn", block_size=7)
    spec = {"method": "dspark", "model": draft, "num_speculative_tokens": 7,
            "draft_sample_method": "probabilistic"}
    servers = [Server(targets["qwen3"], str(tmp_path / "dspark.log"), spec, GPU_ARGS, V2),
               Server(targets["qwen3"], str(tmp_path / "plain.log"), None, GPU_ARGS, V2)]
    try:
        for s in servers:
            s.wait_ready(600)
        assert metric(servers[0].url, "vllm:kv_cache_usage_perc") == 0
        (greedy_spec, sampled), (greedy_plain, _) = _load(servers[0].url), _load(servers[1].url)
        assert greedy_spec == greedy_plain
        assert all(sampled) and len(sampled) == 32
        for s in servers:
            assert _drained(s.url), "requests or KV blocks left after the load"
        assert metric(servers[0].url, "vllm:spec_decode_num_draft_tokens_total") > 0
    finally:
        for s in servers:
            s.stop()
