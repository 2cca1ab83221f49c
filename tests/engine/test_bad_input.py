"""Bad user input fails at start-up with one clear error (no worker is ever spawned).

The checks run inside ``EngineArgs.create_engine_config`` (our patch), so
``LLM(...)`` and the OpenAI server raise them before any engine process starts.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import requires_vllm
from vllm_dspark.config import DSparkConfigError

pytestmark = [requires_vllm, pytest.mark.engine]


@pytest.fixture
def draft(tmp_path, targets, drafter_factory):
    path = str(tmp_path / "draft")
    shutil.copytree(drafter_factory("qwen3", "vanilla", block_size=7), path)
    return path


def engine_config(target, draft, gamma=3):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=target, enforce_eager=True, max_model_len=256,
                      speculative_config={"method": "dspark", "model": draft,
                                          "num_speculative_tokens": gamma})
    return args.create_engine_config()


def edit_config(path, **changes):
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg.update(changes)
    json.dump(cfg, open(cfg_path, "w"))


def edit_weights(path, fn):
    file = os.path.join(path, "model.safetensors")
    w = load_file(file)
    fn(w)
    save_file(w, file)


def test_valid_draft_builds_a_v1_config(targets, draft):
    cfg = engine_config(targets["qwen3"], draft)
    assert cfg.speculative_config.method == "dspark"
    assert cfg.speculative_config.draft_model_config.architectures == ["Qwen3DSparkModel"]
    assert not cfg.use_v2_model_runner  # CPU: the V1 runner, which upstream refuses for dspark
    # Our V1 proposer's draft K/V are exact in every full block, so prefix-cache hits
    # keep their last block (patches.keep_the_last_prefix_block).
    assert not cfg.speculative_config.use_eagle_block_drop()


@pytest.mark.parametrize("edit, message", [
    (lambda d: edit_config(d, vocab_size=512),
     "draft vocab_size 512 != target vocab_size 384"),
    (lambda d: edit_config(d, target_layer_ids=[-1, 1, 9]), r"outside \[-1, 3\]"),
    (lambda d: edit_config(d, target_layer_ids=[2, 1, 3]), "strictly increasing"),
    (lambda d: edit_config(d, markov_head_type="lstm"), "unknown markov_head_type 'lstm'"),
    (lambda d: edit_config(d, architectures=["Qwen3ForCausalLM"]), "is not a DSpark draft"),
    (lambda d: edit_weights(d, lambda w: w.pop("markov_head.markov_w1.weight")),
     "lacks weights"),
    (lambda d: edit_weights(d, lambda w: w.update({"fc.weight": torch.zeros(64, 64)})),
     "misshapen weights"),
    (lambda d: os.remove(os.path.join(d, "model.safetensors")), "no weights in the draft"),
], ids=["vocab", "layer-range", "layer-order", "head-type", "not-dspark", "missing-weight",
        "misshapen-weight", "no-weights"])
def test_bad_checkpoint_fails_at_startup(targets, draft, edit, message):
    edit(draft)
    with pytest.raises(DSparkConfigError, match=message):
        engine_config(targets["qwen3"], draft)


def test_gamma_below_one_fails(targets, draft):
    with pytest.raises(DSparkConfigError, match=r"must be >= 1"):
        engine_config(targets["qwen3"], draft, gamma=0)


def test_missing_draft_directory_fails(targets, tmp_path):
    with pytest.raises(DSparkConfigError, match="is not a local directory"):
        engine_config(targets["qwen3"], str(tmp_path / "nope"))


def test_llm_surfaces_the_error(targets, draft):
    """The same error reaches a user of LLM(...), before any engine process."""
    from vllm import LLM

    edit_config(draft, vocab_size=512)
    with pytest.raises(DSparkConfigError, match="vocab_size 512"):
        LLM(targets["qwen3"], enforce_eager=True, max_model_len=256,
            speculative_config={"method": "dspark", "model": draft,
                                "num_speculative_tokens": 3})
