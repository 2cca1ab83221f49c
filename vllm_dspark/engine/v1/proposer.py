"""DSpark drafting on vLLM's V1 model runner (the CPU backend, and V1 GPU deployments).

One round, per request r whose last accepted token sits at position p-1:

1. context: the target's hidden states at the draft's layers for every token
   the target processed this step are projected (fc, hidden_norm, k/v, RoPE) and
   written into the draft's KV cache at their own slots. Rejected tokens are
   written too and overwritten later; attention never reads past p-1 for them.
2. block: queries [x_0, mask × (γ-1)] at positions p..p+γ-1, x_0 the token the
   target just emitted (DSpark's anchor-first layout), attend to the cached
   context and bidirectionally to each other (one non-causal forward).
3. sequential stage: base logits + Markov bias sampled left to right
   (``vllm_dspark.decode.draft``), plus confidences; with
   ``draft_sample_method="probabilistic"`` the draft probabilities go to
   vLLM's rejection sampler so sampling at T > 0 stays lossless.

The draft KV lives in the target's blocks (same block table), so prefix-cache
hits, preemption + recompute and chunked prefill keep it consistent for free.

When the draft gate skips drafting (schedule/gate.py), step 1 is deferred: the
step's hidden states, positions and slots are queued and written, in order, before
the next drafted step reads the cache (or once the queue holds a step's worth of
tokens). Every write to the draft cache goes through that queue or follows it, so
each slot ends with its latest write, whichever request owns it by then; a skipped
step costs a copy instead of a projection (~2 ms at 16 requests on 2 CPU cores).
"""

from __future__ import annotations

import json
import os

import torch
from vllm.forward_context import set_forward_context
from vllm.logger import init_logger
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.spec_decode.dflash import DFlashProposer
from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

from vllm_dspark.config import DSparkConfig
from vllm_dspark.decode.draft import sample_block
from vllm_dspark.schedule.round import RoundPolicy

logger = init_logger(__name__)


class DSparkProposer(DFlashProposer):
    def __init__(self, vllm_config, device: torch.device, runner=None):
        # DFlashProposer.__init__ asserts method == "dflash" and sizes a 1+γ
        # query; DSpark's anchor-first block has γ queries, so set up here.
        SpecDecodeBaseProposer.__init__(
            self, vllm_config=vllm_config, device=device, pass_hidden_states_to_model=True,
            runner=runner,
        )
        hf_config = self.draft_model_config.hf_config
        self.dspark = DSparkConfig.from_dict(hf_config.to_dict())
        # Aux index i+1 = output of target layer i; -1 (embeddings) -> 0.
        hf_config.eagle_aux_hidden_state_layer_ids = [i + 1 for i in self.dspark.target_layer_ids]
        self.gamma = self.num_speculative_tokens
        self.max_query_tokens = self.max_batch_size * self.gamma
        self.max_padded_query_tokens = max(
            self.max_query_tokens, vllm_config.compilation_config.max_cudagraph_capture_size or 0
        )
        self.max_positions = self.max_num_tokens + self.max_padded_query_tokens
        i64 = dict(dtype=torch.int64, device=device)
        self._context_slot_mapping_buffer = torch.zeros(self.max_num_tokens, **i64)
        self._context_positions_buffer = torch.zeros(self.max_num_tokens, **i64)
        self._slot_mapping_buffer = torch.zeros(self.max_padded_query_tokens, **i64)
        self.positions = torch.zeros(self.max_padded_query_tokens, **i64)
        if self.input_ids.numel() < self.max_padded_query_tokens:
            self.input_ids = torch.zeros(self.max_padded_query_tokens, dtype=torch.int32,
                                         device=device)
        self.arange = torch.arange(self.max_positions + 1, device=device, dtype=torch.int32)
        self.parallel_drafting_hidden_state_tensor = None
        self.dflash_causal = False  # the block attends to itself bidirectionally
        self._runner = runner
        # Debug/test knob: append every drafted block as a JSON line to this file.
        self._trace_path = os.environ.get("VLLM_DSPARK_TRACE_FILE") or None
        # Per-round outputs kept for the scheduler and metrics.
        self.last_confidence: torch.Tensor | None = None
        self.last_lengths: list[int] | None = None
        # Context (hidden states, positions, slots) of skipped steps, not yet stored.
        self._deferred: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._deferred_tokens = 0
        # Set after warm-up (engine/v1/patches.py: install_verification_scheduler);
        # until then every round drafts and verifies all γ.
        self.verify_scheduler = None
        self.round_policy = RoundPolicy()

    def attach_verification_scheduler(self) -> None:
        from vllm_dspark.engine import sps_profile

        self.verify_scheduler = sps_profile.build(self._runner, self.dspark, self.gamma)
        self._log_choice()
        self.round_policy = RoundPolicy(self.verify_scheduler,
                                        confidence=self.model.confidence_head is not None,
                                        stats=self.round_policy.stats)

    def take_round_stats(self) -> dict | None:
        """The rounds since the last call (drafted, skipped by the gate, the scheduler's
        decision times), for the step's output (engine/v1/patches.py:
        carry_round_stats_in_the_output); None when none ran."""
        return self.round_policy.stats.take()

    def _log_choice(self) -> None:
        """The start-up line (once per engine: the first rank's worker): what was chosen."""
        from vllm.distributed.parallel_state import is_global_first_rank

        from vllm_dspark.logs import choice_from_scheduler, describe_choice

        if is_global_first_rank():
            logger.info(describe_choice(
                "V1", self.dspark, gamma=self.gamma, **choice_from_scheduler(self.verify_scheduler),
                draft_sample_method=self.vllm_config.speculative_config.draft_sample_method))

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        self.model.attach_target_final_norm(
            target_model, self.vllm_config.model_config.get_total_num_hidden_layers())

    def _slots(self, cad: CommonAttentionMetadata, req: torch.Tensor,
               pos: torch.Tensor) -> torch.Tensor:
        """KV-cache slots of (request index, position) pairs, from the block table."""
        bt, bs = cad.block_table_tensor, self.block_size
        block = bt[req, (pos // bs).clamp(max=bt.shape[1] - 1)].long()
        return block * bs + pos % bs

    def _prepare_context(self, target_positions: torch.Tensor,
                         cad: CommonAttentionMetadata) -> int:
        """Positions and slots of every token the target processed this step."""
        qsl = cad.query_start_loc.long()
        num_ctx = target_positions.shape[0]
        ctx_req = torch.repeat_interleave(torch.arange(cad.batch_size(), device=qsl.device),
                                          qsl[1:] - qsl[:-1])
        ctx_pos = target_positions[:num_ctx].long()
        self._context_positions_buffer[:num_ctx] = ctx_pos
        self._context_slot_mapping_buffer[:num_ctx] = self._slots(cad, ctx_req, ctx_pos)
        return num_ctx

    def _store_context(self, hidden: torch.Tensor, defer: bool) -> None:
        """Write this step's context K/V (``hidden``: one row per position that
        ``_prepare_context`` laid out) into the draft cache, after any deferred steps'
        (in step order: a slot freed and reallocated meanwhile ends with its new
        owner's write). ``defer``: queue them instead, up to a step's worth of tokens."""
        num_ctx = hidden.shape[0]
        pos = self._context_positions_buffer[:num_ctx]
        slots = self._context_slot_mapping_buffer[:num_ctx]
        if defer and self._deferred_tokens + num_ctx <= self.max_num_tokens:
            # Copies: the buffers are rewritten next step.
            self._deferred.append((hidden.clone(), pos.clone(), slots.clone()))
            self._deferred_tokens += num_ctx
            return
        if self._deferred:
            parts = self._deferred + [(hidden, pos, slots)]
            hidden, pos, slots = (torch.cat([p[i] for p in parts]) for i in range(3))
            self._deferred, self._deferred_tokens = [], 0
        # Outside any graph: the context length varies step to step.
        self.model.precompute_and_store_context_kv(
            self.model.combine_hidden_states(hidden), pos, slots)

    def _prepare_block(
        self,
        gamma: int,
        next_token_ids: torch.Tensor,  # [B]
        target_positions: torch.Tensor,  # [T]
        cad: CommonAttentionMetadata,
        num_rejected: torch.Tensor | None,  # [B]
    ) -> CommonAttentionMetadata:
        """Query ids/positions/slots and the block's attention metadata."""
        b = cad.batch_size()
        qsl = cad.query_start_loc.long()
        rejected = (num_rejected.long() if num_rejected is not None
                    else torch.zeros(b, dtype=torch.long, device=qsl.device))
        bt = cad.block_table_tensor

        anchor_pos = target_positions[qsl[1:] - 1 - rejected].long() + 1  # [B] = p
        q_pos = anchor_pos[:, None] + torch.arange(gamma, device=qsl.device)  # [B, γ]
        q_req = torch.arange(b, device=qsl.device)[:, None].expand(b, gamma)
        n = b * gamma
        self.positions[:n] = q_pos.reshape(-1)
        self._slot_mapping_buffer[:n] = self._slots(cad, q_req, q_pos).reshape(-1)
        ids = torch.full((b, gamma), self.dspark.mask_token_id, dtype=torch.int32,
                         device=qsl.device)
        ids[:, 0] = next_token_ids.to(torch.int32)
        self.input_ids[:n] = ids.reshape(-1)

        seq_lens = cad.seq_lens - (num_rejected if num_rejected is not None else 0) + gamma
        upper = cad.seq_lens_cpu_upper_bound
        block_cad = CommonAttentionMetadata(
            query_start_loc=self.arange[: b + 1] * gamma,
            query_start_loc_cpu=torch.from_numpy(self.token_arange_np[: b + 1]).clone() * gamma,
            seq_lens=seq_lens,
            seq_lens_cpu_upper_bound=upper + gamma if upper is not None else None,
            num_reqs=cad.num_reqs,
            num_actual_tokens=n,
            max_query_len=gamma,
            max_seq_len=cad.max_seq_len + gamma,
            block_table_tensor=bt,
            slot_mapping=self._slot_mapping_buffer[:n],
            causal=False,
        )
        return block_cad

    def propose(
        self,
        num_speculative_tokens,
        target_token_ids,
        target_positions,
        target_hidden_states,
        next_token_ids,
        token_indices_to_sample,
        common_attn_metadata,
        sampling_metadata,
        mm_embed_inputs=None,
        num_rejected_tokens_gpu=None,
        slot_mappings=None,
    ) -> torch.Tensor:
        gamma = num_speculative_tokens
        assert 0 <= gamma <= self.gamma, (gamma, self.gamma)
        self._last_draft_probs = None
        self.last_confidence = None
        b = common_attn_metadata.batch_size()
        policy = self.round_policy  # schedule/round.py: the order of its calls matters
        # Drafting cannot pay at this load (schedule/gate.py): verify nothing.
        skip = policy.skip(b, gamma, lambda: self._decode_tokens(
            gamma, target_positions, common_attn_metadata, num_rejected_tokens_gpu))
        num_ctx = self._prepare_context(target_positions, common_attn_metadata)
        self._store_context(target_hidden_states[:num_ctx], defer=gamma == 0 or skip)
        if gamma == 0:  # nothing to draft
            return torch.empty(b, 0, dtype=torch.int64, device=self.device)
        if skip:
            self.last_lengths = [0] * b
            return [[] for _ in range(b)]
        t_draft = policy.start(self.device)  # the drafting time counts from here

        block_cad = self._prepare_block(gamma, next_token_ids, target_positions,
                                        common_attn_metadata, num_rejected_tokens_gpu)
        n = b * gamma
        _, per_layer = self.build_per_group_and_layer_attn_metadata(block_cad)
        mode, n_pad, n_across_dp = self._determine_batch_execution_and_padding(n)
        with set_forward_context(
            per_layer, self.vllm_config, num_tokens=n_pad, num_tokens_across_dp=n_across_dp,
            cudagraph_runtime_mode=mode,
            slot_mapping=self._get_slot_mapping(n_pad, block_cad.slot_mapping),
        ):
            hidden = self.model(
                input_ids=self.input_ids[:n_pad], positions=self._get_positions(n_pad),
                inputs_embeds=None,
            )
        # The backbone drafts the whole block (its positions attend to each other); the
        # vocabulary projection and the sequential stage, most of the drafting time, run
        # only where the scheduler could still verify (RoundPolicy.plan): on CPU with
        # Algorithm 1, rows stop at the survival floor below which it admits nothing;
        # elsewhere the first plan.width positions (one GEMM for all rows).
        plan = policy.plan(b, gamma, self.device.type)
        floor, width = plan.floor, plan.width
        hidden = hidden[:n].view(b, gamma, -1)[:, :width]
        if floor is not None:
            base_logits = self.model.compute_draft_logits  # per position, live rows only
        else:
            base_logits = self.model.compute_draft_logits(
                hidden.reshape(b * width, -1)).view(b, width, -1)
        temperature = None if sampling_metadata.all_greedy else sampling_metadata.temperature
        block = sample_block(
            base_logits, hidden, next_token_ids,
            temperature=temperature,
            markov_head=self.model.markov_head,
            confidence_head=self.model.confidence_head,
            sts_temperatures=self.dspark.sts_temperatures,
            want_probs=self._enable_probabilistic_draft_probs,
            admission_floor=floor,
        )
        self._last_draft_probs = block.probs
        self.last_confidence = block.confidence
        # The lengths, then the drafting time (lengths' .tolist() synchronised).
        self.last_lengths = policy.finish(block.confidence, b, t_draft)
        if self._trace_path:
            self._trace(block, gamma)
        if self.last_lengths is not None:
            # Hand vLLM only the prefixes worth verifying; it then verifies (and
            # its rejection sampler reads q for) exactly those tokens.
            return [row[:n] for row, n in zip(block.tokens.tolist(), self.last_lengths)]
        return block.tokens

    @staticmethod
    def _decode_tokens(gamma, target_positions, cad, num_rejected) -> int | None:
        """Tokens the target emitted in the step that just ran, if it was a pure decode
        step (every request verified ≤ γ drafts + 1); None otherwise (prefill)."""
        if cad.max_query_len > gamma + 1:
            return None
        rejected = int(num_rejected.sum()) if num_rejected is not None else 0
        return target_positions.shape[0] - rejected

    def _trace(self, block, gamma: int) -> None:
        b = block.tokens.shape[0]
        req_ids = self._runner.input_batch.req_ids[:b] if self._runner is not None else [None] * b
        anchor_pos = self.positions[: b * gamma : gamma].tolist()
        conf = block.confidence.tolist() if block.confidence is not None else [None] * b
        lengths = self.last_lengths or [gamma] * b
        # The positions each row sampled (all of the block's, unless the floor stopped it).
        drafted = block.drafted.tolist() if block.drafted is not None else [None] * b
        with open(self._trace_path, "a") as f:
            for i in range(b):
                m = drafted[i]
                f.write(json.dumps({"req": req_ids[i], "anchor_pos": anchor_pos[i],
                                    "anchor": int(self.input_ids[i * gamma]), "gamma": gamma,
                                    "drafts": block.tokens[i, :m].tolist(),
                                    "confidence": conf[i] and conf[i][:m],
                                    "verify": lengths[i]}) + "\n")
