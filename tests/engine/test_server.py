"""The OpenAI-compatible server with dspark: concurrent chat/completion, streaming, abort.

Two servers on 127.0.0.1 (one with dspark, one without) get the same 16
concurrent greedy requests (chat and completion, streaming and not); one more
streaming request is aborted mid-stream. Texts must be identical, the aborted
request must be cleaned up, and both servers are stopped by their PID.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import requires_vllm

pytestmark = [requires_vllm, pytest.mark.engine]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, target, log_path, spec=None, args=None, env=None):
        """``args`` replace the defaults (``--enforce-eager`` and 16 sequences) and ``env``
        adds to the environment (GPU tests run with CUDA graphs)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", target,
               "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", "512", "--dtype", "float32", "--served-model-name", "tiny"]
        cmd += ["--enforce-eager", "--max-num-seqs", "16"] if args is None else args
        if spec:
            cmd += ["--speculative-config", json.dumps(spec)]
        # Full-γ verification: "drafting really happened" must not hinge on a
        # machine-timed SPS profile (the default causal scheduler may verify none).
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_DSPARK_SCHEDULER": "fixed",
               **(env or {})}
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {open(self.log.name).read()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(open(self.log.name).read()[-4000:])

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


PROMPTS = [
    "The quick brown fox", "def add(a, b):", "Once upon a time", "Question: what is 12 times 7?",
    "Lorem ipsum dolor", "Speculative decoding drafts", "print(add(2, 3))", "a small model",
]


def request(url, kind, prompt, stream, **fields):
    """One chat or completion request's text; ``fields`` add to or replace the body's."""
    body = {"model": "tiny", "max_tokens": 32, "temperature": 0.0, "stream": stream, **fields}
    if kind == "chat":
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/v1/completions", prompt
    if not stream:
        r = httpx.post(url + path, json=body, timeout=300)
        r.raise_for_status()
        choice = r.json()["choices"][0]
        return choice["message"]["content"] if kind == "chat" else choice["text"]
    text = []
    with httpx.stream("POST", url + path, json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            text.append((choice.get("delta") or {}).get("content") or "" if kind == "chat"
                        else choice.get("text", ""))
    return "".join(text)


def abort_mid_stream(url):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400,
            "temperature": 0.0, "stream": True, "ignore_eos": True}
    chunks = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        for line in r.iter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 3:
                break  # closing the stream aborts the request
    return chunks


def run_load(url):
    # 16 requests: every prompt as chat and as completion, alternating streaming.
    jobs = [(kind, p, (i + k) % 2 == 1) for i, p in enumerate(PROMPTS)
            for k, kind in enumerate(("chat", "completion"))]
    assert len(jobs) == 16 and {j[2] for j in jobs} == {False, True}
    with ThreadPoolExecutor(17) as pool:
        aborted = pool.submit(abort_mid_stream, url)
        texts = list(pool.map(lambda j: request(url, *j), jobs))
    assert aborted.result() >= 3
    return texts


def metric(url, name):
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_server_matches_no_spec_server(targets, drafter_factory, tmp_path):
    draft = drafter_factory("qwen3", "gated", block_size=7)
    spec = {"method": "dspark", "model": draft, "num_speculative_tokens": 3}
    servers = [Server(targets["qwen3"], str(tmp_path / "dspark.log"), spec),
               Server(targets["qwen3"], str(tmp_path / "plain.log"))]
    try:
        for s in servers:
            s.wait_ready()
        with_spec, without = run_load(servers[0].url), run_load(servers[1].url)
        assert with_spec == without
        assert sum(len(t) for t in with_spec) > 0
        # The aborted request is gone and drafting really happened.
        deadline = time.time() + 30
        while metric(servers[0].url, "vllm:num_requests_running") and time.time() < deadline:
            time.sleep(0.5)
        assert metric(servers[0].url, "vllm:num_requests_running") == 0
        assert metric(servers[0].url, "vllm:spec_decode_num_draft_tokens_total") > 0
        assert request(servers[0].url, "completion", "after the abort", False) == request(
            servers[1].url, "completion", "after the abort", False)
    finally:
        for s in servers:
            s.stop()
    assert all(s.proc.returncode is not None for s in servers)
