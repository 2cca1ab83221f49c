"""The draft's two heads, built from its config: one place for the torch drafter and the engine.

Engine-free (torch only). ``vllm_dspark.model.drafter.DSparkDrafter`` and the vLLM
model (``vllm_dspark.engine.model``) both call ``build_heads``, so training, the
reference drafter and serving share one reading of ``markov_head_type``,
``markov_rank``, ``enable_confidence_head`` and ``confidence_head_with_markov``.
"""

from __future__ import annotations

from vllm_dspark.config import DSparkConfig
from vllm_dspark.model.confidence_head import ConfidenceHead
from vllm_dspark.model.markov_head import MarkovHead, build_markov_head


def build_heads(cfg: DSparkConfig) -> tuple[MarkovHead | None, ConfidenceHead | None]:
    """(sequential head, confidence head): None for the sequential head when
    ``markov_rank`` is 0 (DFlash-like), None for the confidence head unless
    ``enable_confidence_head``. Fresh parameters, in torch's default dtype."""
    markov = build_markov_head(cfg.markov_head_type, vocab_size=cfg.vocab_size,
                               rank=cfg.markov_rank, hidden_size=cfg.hidden_size)
    confidence = (ConfidenceHead(hidden_size=cfg.hidden_size, markov_rank=cfg.markov_rank,
                                 with_markov=cfg.confidence_head_with_markov)
                  if cfg.enable_confidence_head else None)
    return markov, confidence
