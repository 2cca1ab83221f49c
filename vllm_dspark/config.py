"""The DSpark draft configuration: the draft's ``config.json``, read and checked.

Checkpoints follow DeepSpec's format (a Qwen3 decoder config plus DSpark keys,
see README "Checkpoint format"). Every problem raises ``DSparkConfigError``
with one message that names the problem and the fix; the engine calls
``check_against_target`` at start-up, before any worker process exists.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from vllm_dspark.model.markov_head import MARKOV_HEAD_TYPES

DSPARK_ARCHITECTURES = ("Qwen3DSparkModel", "DSparkDraftModel")


class DSparkConfigError(ValueError):
    """A DSpark draft checkpoint, knob or request that cannot work, and how to fix it."""


@dataclass
class DSparkConfig:
    # Backbone (a Qwen3 decoder stack with non-causal attention inside the block).
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    # DSpark.
    target_layer_ids: list[int]  # -1 = target embeddings; i = output of target layer i
    mask_token_id: int
    block_size: int  # γ the drafter was trained with
    markov_rank: int
    markov_head_type: str = "vanilla"
    enable_confidence_head: bool = False
    confidence_head_with_markov: bool = False
    num_target_layers: int | None = None
    # Plugin knob: per-position STS temperatures (issue: confidence scheduling).
    sts_temperatures: list[float] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, cfg: dict[str, Any], *, source: str = "config.json") -> DSparkConfig:
        archs = cfg.get("architectures") or []
        if not any(a in DSPARK_ARCHITECTURES for a in archs):
            raise DSparkConfigError(
                f"{source} is not a DSpark draft: architectures={archs!r}. A DSpark "
                f"draft declares one of {DSPARK_ARCHITECTURES} and the keys "
                "target_layer_ids, mask_token_id, block_size and markov_rank; point "
                "speculative_config['model'] at a DSpark draft directory (for example "
                "one written by `vllm-dspark train`)."
            )
        if "DSparkDraftModel" in archs and cfg.get("model_type") != "qwen3":
            raise DSparkConfigError(
                f"{source}: architecture DSparkDraftModel with model_type "
                f"{cfg.get('model_type')!r} is vLLM's DeepSeek-V4 DSpark, which this plugin "
                "does not serve. Use a Qwen3-style DSpark draft (model_type 'qwen3')."
            )
        missing = [
            k for k in ("target_layer_ids", "mask_token_id", "block_size", "markov_rank",
                        "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "intermediate_size", "vocab_size")
            if k not in cfg
        ]
        if missing:
            raise DSparkConfigError(
                f"{source} lacks the DSpark key(s) {missing}; a DeepSpec-format draft "
                "config must define them (see README, 'Checkpoint format')."
            )
        rank = int(cfg["markov_rank"])
        head_type = str(cfg.get("markov_head_type", "vanilla"))
        if rank < 0:
            raise DSparkConfigError(f"{source}: markov_rank must be >= 0, got {rank}.")
        if rank > 0 and head_type not in MARKOV_HEAD_TYPES:
            raise DSparkConfigError(
                f"{source}: unknown markov_head_type {head_type!r}; set it to one of "
                f"{list(MARKOV_HEAD_TYPES)} (or markov_rank 0 for no sequential head)."
            )
        conf = bool(cfg.get("enable_confidence_head", False))
        with_markov = conf and bool(cfg.get("confidence_head_with_markov", False))
        if with_markov and rank == 0:
            raise DSparkConfigError(
                f"{source}: confidence_head_with_markov needs a Markov head, but "
                "markov_rank is 0; set confidence_head_with_markov to false."
            )
        heads = int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 1_000_000.0))
        sts = cfg.get("dspark_sts_temperatures")
        out = cls(
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            target_layer_ids=[int(i) for i in cfg["target_layer_ids"]],
            mask_token_id=int(cfg["mask_token_id"]),
            block_size=int(cfg["block_size"]),
            markov_rank=rank,
            markov_head_type=head_type,
            enable_confidence_head=conf,
            confidence_head_with_markov=with_markov,
            num_target_layers=cfg.get("num_target_layers"),
            sts_temperatures=list(map(float, sts)) if sts is not None else None,
            raw=dict(cfg),
        )
        out._check_self(source)
        return out

    @classmethod
    def from_dir(cls, path: str) -> DSparkConfig:
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise DSparkConfigError(
                f"no config.json in the draft directory {path!r}; a DSpark draft is a "
                "directory holding config.json and model.safetensors."
            )
        try:
            with open(cfg_path) as f:
                cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise DSparkConfigError(
                f"{cfg_path} is not valid JSON ({e}); fix or rewrite it."
            ) from e
        return cls.from_dict(cfg, source=cfg_path)

    # ------------------------------------------------------------------ checks
    def _check_self(self, source: str) -> None:
        ids = self.target_layer_ids
        if not ids:
            raise DSparkConfigError(f"{source}: target_layer_ids is empty; list >= 1 layer.")
        if any(b <= a for a, b in zip(ids, ids[1:])):
            raise DSparkConfigError(
                f"{source}: target_layer_ids {ids} must be strictly increasing "
                "(sorted, no repeats), as the drafter's fc was trained on them in order."
            )
        if not 0 <= self.mask_token_id < self.vocab_size:
            raise DSparkConfigError(
                f"{source}: mask_token_id {self.mask_token_id} is outside the vocabulary "
                f"[0, {self.vocab_size}); set it to the draft's mask token id."
            )
        if self.block_size < 1:
            raise DSparkConfigError(f"{source}: block_size must be >= 1, got {self.block_size}.")
        if self.sts_temperatures is not None and any(t <= 0 for t in self.sts_temperatures):
            raise DSparkConfigError(
                f"{source}: dspark_sts_temperatures must all be > 0; rerun calibration."
            )

    def check_against_target(
        self,
        *,
        target_num_layers: int,
        target_vocab_size: int,
        target_hidden_size: int,
        num_speculative_tokens: int | None,
        source: str = "the DSpark draft",
    ) -> None:
        """Start-up checks that need the target model's config."""
        bad = [i for i in self.target_layer_ids if not -1 <= i < target_num_layers]
        if bad:
            raise DSparkConfigError(
                f"{source}: target_layer_ids {self.target_layer_ids} has {bad} outside "
                f"[-1, {target_num_layers - 1}] for a target with {target_num_layers} "
                "layers (-1 = embeddings); this draft was trained for another target."
            )
        if self.vocab_size != target_vocab_size:
            raise DSparkConfigError(
                f"{source}: draft vocab_size {self.vocab_size} != target vocab_size "
                f"{target_vocab_size}. A DSpark draft shares the target's tokenizer and "
                "vocabulary; train the draft against this target."
            )
        if self.hidden_size != target_hidden_size:
            raise DSparkConfigError(
                f"{source}: draft hidden_size {self.hidden_size} != target hidden_size "
                f"{target_hidden_size}; the draft shares the target's embedding and LM "
                "head, so both must match. Train the draft against this target."
            )
        if num_speculative_tokens is not None and num_speculative_tokens < 1:
            raise DSparkConfigError(
                f"num_speculative_tokens (γ) must be >= 1 for dspark, got "
                f"{num_speculative_tokens}; omit it to use the draft's block_size "
                f"({self.block_size})."
            )
