"""The verification scheduler inside a served GPU engine (V1 runner): GPU only.

On CUDA each decision is one replay of the CUDA-graphed Triton kernels
(``schedule/triton_prefix.GraphedDecider``) and, without ``enforce_eager``, SPS(B) is
profiled over vLLM's CUDA-graph sizes. The unit tests hold the kernels to the torch
schedulers; this runs them where the engine runs them: greedy output must stay the
target's, the decider must be the one deciding, and drafts must be shortened.
"""

import glob
import os
import random

import pytest
import torch

from conftest import requires_vllm
from harness import run_job, tokens

pytestmark = [requires_vllm, pytest.mark.engine,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GAMMA = 4
# V1 runner (the plugin's proposer), synchronous scheduling (per-request draft lengths)
V1 = {"VLLM_USE_V2_MODEL_RUNNER": "0"}


@pytest.mark.parametrize("eager,sps", [(True, "table"), (False, "profile")])
def test_graphed_decider_in_a_served_gpu_engine(corrupted_oracle_pair, tmp_path, eager, sps):
    """Eager with a steep SPS table: the decider must shorten drafts (a tiny model's
    profiled SPS on a GPU is flat, which admits every draft). With CUDA graphs and a
    profiled SPS: the profile must be the step function over the captured sizes."""
    from test_scheduler import sps_table

    from vllm_dspark.schedule.sps import SPSTable

    target, draft = corrupted_oracle_pair
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(10)] for _ in range(8)]
    batches = [{"prompts": prompts,
                "sampling": {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True}}]
    # Tiny models, a fixed 1 GiB KV cache: the utilization is then only vLLM's start-up
    # check, kept small so the engines start beside other work (see test_v2.GPU).
    llm_kwargs = {"enforce_eager": eager, "async_scheduling": False,
                  "gpu_memory_utilization": 0.12, "kv_cache_memory_bytes": 1 << 30}
    base = run_job({"target": target, "batches": batches, "env": V1, "llm_kwargs": llm_kwargs})
    table = sps_table(tmp_path / "s.json", 16.0) if sps == "table" else "profile"
    env = dict(V1, VLLM_DSPARK_SCHEDULER="causal", VLLM_DSPARK_DRAFT_COST="0",
               VLLM_DSPARK_SPS=table, VLLM_DSPARK_CACHE=str(tmp_path),
               VLLM_ENABLE_V1_MULTIPROCESSING="0")
    res = run_job({"target": target, "draft": draft, "gamma": GAMMA, "env": env,
                   "llm_kwargs": llm_kwargs, "count_decider_calls": True,
                   "batches": batches})
    assert tokens(res) == tokens(base)
    m = res["metrics"]
    drafts, drafted = m["vllm:spec_decode_num_drafts"], m["vllm:spec_decode_num_draft_tokens"]
    assert res["decider_calls"] >= 10, res["decider_calls"]  # one per drafted step
    if sps == "table":
        assert 0.5 < drafted / drafts < GAMMA - 1, drafted / drafts  # shortened, not empty
    else:
        (path,) = glob.glob(os.path.join(tmp_path, "sps", "*.json"))
        profiled = SPSTable.load(path)
        assert profiled.device_name == torch.cuda.get_device_name()
        assert profiled.max_capture_size is not None  # graphs: a step function over sizes


def _greedy_jobs(targets, drafter_factory, tmp_path, env, family="qwen3"):
    """test_greedy's job (chunked prefill, prefix hits) on the GPU: baseline tokens,
    result and trace of the dspark engine."""
    from test_greedy import job

    gpu = {"async_scheduling": False, "gpu_memory_utilization": 0.12,
           "kv_cache_memory_bytes": 1 << 30}
    base = job(targets[family])
    base["env"] = V1
    base["llm_kwargs"].update(gpu)
    draft = drafter_factory(family, "gated", block_size=7)
    trace = str(tmp_path / "trace.jsonl")
    spec = job(targets[family], draft, 3, trace, dict(V1, **env))
    spec["llm_kwargs"].update(gpu)
    return tokens(run_job(base)), run_job(spec), draft, trace


def test_draft_gate_on_cuda_skips_and_keeps_output(targets, drafter_factory, tmp_path):
    """The draft gate on CUDA: skipped steps queue the drafter's context K/V on the GPU
    and take vLLM's plain sampler, drafted steps write the queue first; greedy output
    must stay the target's."""
    from harness import read_trace
    from test_scheduler import sps_table

    env = {"VLLM_DSPARK_SCHEDULER": "causal", "VLLM_DSPARK_DRAFT_COST": "measure",
           "VLLM_DSPARK_SPS": sps_table(tmp_path / "sps.json", 1e9)}  # flat: verify all
    want, result, _, trace = _greedy_jobs(targets, drafter_factory, tmp_path, env)
    assert tokens(result) == want
    drafted, decode_steps = len(read_trace(trace)), result["metrics"]["vllm:spec_decode_num_drafts"]
    assert 20 < drafted < 0.9 * decode_steps, (drafted, decode_steps)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_drafts_on_cuda_match_the_reference(targets, drafter_factory, tmp_path, family):
    """test_greedy's reference check on CUDA. The tiny drafters read the target's
    embeddings (layer id -1), which CUDA's in-place fused add + RMSNorm overwrote until
    engine/patches.copy_the_embedding_state (15-24 % of positions agreed before)."""
    from test_greedy import check_against_reference

    want, result, draft, trace = _greedy_jobs(targets, drafter_factory, tmp_path,
                                              {"VLLM_DSPARK_SCHEDULER": "fixed"}, family)
    assert tokens(result) == want
    check_against_reference(targets[family], draft, result, trace)
