"""The verification knobs and VerificationScheduler (schedule/verification.py): engine-free.

End to end through the engine: tests/engine/test_scheduler.py."""

import pytest
import torch

from vllm_dspark.config import DSparkConfig, DSparkConfigError
from vllm_dspark.schedule.sps import SPSTable
from vllm_dspark.schedule.verification import Settings, VerificationScheduler, read_settings


def _cfg(**kw):
    base = {"architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "hidden_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 1, "intermediate_size": 8,
            "vocab_size": 16, "target_layer_ids": [0], "mask_token_id": 1, "block_size": 4,
            "markov_rank": 2, "enable_confidence_head": True}
    return DSparkConfig.from_dict({**base, **kw})


def test_knobs(tmp_path):
    assert read_settings(_cfg(), {}).mode == "causal"
    assert read_settings(_cfg(enable_confidence_head=False), {}).mode == "fixed"
    assert read_settings(_cfg(), {"VLLM_DSPARK_SCHEDULER": "Async"}).mode == "async"
    with pytest.raises(DSparkConfigError, match="VLLM_DSPARK_SCHEDULER='greedy'.*causal"):
        read_settings(_cfg(), {"VLLM_DSPARK_SCHEDULER": "greedy"})
    with pytest.raises(DSparkConfigError, match="no confidence head"):
        read_settings(_cfg(enable_confidence_head=False), {"VLLM_DSPARK_SCHEDULER": "causal"})
    with pytest.raises(DSparkConfigError, match="no such file"):
        read_settings(_cfg(), {"VLLM_DSPARK_SPS": str(tmp_path / "nope.json")})
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "vllm-dspark-sps/1", "batch_sizes": [4, 2], '
                   '"steps_per_s": [1, 2], "meta": {}}')
    with pytest.raises(DSparkConfigError, match="SPS table"):
        read_settings(_cfg(), {"VLLM_DSPARK_SPS": str(bad)})
    assert read_settings(_cfg(), {}).draft_cost is None  # default: measured, gated
    assert read_settings(_cfg(), {"VLLM_DSPARK_DRAFT_COST": "measure"}).draft_cost is None
    assert read_settings(_cfg(), {"VLLM_DSPARK_DRAFT_COST": "0"}).draft_cost == 0.0
    assert read_settings(_cfg(), {"VLLM_DSPARK_DRAFT_COST": "0.004"}).draft_cost == 0.004
    for bad_cost in ("fast", "-1", "inf", "nan"):
        with pytest.raises(DSparkConfigError, match=f"VLLM_DSPARK_DRAFT_COST='{bad_cost}'"):
            read_settings(_cfg(), {"VLLM_DSPARK_DRAFT_COST": bad_cost})



@pytest.mark.parametrize("text", [
    "{not json",  # unreadable
    '{"format": "vllm-dspark-sps/1", "batch_sizes": [4, 2], "steps_per_s": [1, 2], '
    '"meta": {"model": "m", "dtype": "d", "device_name": "x", "vllm_version": "v"}}',
    '{"format": "vllm-dspark-sps/0"}',
])
def test_a_malformed_user_table_is_not_called_the_cache(tmp_path, text):
    """VLLM_DSPARK_SPS names the user's own file: deleting it (the cache's fix) would only
    give the next error, so the message says to write it again or to profile."""
    bad = tmp_path / "mine.json"
    bad.write_text(text)
    with pytest.raises(DSparkConfigError) as e:
        read_settings(_cfg(), {"VLLM_DSPARK_SPS": str(bad)})
    msg = str(e.value)
    assert str(bad) in msg and "VLLM_DSPARK_SPS" in msg
    assert "delete" not in msg and "re-profile" not in msg
    assert f"vllm-dspark profile --target TARGET --draft DRAFT --out {bad}" in msg
    assert "VLLM_DSPARK_SPS=profile" in msg
    # The engine's own cache keeps its fix: delete it and the engine measures again.
    with pytest.raises(DSparkConfigError, match="delete the file"):
        SPSTable.load(str(bad))

def test_draft_width_follows_the_last_decision():
    """With the measured drafting cost the proposer projects only the block positions
    that could still be verified: one more than the longest prefix verified last step
    (the paper's variant keeps all γ)."""
    steep = SPSTable(b=[1, 512], sps=[100.0, 100 / (1 + 512 / 16)])
    measured = VerificationScheduler(Settings("causal", "t", draft_cost=None), sps=steep)
    paper = VerificationScheduler(Settings("causal", "t", draft_cost=0.0), sps=steep)
    for sched in (measured, paper):
        assert sched.draft_width(7) == 7  # nothing decided yet
        assert sched.lengths(torch.full((8, 7), 0.5)) == [1] * 8
    assert measured.draft_width(7) == 2 and paper.draft_width(7) == 7
    assert measured.lengths(torch.full((8, 2), 0.9)) == [2] * 8  # a 2-wide block
    assert measured.draft_width(7) == 3  # grows back by one per step
    measured.lengths(torch.zeros(8, 3))
    assert measured.draft_width(7) == 1  # nothing verified: still draft one position
