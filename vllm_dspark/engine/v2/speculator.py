"""DSpark drafting on vLLM's V2 model runner (the CUDA default in vLLM 0.32).

Upstream's ``DSparkSpeculator`` already lays out DSpark's anchor-first block, writes
the context K/V of accepted rows into the draft cache, and captures the whole draft
step (backbone + sequential stage + confidences) in FULL CUDA graphs. What it lacks is
ours: it knows only the vanilla Markov formula and an uncalibrated confidence. This
subclass keeps all of upstream's input preparation and graph capture and replaces
the one method inside the graph, ``_sample_sequential``, with the plugin's heads:

- the sequential head's ``step`` (vanilla, gated or RNN, ``vllm_dspark.model``), so a
  gated/RNN drafter gets its own bias instead of a silently wrong vanilla one;
- confidences c_k = σ(z_k / t_k) with the draft's STS temperatures, in one batched pass
  after the loop, and only where something reads them (the verification budget, the
  trace): with a fixed γ nothing does, and the round skips them;
- the corrected logits stay in the backbone's dtype (no float32 copy of a vocabulary-
  wide row per position), as upstream's, cast only where q is cached in another dtype;
- sampling through upstream's seeded Gumbel sampler, which also caches the logits each
  token was drawn from as q for the rejection sampler (``draft_sample_method=
  "probabilistic"``): lossless at any temperature.

Every op is a fixed-shape tensor op on persistent buffers (no host sync), so the
loop is captured in the same graph as upstream's.

A step that vLLM's scheduler gives no drafts (K = 0: the draft gate in the scheduler
skipped it, ``schedule/scheduler_gate.py``) only stores the drafter's context K/V;
upstream's drafts the whole block there too.
"""

from __future__ import annotations

import json
import os

import torch
from vllm.logger import init_logger
from vllm.v1.worker.gpu.spec_decode.dspark.speculator import DSparkSpeculator

from vllm_dspark.config import DSparkConfig, DSparkConfigError
from vllm_dspark.decode.draft import block_confidence, sts_per_position
from vllm_dspark.decode.tree import TreeSpec, draft_tree
from vllm_dspark.decode.tree_attention import ancestor_mask

logger = init_logger(__name__)


class DSparkV2Speculator(DSparkSpeculator):
    _speculator_name = "DSpark (vllm-dspark)"

    def __init__(self, vllm_config, device: torch.device):
        super().__init__(vllm_config, device)
        hf_config = self.draft_model_config.hf_config
        self.dspark = DSparkConfig.from_dict(hf_config.to_dict())
        if not self.sample_from_anchor:
            raise DSparkConfigError(
                "vllm-dspark serves DeepSpec-format drafts (anchor-first blocks); this "
                "draft sets sample_from_anchor=false (speculators' 1+N layout). Remove "
                "that key, or uninstall vllm-dspark to serve it with upstream's speculator.")
        if self._draft_topk is not None:
            raise DSparkConfigError(
                "dspark_draft_topk is not supported by vllm-dspark's speculator; remove it "
                "from the draft's config.json (drafts then use the full vocabulary).")
        # [γ] STS temperature per position, on the device: the graph divides by it.
        self.sts = torch.tensor(
            sts_per_position(self.dspark.sts_temperatures, self.num_speculative_steps),
            dtype=torch.float32, device=device)
        # Debug/test knob (as on V1): append every drafted block as a JSON line.
        self._trace_path = os.environ.get("VLLM_DSPARK_TRACE_FILE") or None
        self._context_only = False  # this step: store context K/V, draft nothing
        # Tree drafting (issue 17, VLLM_DSPARK_TREE=on): the N best nodes of the block's
        # tree instead of the chain, N = γ (the chain's width: the same query length,
        # graphs and scheduler slots). None: the chain.
        self.tree_spec: TreeSpec | None = None
        from vllm_dspark.engine.v2.patches import tree_mode
        if tree_mode():  # VLLM_DSPARK_TREE=on (engine/v2/tree_runner.py)
            from vllm_dspark.engine.v2 import tree_runner

            self.enable_tree(TreeSpec(budget=self.num_speculative_steps))
            tree_runner.RUN = tree_runner.new_run(
                self.max_num_reqs, self.num_speculative_steps,
                vllm_config.model_config.get_head_size(), device)
            # FULL graphs of the target capture tree attention from these buffers.
            from vllm_dspark.engine.v2 import tree_attention
            tree_attention.set_graph(tree_runner.RUN.graph)

    def init_cudagraph_manager(self, cudagraph_mode) -> None:
        """Tree mode may run the target with PIECEWISE graphs only (its tree attention
        then runs eagerly between the pieces), and upstream's drafter captures FULL
        graphs or none: under PIECEWISE it would draft eagerly, the tree build's ~600
        small ops a step (counted on CPU, R = 1, γ = 7) each launched from the host. The
        draft step's graphs do not depend on the target's, so in tree mode the drafter
        keeps FULL decode graphs (the tree build is graph-safe, ``decode.tree``)."""
        from vllm.config.compilation import CUDAGraphMode

        if self.tree_spec is not None and cudagraph_mode == CUDAGraphMode.PIECEWISE:
            cudagraph_mode = CUDAGraphMode.FULL_AND_PIECEWISE
        super().init_cudagraph_manager(cudagraph_mode)

    def load_draft_model(self, target_model, target_attn_layer_names):
        model = super().load_draft_model(target_model, target_attn_layer_names)
        # Confidences are computed when the draft has a head and something reads them:
        # the verification budget (adaptive verification) or the trace.
        self.use_confidence_head = model.model.confidence_head is not None and bool(
            self.speculative_config.enable_adaptive_verification or self._trace_path)
        if self.use_confidence_head:
            self.use_acceptance_estimator = False
        model.attach_target_final_norm(
            target_model, self.vllm_config.model_config.get_total_num_hidden_layers())
        logger.info(self._describe_choice())
        return model

    def _describe_choice(self) -> str:
        """The start-up line (vllm_dspark.logs): heads, drafts, and the verification rule
        in effect on this runner (engine/v2/patches.py decided it from the knobs)."""
        from vllm_dspark.engine.v2.patches import _RULES, _scheduler_mode, gate_in_effect
        from vllm_dspark.logs import describe_choice

        spec = self.speculative_config
        if not spec.enable_adaptive_verification:
            scheduler, sps = "fixed (verify all γ)", None
        else:
            rule = _RULES.get(_scheduler_mode(spec))
            scheduler = (f"device-side budget, rule {rule}" if rule is not None
                         else "vLLM's adaptive verification (its own rule)")
            sps = "vLLM's step costs, profiled at capture"
        # configure_gate named both draft counts for the scheduler's gate (vLLM drops
        # them with data parallelism, and then no gate runs).
        gate = gate_in_effect(self.vllm_config)
        return describe_choice("V2", self.dspark, gamma=self.num_speculative_steps,
                               scheduler=scheduler, sps=sps, gate=gate,
                               draft_sample_method=spec.draft_sample_method)

    def _sample_sequential(self, num_reqs: int, head_hidden: torch.Tensor) -> None:
        """Left to right over the block: bias from the previous token, sample, confidence.

        Runs inside the draft step's CUDA graph: shapes are fixed by ``num_reqs``."""
        gamma = self.num_speculative_steps
        n = num_reqs * gamma
        markov = self.model.markov_head
        conf_head = self.model.confidence_head if self.use_confidence_head else None
        hidden = head_hidden[self.sample_indices[:n]]  # [R·γ, H], ordered (req, step)
        base = self.model.compute_draft_logits(hidden).view(num_reqs, gamma, -1)
        hidden = hidden.view(num_reqs, gamma, -1)
        idx_map = self.sample_idx_mapping[:n].view(num_reqs, gamma)
        sample_pos = self.sample_pos[:n].view(num_reqs, gamma)
        # The anchor (the token the target just emitted) sits at query offset 0.
        anchor = self.input_buffers.input_ids[self._anchor_idx[:num_reqs]]
        prev = anchor
        state = markov.init_state(prev.shape, hidden) if markov is not None else None
        if self.tree_spec is not None:
            self._draft_tree(num_reqs, base, hidden, anchor, idx_map[:, 0])
            return
        cache_dtype = self.draft_logits.dtype if self.draft_logits is not None else None
        for k in range(gamma):
            logits = base[:, k]
            if markov is not None:
                bias, state = markov.step(prev, hidden[:, k], state)
                logits = logits + bias.to(logits.dtype)
            if cache_dtype is not None:
                # q is cached in this dtype: sample from exactly the cached logits.
                logits = logits.to(cache_dtype)
            tok = self._sample_logits(logits, idx_map[:, k], sample_pos[:, k], k)
            self.draft_tokens[:num_reqs, k] = tok
            prev = tok
        if conf_head is not None:
            # c_k reads x_{k-1}: the anchor, then the block's tokens shifted by one.
            prevs = torch.cat([anchor[:, None], self.draft_tokens[:num_reqs, :gamma - 1]
                               .to(anchor.dtype)], dim=1)
            self.draft_token_confidence_probs[:num_reqs, :gamma] = block_confidence(
                conf_head, markov, hidden, prevs, self.sts)

    def enable_tree(self, spec: TreeSpec) -> None:
        """Draft trees of ``spec.budget`` = γ nodes; the node structure lands by batch
        row in ``tree_parents`` / ``tree_depth`` [max_num_reqs, γ], beside
        ``draft_tokens`` (the nodes' tokens, parents first)."""
        if spec.budget != self.num_speculative_steps:
            raise DSparkConfigError(
                f"a V2 draft tree has γ = {self.num_speculative_steps} nodes (the chain's "
                f"width), got a node budget of {spec.budget}")
        self.tree_spec = spec
        shape, dev = self.draft_tokens.shape, self.draft_tokens.device
        self.tree_parents = torch.full(shape, -1, dtype=torch.int64, device=dev)
        self.tree_depth = torch.zeros(shape, dtype=torch.int64, device=dev)
        # [max_num_reqs, γ+1, γ+1] the trees' ancestor masks (root first), built inside
        # the draft step's graph: the target's step then reads them instead of walking
        # the parents again with ~60 small host-launched ops.
        w = shape[1] + 1
        self.tree_mask = torch.zeros(shape[0], w, w, dtype=torch.bool, device=dev)

    def _draft_tree(self, num_reqs, base, hidden, anchor, idx_map) -> None:
        """The block's tree (``decode.tree``, its CUDA-graph-safe build: top-k children
        at any temperature, for the fixed-candidate verifier). It ranks children by the
        confidence head where the draft has one, whether or not a budget reads it."""
        tree = draft_tree(base, hidden, anchor, self.temperature[idx_map.long()],
                          self.model.markov_head, self.model.confidence_head,
                          self.dspark.sts_temperatures, self.tree_spec, graph_safe=True)
        self.draft_tokens[:num_reqs] = tree.tokens
        self.tree_parents[:num_reqs] = tree.parents
        self.tree_depth[:num_reqs] = tree.depth
        self.tree_mask[:num_reqs] = ancestor_mask(tree.parents)

    def propose(self, input_batch, *args, **kwargs):
        if kwargs.get("num_speculative_tokens") == 0 and not kwargs.get("dummy_run", False):
            return self._store_context_only(input_batch, *args, **kwargs)
        drafts = super().propose(input_batch, *args, **kwargs)
        if self.tree_spec is not None and not kwargs.get("dummy_run", False):
            from vllm_dspark.engine.v2 import tree_runner

            r = input_batch.num_reqs
            tree_runner.store_tree(tree_runner.RUN, input_batch.idx_mapping[:r],
                                   self.tree_parents[:r], self.tree_depth[:r],
                                   self.tree_mask[:r])
        if self._trace_path and not kwargs.get("dummy_run", False):
            self._trace(input_batch)
        return drafts

    def _store_context_only(self, input_batch, *args, **kwargs):
        """A step vLLM's scheduler gave no drafts (the draft gate skipped it,
        schedule/scheduler_gate.py): store the drafter's context K/V of the step's
        tokens, which later drafts attend to, and draft nothing. Upstream's input
        preparation runs as in any step; ``is_profile`` takes its eager path, which
        stores the context K/V outside the draft graph, and ``_generate_draft`` (the
        backbone, the sequential head) is skipped. The runner marks the returned rows
        as no drafts (-1), and the next step verifies none."""
        kwargs["is_profile"] = True
        self._context_only = True
        try:
            return super().propose(input_batch, *args, **kwargs)
        finally:
            self._context_only = False

    def _generate_draft(self, *args, **kwargs) -> None:
        if self._context_only:
            return
        super()._generate_draft(*args, **kwargs)

    def _build_uniform_attn_metadata(self, *args, **kwargs):
        """The draft query's attention metadata, which only the draft forward reads: a
        context-only step runs none, so it skips the build (host work and, with
        FlashAttention 3, a scheduler-metadata kernel, on every step the gate skips)."""
        if self._context_only:
            return None
        return super()._build_uniform_attn_metadata(*args, **kwargs)

    def _trace(self, input_batch) -> None:
        """One JSON line per request (host sync: for tests and debugging only)."""
        r, gamma = input_batch.num_reqs, self.num_speculative_steps
        anchor = self._anchor_idx[:r]
        rows = zip(input_batch.req_ids[:r], self.input_buffers.positions[anchor].tolist(),
                   self.input_buffers.input_ids[anchor].tolist(),
                   self.draft_tokens[:r].tolist(),
                   self.draft_token_confidence_probs[:r].tolist())
        with open(self._trace_path, "a") as f:
            for req, pos, tok, drafts, conf in rows:
                f.write(json.dumps({"req": req, "anchor_pos": pos, "anchor": tok,
                                    "gamma": gamma, "drafts": drafts,
                                    "confidence": conf if self.use_confidence_head else None,
                                    "verify": gamma}) + "\n")
