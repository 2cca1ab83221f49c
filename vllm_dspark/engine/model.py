"""The DSpark draft as a vLLM model: vLLM's DFlash Qwen3 backbone + our heads.

The backbone must be vLLM's (its attention layers own paged draft KV cache
that lives in the target's blocks, which is what keeps the drafter's context
consistent across rejection, preemption and prefix-cache hits). The sequential
and confidence heads are the engine-free modules of ``vllm_dspark.model``, so
all three Markov head types (vanilla, gated, rnn) serve from one code path,
the one training and the tests use.

Registered over upstream's ``Qwen3DSparkModel`` architecture name, which is
what DeepSpec checkpoints declare.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from vllm.model_executor.models.qwen3_dspark import Qwen3DSparkForCausalLM

from vllm_dspark.config import DSparkConfig, DSparkConfigError
from vllm_dspark.model.heads import build_heads

HEAD_PREFIXES = ("markov_head.", "confidence_head.")


class DSparkForCausalLM(Qwen3DSparkForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.dspark = DSparkConfig.from_dict(self.config.to_dict())
        if getattr(self.config, "draft_vocab_size", None) not in (None, self.config.vocab_size):
            raise DSparkConfigError(
                "reduced draft vocabularies (draft_vocab_size < vocab_size, d2t) are not "
                "supported by vllm-dspark yet; train the draft on the full vocabulary."
            )
        cfg = self.dspark
        # Replace upstream's vanilla-only heads with the engine-free modules.
        # Heads run in float32 whatever the model dtype: they are small next to the
        # backbone, and the distribution q handed to the rejection sampler is then
        # computed at full precision.
        markov, conf = build_heads(cfg)
        self.model.markov_head = markov.float() if markov is not None else None
        self.model.confidence_head = conf.float() if conf is not None else None

    target_final_norm = None  # see attach_target_final_norm

    def attach_target_final_norm(self, target_model, num_target_layers: int) -> None:
        """DeepSpec (HF) reads hidden_states[L] of the target's last layer after the final
        norm; vLLM captures it before. Where a draft layer id names that layer, apply the
        target's norm to that slice in ``combine_hidden_states`` (both runners)."""
        if num_target_layers - 1 in self.dspark.target_layer_ids:
            lm = getattr(target_model, "get_language_model", lambda: target_model)()
            # Not a submodule of the draft (nn.Module.__setattr__ would register it).
            object.__setattr__(self, "target_final_norm", lm.model.norm)

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.target_final_norm is not None:
            h = self.dspark.hidden_size
            last = self.target_final_norm(hidden_states[..., -h:].contiguous())
            hidden_states = torch.cat([hidden_states[..., :-h], last], dim=-1)
        return super().combine_hidden_states(hidden_states)

    @property
    def markov_head(self):
        return self.model.markov_head

    @property
    def confidence_head(self):
        return self.model.confidence_head

    # Upstream V2 speculator hooks, kept working for the vanilla head.
    def markov_embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.markov_head.prev_embed(token_ids)

    def markov_bias(self, markov_embed: torch.Tensor) -> torch.Tensor:
        return self.markov_head.markov_w2(markov_embed)

    def compute_confidence(self, head_hidden, markov_embed):
        return torch.sigmoid(self.confidence_head(head_hidden, markov_embed).float())

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]):
        heads: dict[str, torch.Tensor] = {}

        def backbone_weights():
            for name, tensor in weights:
                if name.startswith(HEAD_PREFIXES):
                    heads[name] = tensor
                else:
                    yield name, tensor

        # Upstream drops the confidence head when the checkpoint has none; ours
        # follow the config instead, so load the backbone with a stand-in.
        conf, markov = self.model.confidence_head, self.model.markov_head
        self.model.confidence_head, self.model.markov_head = None, None
        loaded = super().load_weights(backbone_weights())
        self.model.confidence_head, self.model.markov_head = conf, markov
        # Head weights are plain nn.Linear/Embedding tensors: copy them by name.
        # (They bypass vLLM's mapper, which would stack ``*.gate_proj`` into gate_up_proj.)
        own = {f"{p}{k}": v for p, m in (("markov_head.", markov), ("confidence_head.", conf))
               if m is not None for k, v in m.state_dict().items()}
        missing = sorted(set(own) - set(heads))
        unknown = sorted(set(heads) - set(own))
        if missing or unknown:
            raise DSparkConfigError(
                f"DSpark draft head weights do not match config.json: missing {missing}, "
                f"unexpected {unknown}; check markov_head_type / markov_rank / "
                "enable_confidence_head."
            )
        with torch.no_grad():
            for name, tensor in heads.items():
                if own[name].shape != tensor.shape:
                    raise DSparkConfigError(
                        f"DSpark draft weight {name} has shape {tuple(tensor.shape)}, "
                        f"expected {tuple(own[name].shape)}; re-export the drafter."
                    )
                own[name].copy_(tensor)
        return loaded
