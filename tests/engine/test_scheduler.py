"""Confidence-scheduled verification through the engine (VLLM_DSPARK_SCHEDULER).

Each mode must keep greedy output identical to the target's and sampled output
distributed as the target's (the causal early stop of Algorithm 1 / §5.2's stale
budget keep the choice of ℓ independent of the token being verified; the
non-causal counterexample is measured in tests/schedule). vLLM's own counters show
what was verified: num_draft_tokens / num_drafts is the mean ℓ per request per step.
"""

import glob
import json
import os
import random

import pytest
import torch

from conftest import requires_vllm
from harness import acceptance, read_trace, run_job, tokens
from checks import chi_square_p_value
from test_sampled import PROMPT, transitions
from tiny_models import bigram_logits, make_oracle_pair

from vllm_dspark.config import DSparkConfigError

pytestmark = [requires_vllm, pytest.mark.engine]

GAMMA = 4
META = {"model": "tiny", "dtype": "float32", "device_name": "test", "vllm_version": "0.32.0"}


def sps_table(path, k: float) -> str:
    """SPS(B) = 100 / (1 + B/k), eager (time per step linear in B, interpolated).
    With the tiny drafter's confidences (≈ 0.5), k = 16 admits about one draft token
    per request, a flat table (k huge) admits all of them."""
    b = [1, 512]
    json.dump({"format": "vllm-dspark-sps/1", "batch_sizes": b,
               "steps_per_s": [100 / (1 + x / k) for x in b], "meta": META}, open(path, "w"))
    return str(path)


@pytest.fixture(scope="module")
def greedy_baseline(corrupted_oracle_pair):
    target, _ = corrupted_oracle_pair
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(10)] for _ in range(8)]
    sampling = {"temperature": 0.0, "max_tokens": 40, "ignore_eos": True}
    res = run_job({"target": target, "batches": [{"prompts": prompts, "sampling": sampling}]})
    return prompts, sampling, tokens(res)


@pytest.mark.parametrize("mode,k,verified", [
    ("causal", 16.0, "some"), ("async", 16.0, "some"), ("causal", 1e9, "all"),
    ("fixed", 16.0, "all"),
])
def test_greedy_output_is_the_targets(corrupted_oracle_pair, greedy_baseline, tmp_path,
                                      mode, k, verified):
    target, draft = corrupted_oracle_pair
    prompts, sampling, want = greedy_baseline
    env = {"VLLM_DSPARK_SCHEDULER": mode, "VLLM_DSPARK_SPS": sps_table(tmp_path / "s.json", k),
           "VLLM_DSPARK_DRAFT_COST": "0"}
    trace = tmp_path / "trace.jsonl"
    res = run_job({"target": target, "draft": draft, "gamma": GAMMA, "env": env,
                   "trace": str(trace), "batches": [{"prompts": prompts, "sampling": sampling}]})
    assert tokens(res) == want
    # On CPU, Algorithm 1's survival floor stops drafting rows it cannot admit (k = 16:
    # floor R/(16+R) ≈ 0.33 at 8 requests, against confidences ≈ 0.5: a row's second
    # position already falls to it; with fewer requests left the floor is lower, and
    # at 1 request, 1/17, every position may be drafted); the other modes, and a flat
    # curve, draft every position.
    drafted = [len(r["drafts"]) for r in read_trace(str(trace))]
    if mode == "causal" and k == 16.0:
        assert min(drafted) < GAMMA and sum(d < GAMMA for d in drafted) > len(drafted) / 2, \
            sorted(set(drafted))
    else:
        assert set(drafted) == {GAMMA}, drafted
    m = res["metrics"]
    drafts, drafted = m["vllm:spec_decode_num_drafts"], m["vllm:spec_decode_num_draft_tokens"]
    per_request = drafted / drafts
    if verified == "all":
        assert per_request == GAMMA
    else:  # shortened, but not to nothing
        assert 0.5 < per_request < GAMMA - 1, per_request
        _, accepted, _ = acceptance(res)
        assert accepted / drafted > 0.3  # the verified prefixes are the likely ones


@pytest.mark.parametrize("mode", ["causal", "async", "fixed"])
def test_sampled_output_follows_the_target_distribution(models_dir, tmp_path, mode):
    target, draft = make_oracle_pair(models_dir, "qwen3", corrupt_fraction=0.35, scale=4.0)
    env = {"VLLM_DSPARK_SCHEDULER": mode, "VLLM_DSPARK_DRAFT_COST": "0",
           "VLLM_DSPARK_SPS": sps_table(tmp_path / "s.json", 16.0)}
    n_seq, max_tokens = 1600, 8
    res = run_job({"target": target, "draft": draft, "gamma": GAMMA, "env": env,
                   "skip_tokenizer_init": True, "max_num_seqs": 64,
                   "spec_extra": {"draft_sample_method": "probabilistic"},
                   "batches": [{"prompts": [PROMPT] * (n_seq // 16),
                                "sampling": {"max_tokens": max_tokens, "temperature": 1.0,
                                             "n": 16, "ignore_eos": True}}]})
    m = res["metrics"]
    drafted, drafts = m["vllm:spec_decode_num_draft_tokens"], m["vllm:spec_decode_num_drafts"]
    assert (drafted == GAMMA * drafts) if mode == "fixed" else (drafted < GAMMA * drafts)
    pairs = transitions(res)
    assert len(pairs) == n_seq * max_tokens
    p = chi_square_p_value(pairs, torch.softmax(bigram_logits(target), -1))
    assert p > 1e-3, p


def test_sampling_stays_lossless_when_the_gate_skips_drafting(models_dir, tmp_path):
    """With the draft gate (VLLM_DSPARK_DRAFT_COST=measure) and a drafter that is never
    right, most steps verify nothing and run vLLM's plain sampler
    (patches.sample_plainly_without_drafts); the drafted ones reject and resample from
    the residual. Both must leave the tokens distributed as the target's."""
    target, draft = make_oracle_pair(models_dir, "qwen3", corrupt_fraction=1.0, scale=4.0)
    trace = tmp_path / "trace.jsonl"
    env = {"VLLM_DSPARK_SCHEDULER": "causal", "VLLM_DSPARK_DRAFT_COST": "measure",
           "VLLM_DSPARK_SPS": sps_table(tmp_path / "s.json", 1e9)}
    n_seq, max_tokens = 1600, 8
    res = run_job({"target": target, "draft": draft, "gamma": GAMMA, "env": env,
                   "trace": str(trace), "skip_tokenizer_init": True, "max_num_seqs": 64,
                   "spec_extra": {"draft_sample_method": "probabilistic"},
                   "batches": [{"prompts": [PROMPT] * (n_seq // 16),
                                "sampling": {"max_tokens": max_tokens, "temperature": 1.0,
                                             "n": 16, "ignore_eos": True}}]})
    decode_steps = res["metrics"]["vllm:spec_decode_num_drafts"]  # per request, all of them
    drafted_blocks = len(read_trace(str(trace)))
    assert 0 < drafted_blocks < 0.8 * decode_steps, (drafted_blocks, decode_steps)
    pairs = transitions(res)
    assert len(pairs) == n_seq * max_tokens
    p = chi_square_p_value(pairs, torch.softmax(bigram_logits(target), -1))
    assert p > 1e-3, p


def test_profile_mode_measures_and_caches_sps(corrupted_oracle_pair, greedy_baseline,
                                              tmp_path):
    target, draft = corrupted_oracle_pair
    prompts, sampling, want = greedy_baseline
    env = {"VLLM_DSPARK_SCHEDULER": "causal", "VLLM_DSPARK_SPS": "profile",
           "VLLM_DSPARK_CACHE": str(tmp_path)}
    res = run_job({"target": target, "draft": draft, "gamma": GAMMA, "env": env,
                   "batches": [{"prompts": prompts, "sampling": sampling}]})
    assert tokens(res) == want
    files = glob.glob(os.path.join(tmp_path, "sps", "*.json"))
    assert len(files) == 1
    from vllm_dspark.schedule.sps import SPSTable

    table = SPSTable.load(files[0])
    assert table.model == target and len(table.b) >= 2 and min(table.sps) > 0


def test_gate_skips_drafting_that_cannot_pay_and_metrics_count_every_step(
        models_dir, greedy_baseline, tmp_path):
    """A drafter that is never right (every bigram row shuffled) only costs time. With
    VLLM_DSPARK_DRAFT_COST=measure the gate times steps after drafted and after skipped
    steps, alternates until it has 3 of each, then skips, drafting again only to check
    (every 8, 16, ... steps). Output stays the target's; vLLM's num_drafts counts every
    decode step of every request, drafted or not (patches.count_unverified_...)."""
    target, draft = make_oracle_pair(models_dir, "qwen3", corrupt_fraction=1.0)
    prompts, sampling, want = greedy_baseline
    trace = tmp_path / "trace.jsonl"
    env = {"VLLM_DSPARK_SCHEDULER": "causal", "VLLM_DSPARK_DRAFT_COST": "measure",
           "VLLM_DSPARK_SPS": sps_table(tmp_path / "s.json", 1e9)}
    res = run_job({"target": target, "draft": draft, "gamma": GAMMA, "env": env,
                   "trace": str(trace), "batches": [{"prompts": prompts, "sampling": sampling}]})
    assert tokens(res) == want
    m = res["metrics"]
    drafts = m["vllm:spec_decode_num_drafts"]
    drafted_tokens, accepted, _ = acceptance(res)
    assert accepted <= 0.05 * drafted_tokens  # the drafter is useless
    # Each request emits 1 token at prefill, then 1 + accepted per decode step; accepted
    # tokens past max_tokens are counted but cut, so the steps lie between these bounds.
    # (vLLM alone would count only the drafted steps.)
    most = len(prompts) * (sampling["max_tokens"] - 1)
    assert most - accepted <= drafts <= most, (drafts, most, accepted)
    steps = drafts / len(prompts)  # decode steps (all requests run in lockstep here)
    drafted_steps = len(read_trace(str(trace))) / len(prompts)
    assert 3 <= drafted_steps <= 0.4 * steps, (drafted_steps, steps)


def test_zero_drafting_cost_drafts_every_step(corrupted_oracle_pair, greedy_baseline, tmp_path):
    target, draft = corrupted_oracle_pair
    prompts, sampling, want = greedy_baseline
    env = {"VLLM_DSPARK_SCHEDULER": "causal", "VLLM_DSPARK_DRAFT_COST": "1e-6",
           "VLLM_DSPARK_SPS": sps_table(tmp_path / "s.json", 1e9)}
    res = run_job({"target": target, "draft": draft, "gamma": GAMMA, "env": env,
                   "batches": [{"prompts": prompts, "sampling": sampling}]})
    assert tokens(res) == want
    m = res["metrics"]  # a flat SPS and (almost) free drafting: every step verifies all γ
    assert m["vllm:spec_decode_num_draft_tokens"] == GAMMA * m["vllm:spec_decode_num_drafts"]


def test_bad_knob_fails_at_engine_startup(corrupted_oracle_pair, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    target, draft = corrupted_oracle_pair
    monkeypatch.setenv("VLLM_DSPARK_SCHEDULER", "sometimes")
    args = EngineArgs(model=target, enforce_eager=True, max_model_len=256,
                      speculative_config={"method": "dspark", "model": draft,
                                          "num_speculative_tokens": GAMMA})
    with pytest.raises(DSparkConfigError, match="sometimes"):
        args.create_engine_config()


def test_profile_cli_writes_a_table(corrupted_oracle_pair, tmp_path):
    import subprocess
    import sys

    from vllm_dspark.schedule.sps import SPSTable

    target, draft = corrupted_oracle_pair
    out = tmp_path / "sps.json"
    proc = subprocess.run([sys.executable, "-m", "vllm_dspark.cli", "profile", "--target",
                           target, "--draft", draft, "--out", str(out), "--enforce-eager",
                           "--gamma", "4",
                           "--max-num-seqs", "8", "--max-model-len", "256"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = SPSTable.load(str(out))
    assert table.b[-1] == 32 and "steps/s" in proc.stdout  # CPU: powers of two ≤ 8·(γ+1)
