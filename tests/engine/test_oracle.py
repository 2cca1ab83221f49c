"""The acceptance path exercised for real, with an oracle drafter (tiny_models.make_oracle_pair).

Random drafts are almost never accepted, so greedy equivalence alone would
pass with a drafter that is never consulted. The oracle drafter proposes
exactly the bigram target's greedy tokens: acceptance must be near full and
the output identical. With a third of its transition table shuffled, accepts
and rejects mix, and the output must still be identical; a tiny KV cache
forces preemption (and recompute of the draft's context) on top.
"""

import pytest
import torch

from conftest import requires_vllm
from harness import acceptance, run_job, tokens
from tiny_models import VOCAB

pytestmark = [requires_vllm, pytest.mark.engine]

GAMMA = 7


def job(target, draft=None, **llm_kwargs):
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(4, VOCAB, (n,), generator=g).tolist()
               for n in (2, 5, 40, 90, 120, 7, 64, 100)]
    out = {"target": target, "skip_tokenizer_init": True, "llm_kwargs": llm_kwargs,
           "batches": [{"prompts": prompts,
                        "sampling": {"max_tokens": 96, "temperature": 0.0, "ignore_eos": True}}]}
    if draft:
        out.update(draft=draft, gamma=GAMMA)
    return out


@pytest.fixture(scope="module")
def bigram_baseline(oracle_pair):
    return run_job(job(oracle_pair[0]))


def test_oracle_drafts_are_accepted(oracle_pair, bigram_baseline):
    target, draft = oracle_pair
    result = run_job(job(target, draft))
    assert tokens(result) == tokens(bigram_baseline)
    drafted, accepted, per_pos = acceptance(result)
    assert drafted > 500
    assert accepted >= 0.95 * drafted, (accepted, drafted)
    assert len(per_pos) == GAMMA and min(per_pos) > 0


def test_corrupted_oracle_mixes_accept_and_reject_and_survives_preemption(
    corrupted_oracle_pair, oracle_pair, bigram_baseline
):
    target, draft = corrupted_oracle_pair
    assert target == oracle_pair[0]  # same bigram target, different drafter
    result = run_job(job(target, draft, num_gpu_blocks_override=6, max_num_seqs=8))
    assert tokens(result) == tokens(bigram_baseline)
    drafted, accepted, per_pos = acceptance(result)
    assert 0.1 * drafted < accepted < 0.9 * drafted, (accepted, drafted)
    # Survival decays along the block: later positions are accepted less often.
    assert per_pos[0] > per_pos[-1]
    assert result["metrics"]["vllm:num_preemptions"] > 0
