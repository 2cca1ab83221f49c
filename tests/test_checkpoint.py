"""Checkpoint round trip and the start-up errors for bad checkpoints (no engine needed)."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tiny_models import make_drafter, make_target
from vllm_dspark.checkpoint import check_weights, load_drafter
from vllm_dspark.config import DSparkConfig, DSparkConfigError


@pytest.fixture
def pair(tmp_path):
    target = make_target(str(tmp_path / "target"), "llama")
    draft = str(tmp_path / "draft")
    drafter = make_drafter(target, draft, head_type="gated", markov_rank=8)
    return target, draft, drafter


def _target_weights(target):
    w = load_file(os.path.join(target, "model.safetensors"))
    return w["model.embed_tokens.weight"], w["lm_head.weight"]


def test_round_trip_shares_target_embedding_and_head(pair):
    target, draft, drafter = pair
    saved = load_file(os.path.join(draft, "model.safetensors"))
    assert "embed_tokens.weight" not in saved and "lm_head.weight" not in saved
    embed, head = _target_weights(target)
    loaded = load_drafter(draft, target_embed=embed, target_lm_head=head)
    for name, value in drafter.state_dict().items():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            continue
        assert torch.equal(loaded.state_dict()[name], value), name
    assert torch.equal(loaded.embed_tokens.weight, embed)
    assert torch.equal(loaded.lm_head.weight, head)
    assert loaded.markov_head.head_type == "gated"
    with pytest.raises(DSparkConfigError, match="no embed_tokens.weight"):
        load_drafter(draft)


def _edit_config(draft, **changes):
    path = os.path.join(draft, "config.json")
    cfg = json.load(open(path))
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    json.dump(cfg, open(path, "w"))


@pytest.mark.parametrize("changes, message", [
    ({"architectures": ["LlamaForCausalLM"]}, "is not a DSpark draft"),
    ({"markov_head_type": "lstm"}, "unknown markov_head_type 'lstm'"),
    ({"target_layer_ids": [2, 1]}, "must be strictly increasing"),
    ({"target_layer_ids": [1, 1]}, "must be strictly increasing"),
    ({"mask_token_id": None}, "lacks the DSpark key"),
    ({"mask_token_id": 10**6}, "mask_token_id 1000000 is outside the vocabulary"),
])
def test_bad_configs_name_the_problem(pair, changes, message):
    _, draft, _ = pair
    _edit_config(draft, **changes)
    with pytest.raises(DSparkConfigError, match=message):
        DSparkConfig.from_dir(draft)


def _edit_weights(draft, fn):
    path = os.path.join(draft, "model.safetensors")
    w = load_file(path)
    fn(w)
    save_file(w, path)


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop("fc.weight"), r"lacks weights \['fc.weight'\]"),
    (lambda w: w.pop("markov_head.gate_proj.weight"), "lacks weights"),
    (lambda w: w.update({"fc.weight": torch.zeros(3, 3)}), "misshapen weights"),
    (lambda w: w.update({"markov_head.joint_proj.weight": torch.zeros(3, 3)}),
     "does not describe"),
])
def test_bad_weights_name_the_problem(pair, edit, message):
    _, draft, _ = pair
    _edit_weights(draft, edit)
    with pytest.raises(DSparkConfigError, match=message):
        check_weights(draft, DSparkConfig.from_dir(draft))


def test_no_weights_or_config(tmp_path):
    with pytest.raises(DSparkConfigError, match="no config.json"):
        DSparkConfig.from_dir(str(tmp_path))


def test_target_mismatch_errors(pair):
    _, draft, _ = pair
    cfg = DSparkConfig.from_dir(draft)
    ok = dict(target_num_layers=4, target_vocab_size=384, target_hidden_size=64,
              num_speculative_tokens=3)
    cfg.check_against_target(**ok)
    for changes, message in [
        ({"target_num_layers": 2}, r"outside \[-1, 1\]"),
        ({"target_vocab_size": 500}, "draft vocab_size 384 != target vocab_size 500"),
        ({"target_hidden_size": 32}, "hidden_size 64 != target hidden_size 32"),
        ({"num_speculative_tokens": 0}, r"must be >= 1"),
    ]:
        with pytest.raises(DSparkConfigError, match=message):
            cfg.check_against_target(**{**ok, **changes})
