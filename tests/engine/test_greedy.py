"""Greedy equivalence on real vLLM (CPU backend in CI), and engine drafts == reference drafts.

For Qwen3 and Llama targets and γ ∈ {1, 3, 7}, with every Markov head type:
the output with dspark is token-identical to the output without it, over a batch
of mixed-length prompts (chunked prefill: at most 64 batched tokens per step),
including a second batch that hits the prefix cache in every full block of the shared
prefix (engine/patches.py keeps the last one, which vLLM drops for EAGLE). Every block the engine
drafted (traced) equals what the plain-torch drafter drafts from HF target
states for the same context, so the vLLM backbone, context KV bookkeeping and
the sequential heads are checked against the reference at once.
"""

import os

import pytest
import torch

from conftest import requires_vllm
from harness import read_trace, run_job, tokens
from tiny_models import VOCAB

pytestmark = [requires_vllm, pytest.mark.engine]

LENGTHS = [1, 3, 17, 40, 77, 130, 300, 9]
PREFIX = 290
BLOCK = 32  # KV block size: the shared prefix spans 9 full blocks


def prompts():
    g = torch.Generator().manual_seed(7)
    first = [torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]
    # Second call: share the 300-token prompt's first 290 tokens (prefix-cache hits).
    shared = first[6][:PREFIX]
    second = [shared + torch.randint(4, VOCAB, (n,), generator=g).tolist() for n in (5, 30)]
    return first, second


def job(target, draft=None, gamma=None, trace=None, env=None):
    first, second = prompts()
    sampling = {"max_tokens": 24, "temperature": 0.0, "ignore_eos": True}
    out = {"target": target, "skip_tokenizer_init": True,
           "llm_kwargs": {"max_num_batched_tokens": 64, "enable_chunked_prefill": True,
                          "block_size": BLOCK},
           "batches": [{"prompts": first, "sampling": sampling},
                       {"prompts": second, "sampling": sampling}]}
    if draft:
        out.update(draft=draft, gamma=gamma, trace=trace, env=env or {})
    return out


@pytest.fixture(scope="module")
def baselines(targets):
    return {fam: run_job(job(path)) for fam, path in targets.items()}


CASES = [
    ("qwen3", 1, "vanilla"), ("qwen3", 3, "gated"), ("qwen3", 7, "rnn"),
    ("llama", 1, "rnn"), ("llama", 3, "vanilla"), ("llama", 7, "gated"),
]


@torch.no_grad()
def reference_drafts(target_path, draft_path, records, sequences):
    """Drafts of the plain-torch drafter for each traced block (greedy)."""
    from transformers import AutoModelForCausalLM

    from vllm_dspark.checkpoint import load_drafter
    from vllm_dspark.decode.draft import sample_block

    target = AutoModelForCausalLM.from_pretrained(target_path, dtype=torch.float32)
    drafter = load_drafter(draft_path, target_embed=target.model.embed_tokens.weight,
                           target_lm_head=target.lm_head.weight)
    ids = drafter.cfg.target_layer_ids
    feats = {}
    for key, seq in sequences.items():
        hs = target(input_ids=torch.tensor([seq]), output_hidden_states=True).hidden_states
        feats[key] = torch.cat([hs[i + 1] for i in ids], dim=-1)[0]
    out = []
    for r in records:
        # The backbone drafts all γ positions; the engine may project only the first
        # len(drafts) of them (draft_width), which the sequential stage makes a prefix.
        p, width = r["anchor_pos"], len(r["drafts"])
        states = drafter.draft_block_states(feats[r["key"]][None, :p],
                                            torch.tensor([r["anchor"]]), r["gamma"])
        block = sample_block(drafter.base_logits(states), states, torch.tensor([r["anchor"]]),
                             None, drafter.markov_head, drafter.confidence_head)
        out.append((block.tokens[0, :width].tolist(), block.confidence[0, :width].tolist()))
    return out


def check_against_reference(target, draft, result, trace):
    """Every traced block whose anchor became output equals the reference drafter's."""
    sequences = {r["request_id"]: r["prompt_token_ids"] + r["outputs"][0]
                 for r in result["results"]}
    records = []
    for rec in read_trace(trace):
        key = rec["req"].split("-")[0]
        seq = sequences.get(key)
        if seq is not None and rec["anchor_pos"] < len(seq) and seq[rec["anchor_pos"]] == \
                rec["anchor"]:
            records.append(dict(rec, key=key))
    assert len(records) >= 40, len(records)
    ref = reference_drafts(target, draft, records, sequences)
    same = [r["drafts"] == d for r, (d, _) in zip(records, ref)]
    assert sum(same) >= 0.97 * len(same), f"{sum(same)}/{len(same)} blocks match"
    for r, (_, conf), ok in zip(records, ref, same):
        if ok:
            torch.testing.assert_close(torch.tensor(r["confidence"]), torch.tensor(conf),
                                       atol=2e-3, rtol=0)
    return records


@pytest.mark.parametrize("family,gamma,head", CASES, ids=[f"{f}-g{g}-{h}" for f, g, h in CASES])
def test_greedy_equivalence_and_reference_drafts(
    family, gamma, head, targets, drafter_factory, baselines, tmp_path
):
    draft = drafter_factory(family, head, block_size=7)
    trace = str(tmp_path / "trace.jsonl")
    result = run_job(job(targets[family], draft, gamma, trace))
    assert tokens(result) == tokens(baselines[family])
    assert result["metrics"]["vllm:spec_decode_num_draft_tokens"] > 0
    # Both second-batch prompts reuse every full block of the shared prefix, the last
    # one included; with vLLM's EAGLE block drop this would be 2 × 256.
    assert result["metrics"]["vllm:prefix_cache_hits"] == 2 * (PREFIX // BLOCK) * BLOCK

    # Engine drafts vs the reference drafter, for blocks whose anchor became output.
    check_against_reference(targets[family], draft, result, trace)


def test_drafts_after_skipped_steps_match_the_reference(targets, drafter_factory, baselines,
                                                        tmp_path):
    """Under the draft gate, skipped steps only queue their context K/V (proposer
    _store_context); the next drafted step writes the queue first. The drafts that
    follow skipped steps, across chunked prefill and prefix hits, must still be the
    reference drafter's."""
    draft = drafter_factory("qwen3", "gated", block_size=7)
    from test_scheduler import sps_table

    env = {"VLLM_DSPARK_SCHEDULER": "causal", "VLLM_DSPARK_DRAFT_COST": "measure",
           "VLLM_DSPARK_SPS": sps_table(tmp_path / "sps.json", 1e9)}  # flat: verify all
    trace = str(tmp_path / "trace.jsonl")
    result = run_job(job(targets["qwen3"], draft, 3, trace, env))
    assert tokens(result) == tokens(baselines["qwen3"])
    records = check_against_reference(targets["qwen3"], draft, result, trace)
    # The gate skipped steps in between: fewer drafted blocks than decode steps.
    decode_steps = result["metrics"]["vllm:spec_decode_num_drafts"]
    assert len(read_trace(trace)) < 0.9 * decode_steps, (len(records), decode_steps)


def test_engine_reports_the_paper_head_types(drafter_factory):
    # The drafters used above really carry the head weights they claim.
    from safetensors import safe_open

    for head, tensor in (("gated", "markov_head.gate_proj.weight"),
                         ("rnn", "markov_head.joint_proj.weight")):
        path = drafter_factory("qwen3", head, block_size=7)
        with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
            assert tensor in f.keys()
