"""Sampling through the engine is lossless: generated tokens follow the target's distribution.

The bigram target makes the exact distribution known: the token after ``prev``
is drawn from softmax(L[prev] / T), with L the V x V table computed by HF.
We draw 1600 sequences with dspark (a drafter that is wrong on 35% of its
rows, so both acceptance and residual resampling happen) and run a chi-square
goodness-of-fit test of all observed (prev, next) transitions against that
table: cells with expected count < 5 are pooled per row, and the test passes
when p > 1e-3. The same counts tested against the *drafter's* distribution
must be rejected (p < 1e-6), which shows the test has the power to notice a
sampler that emits draft tokens unchecked.
"""

import pytest
import torch

from checks import chi_square_p_value
from conftest import requires_vllm
from harness import acceptance, run_job
from tiny_models import bigram_logits, make_oracle_pair

pytestmark = [requires_vllm, pytest.mark.engine]

N_SEQ, MAX_TOKENS, PROMPT = 1600, 8, [5, 17, 33]


def transitions(result) -> torch.Tensor:
    pairs = []
    for r in result["results"]:
        for out in r["outputs"]:
            seq = PROMPT[-1:] + out
            pairs += list(zip(seq[:-1], seq[1:]))
    return torch.tensor(pairs)


@pytest.fixture(scope="module")
def sharp_pair(models_dir):
    # Sharper target (LM head x4): fewer, better-filled cells in each row.
    return make_oracle_pair(models_dir, "qwen3", corrupt_fraction=0.35, scale=4.0)


@pytest.mark.parametrize("temperature,draft_sample_method", [
    (1.0, "probabilistic"),  # q = the drafter's softmax, passed to the rejection sampler
    (0.6, "greedy"),  # one-hot q at T > 0
])
def test_sampled_tokens_follow_the_target_distribution(
    sharp_pair, temperature, draft_sample_method
):
    target, draft = sharp_pair
    job = {"target": target, "draft": draft, "gamma": 4, "skip_tokenizer_init": True,
           "max_num_seqs": 64, "spec_extra": {"draft_sample_method": draft_sample_method},
           "batches": [{"prompts": [PROMPT] * (N_SEQ // 16),
                        "sampling": {"max_tokens": MAX_TOKENS, "temperature": temperature,
                                     "n": 16, "ignore_eos": True}}]}
    result = run_job(job)
    drafted, accepted, _ = acceptance(result)
    assert 0.1 * drafted < accepted < 0.95 * drafted, (accepted, drafted)
    pairs = transitions(result)
    assert len(pairs) == N_SEQ * MAX_TOKENS
    table = bigram_logits(target)
    p_target = chi_square_p_value(pairs, torch.softmax(table / temperature, -1))
    assert p_target > 1e-3, p_target

    # Power: the drafter's own transition table is rejected by the same test.
    from safetensors.torch import load_file
    import os

    w2 = load_file(os.path.join(draft, "model.safetensors"))["markov_head.markov_w2.weight"]
    p_draft = chi_square_p_value(pairs, torch.softmax(w2.T.float() / temperature, -1))
    assert p_draft < 1e-6, p_draft
