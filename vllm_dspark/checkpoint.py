"""DeepSpec-format DSpark checkpoints: build the config, check, load and save weights.

A checkpoint is a directory with ``config.json`` (see ``vllm_dspark.config``)
and ``model.safetensors`` (or shards listed in ``model.safetensors.index.json``).
``embed_tokens.weight`` and ``lm_head.weight`` may be omitted: the drafter then
shares the target's. Checks read only the safetensors headers, so they are
cheap enough to run at engine start-up.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_dspark.config import DSparkConfig, DSparkConfigError
from vllm_dspark.model.drafter import DSparkDrafter

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Tensors some DeepSpec/vLLM checkpoints carry that the drafter does not use.
IGNORED_TENSORS = ("mask_embedding", "t2d")


def build_draft_config(
    target_config: dict[str, Any],
    *,
    num_hidden_layers: int,
    target_layer_ids: list[int],
    block_size: int,
    mask_token_id: int,
    markov_rank: int,
    markov_head_type: str = "vanilla",
    enable_confidence_head: bool = True,
    confidence_head_with_markov: bool = True,
    intermediate_size: int | None = None,
) -> dict[str, Any]:
    """A draft config.json for a Qwen3- or Llama-family target (DeepSpec's build_draft_config).

    The draft is always a Qwen3-style stack (q/k norms, non-causal block);
    width, heads and vocabulary come from the target so embeddings can be shared.
    """
    t = copy.deepcopy(target_config)
    heads = int(t["num_attention_heads"])
    rope = t.get("rope_parameters") or {}
    theta = float(t.get("rope_theta", rope.get("rope_theta", 1_000_000.0)))
    cfg = {
        "architectures": ["Qwen3DSparkModel"],
        "model_type": "qwen3",
        "hidden_size": t["hidden_size"],
        "intermediate_size": intermediate_size or t["intermediate_size"],
        "num_attention_heads": heads,
        "num_key_value_heads": t.get("num_key_value_heads", heads),
        "head_dim": t.get("head_dim") or t["hidden_size"] // heads,
        "hidden_act": "silu",
        "vocab_size": t["vocab_size"],
        "max_position_embeddings": t.get("max_position_embeddings", 4096),
        "rms_norm_eps": t.get("rms_norm_eps", 1e-6),
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": t.get("torch_dtype", t.get("dtype", "bfloat16")),
        "bos_token_id": t.get("bos_token_id"),
        "eos_token_id": t.get("eos_token_id"),
        # DSpark keys (DeepSpec names).
        "num_hidden_layers": num_hidden_layers,
        "num_target_layers": t["num_hidden_layers"],
        "layer_types": ["full_attention"] * num_hidden_layers,
        "target_layer_ids": list(target_layer_ids),
        "block_size": block_size,
        "mask_token_id": mask_token_id,
        "num_anchors": 512,
        "markov_rank": markov_rank,
        "markov_head_type": markov_head_type,
        "enable_confidence_head": enable_confidence_head,
        "confidence_head_with_markov": enable_confidence_head and confidence_head_with_markov,
    }
    DSparkConfig.from_dict(cfg)  # fail here, not at serving time
    return cfg


def expected_shapes(cfg: DSparkConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = DSparkDrafter(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _tensor_files(path: str) -> list[str]:
    index = os.path.join(path, INDEX_NAME)
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, WEIGHTS_NAME)
    if os.path.isfile(single):
        return [single]
    raise DSparkConfigError(
        f"no weights in the draft directory {path!r}: expected {WEIGHTS_NAME} or "
        f"{INDEX_NAME}. Save the drafter with vllm_dspark.checkpoint.save_drafter."
    )


def read_shapes(path: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in _tensor_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def check_weights(path: str, cfg: DSparkConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the config implies is present with its shape; nothing unknown."""
    want = expected_shapes(cfg)
    have = {k: v for k, v in read_shapes(path).items()
            if not any(tag in k for tag in IGNORED_TENSORS)}
    missing = [k for k in want if k not in have and k not in DSparkDrafter.SHARED_WITH_TARGET]
    if missing:
        raise DSparkConfigError(
            f"DSpark draft {path!r} lacks weights {missing[:6]}{' ...' if len(missing) > 6 else ''}"
            f" that its config.json implies (markov_head_type={cfg.markov_head_type!r}, "
            f"markov_rank={cfg.markov_rank}, enable_confidence_head="
            f"{cfg.enable_confidence_head}); the checkpoint is incomplete or the config "
            "does not match it."
        )
    wrong = [f"{k}: {have[k]} != expected {want[k]}"
             for k in want if k in have and have[k] != want[k]]
    if wrong:
        raise DSparkConfigError(
            f"DSpark draft {path!r} has misshapen weights ({'; '.join(wrong[:4])}); "
            "config.json and model.safetensors disagree. Re-export the drafter."
        )
    unknown = [k for k in have if k not in want]
    if unknown:
        raise DSparkConfigError(
            f"DSpark draft {path!r} has weights its config.json does not describe "
            f"({unknown[:6]}); check markov_head_type / markov_rank / "
            "enable_confidence_head in config.json."
        )
    return have


def load_drafter(
    path: str,
    *,
    target_embed: torch.Tensor | None = None,
    target_lm_head: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> DSparkDrafter:
    """The plain-torch drafter of a checkpoint; absent embeddings/LM head come from the target."""
    cfg = DSparkConfig.from_dir(path)
    check_weights(path, cfg)
    state = {}
    for file in _tensor_files(path):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                if not any(tag in name for tag in IGNORED_TENSORS):
                    state[name] = f.get_tensor(name)
    for name, shared in zip(DSparkDrafter.SHARED_WITH_TARGET, (target_embed, target_lm_head)):
        if name not in state:
            if shared is None:
                raise DSparkConfigError(
                    f"DSpark draft {path!r} has no {name} and no target tensor was given "
                    "to share; pass the target's embedding / LM head weight."
                )
            state[name] = shared
    model = DSparkDrafter(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(device=device, dtype=dtype)


def save_drafter(model: DSparkDrafter, path: str, config: dict[str, Any]) -> None:
    """config.json + model.safetensors, without the target's embedding / LM head copies."""
    os.makedirs(path, exist_ok=True)
    DSparkConfig.from_dict(config)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if k not in DSparkDrafter.SHARED_WITH_TARGET}
    save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
