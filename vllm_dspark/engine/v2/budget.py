"""The V2 runner's verification budget with the plugin's rule (vLLM 0.32).

Upstream's ``AdaptiveVerificationManager`` (``v1/worker/gpu/spec_decode/
adaptive_verification.py``) profiles the step costs once at capture (draft ms per
request count, verify ms per token count, FULL-graph samples), keeps the
confidences of two steps back on the host and, on the device, admits the budget's
globally best current drafts (survival top-K), rewriting the batch's query layout
without a host synchronisation. We keep all of that and replace one decision: the
budget K (``vllm_dspark.schedule.budget``), with Algorithm 1's causal stop
(``VLLM_DSPARK_SCHEDULER=causal``) or §5.2's global argmax (``async``, upstream's
rule). Opt-in: unset, the V2 runner verifies all γ (engine/v2/patches.py says why).
The confidences it reads are ours: STS-calibrated, from the plugin's speculator.
"""

from __future__ import annotations

import numpy as np
from vllm.v1.worker.gpu.spec_decode.adaptive_verification import AdaptiveVerificationManager

from vllm_dspark.schedule.budget import draft_budget


class DSparkBudgetManager(AdaptiveVerificationManager):
    def __init__(self, *args, rule: str = "causal", **kwargs):
        super().__init__(*args, **kwargs)
        self.rule = rule
        self.last_budget: tuple[int, int] | None = None  # (budget, schedulable drafts)

    def get_num_tokens(self, num_tokens_per_req: dict[str, int],
                       draft_tokens: dict[str, list[int]]) -> int:
        """Upstream's bookkeeping, with K from ``draft_budget(rule)``."""
        assert self.cost_tables is not None
        req_ids = list(num_tokens_per_req)
        slots = np.fromiter(map(self.req_states.req_id_to_index.__getitem__, req_ids),
                            dtype=np.int32, count=len(req_ids))
        scheduled = np.fromiter(num_tokens_per_req.values(), dtype=np.int32,
                                count=len(req_ids))
        drafts = np.fromiter((len(draft_tokens.get(r, ())) for r in req_ids),
                             dtype=np.int32, count=len(req_ids))
        non_draft = scheduled - drafts
        stale = self._stale_confidences[self._stale_idx].np[slots].astype(np.float64)
        survival = np.cumprod(stale, axis=1)
        valid = np.arange(self.num_speculative_steps)[None, :] < drafts[:, None]
        max_budget = min(int(drafts.sum()),
                         max(0, self._max_total_logits - len(req_ids) * self.num_bonus_tokens))
        scores = np.sort(survival[valid])[::-1][:max_budget]
        # Requests whose step ends in a sampled token (decodes and last prefill chunks).
        sampling = np.count_nonzero(self.req_states.num_computed_tokens_np[slots] + non_draft
                                    >= self.req_states.prefill_len.np[slots])
        draft_ms, verify_ms = self.cost_tables
        base = int(non_draft.sum())
        cost = draft_ms[len(req_ids)] + verify_ms[base: base + max_budget + 1]
        budget = draft_budget(scores, float(sampling), cost, self.rule)
        self.last_budget = (budget, int(drafts.sum()))
        self._batch_budget = (dict(zip(req_ids, drafts.tolist())),
                              dict(zip(req_ids, non_draft.tolist())), budget)
        return base + budget
