"""Patches for vLLM's V2 model runner (the CUDA default), applied by ``apply_all``.

PATCHES.md has their rows (Runner V2). Each is idempotent (``engine.patches._wrap``);
the heavy V2 modules are imported only inside a worker that builds a V2 runner.
"""

from __future__ import annotations

import os
import time

from vllm_dspark.config import DSparkConfig
from vllm_dspark.engine.patches import _wrap, add_pending, patch

_RULES = {"causal": "causal", "async": "global"}  # VLLM_DSPARK_SCHEDULER -> budget rule


def _dspark_spec(vllm_config):
    spec = vllm_config.speculative_config
    return spec if spec is not None and spec.method == "dspark" else None


def _scheduler_mode(spec) -> str | None:
    """The verification mode asked for with VLLM_DSPARK_SCHEDULER (checked against the
    draft), or None when the variable is unset.

    Unset means verify all γ on the V2 runner: measured on an H200 with the SmolLM2
    pair (benchmarks/results/gpu_sweep_h200_long.json), vLLM 0.32's device-side budget
    machinery costs more per step than the verification it saves, at every concurrency
    (0.61-0.78 of no speculation against 0.87-1.09 for full-γ verification)."""
    from vllm_dspark.schedule.verification import SCHEDULER_ENV, read_settings

    if not os.environ.get(SCHEDULER_ENV, "").strip():
        return None
    cfg = DSparkConfig.from_dict(spec.draft_model_config.hf_config.to_dict())
    return read_settings(cfg).mode


@patch(runner="V2", scope="dspark only")
def schedule_verification_on_v2() -> None:
    """With VLLM_DSPARK_SCHEDULER=causal|async, turn on the V2 runner's device-side
    verification budget (vLLM's adaptive verification, whose budget rule
    ``install_v2_speculator`` makes ours); with ``fixed``, turn it off. Unset: as the
    user configured vLLM (off by default). Runs only when vLLM has chosen the V2 runner."""
    from vllm.config import VllmConfig

    def make(original):
        def patched(self):
            original(self)
            configure_budget(self)
        return patched

    _wrap(VllmConfig, "_validate_v2_model_runner", make)


def configure_budget(vllm_config) -> None:
    """``schedule_verification_on_v2``'s decision, on a config vLLM built for V2."""
    from vllm.logger import init_logger

    spec = _dspark_spec(vllm_config)
    mode = _scheduler_mode(spec) if spec is not None else None
    if mode is None:
        return
    if mode == "fixed":
        spec.enable_adaptive_verification = False
        return
    why = _why_no_budget(vllm_config)
    if why:
        init_logger(__name__).warning(
            "vllm-dspark: VLLM_DSPARK_SCHEDULER=%s ignored, verifying all γ drafts on the "
            "V2 runner: its verification budget needs %s.", mode, why)
        return
    spec.enable_adaptive_verification = True


def _why_no_budget(vllm_config) -> str | None:
    """What keeps vLLM 0.32's adaptive verification off in this config (its own
    checks, config/vllm.py ``_validate_adaptive_verification`` and the sampler's)."""
    if not vllm_config.compilation_config.cudagraph_mode.has_full_cudagraphs():
        return "full CUDA graphs (drop enforce_eager / use cudagraph mode FULL*)"
    if vllm_config.lora_config is not None:
        return "no LoRA"
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        return "no pipeline parallelism"
    if getattr(vllm_config.parallel_config, "enable_batch_sharded_sampling", False):
        return "no batch-sharded sampling"
    return None


@patch(runner="V2", scope="dspark only")
def install_v2_speculator() -> None:
    """For dspark on the V2 runner: our speculator instead of upstream's
    ``DSparkSpeculator`` (every head, STS confidences), and our budget rule in the
    adaptive verification manager. Done in the worker, right before it builds the V2
    runner (``init_speculator`` and the runner look both names up at call time)."""
    from vllm.v1.worker.gpu_worker import Worker

    def make(original):
        def patched(self):
            if self.use_v2_model_runner and _dspark_spec(self.vllm_config) is not None:
                point_v2_at_ours(self.vllm_config)
            return original(self)
        return patched

    _wrap(Worker, "_make_model_runner", make)


def point_v2_at_ours(vllm_config) -> None:
    from vllm.v1.worker.gpu import model_runner
    from vllm.v1.worker.gpu.spec_decode.dspark import speculator as upstream

    from vllm_dspark.engine.v2.budget import DSparkBudgetManager
    from vllm_dspark.engine.v2.speculator import DSparkV2Speculator

    upstream.DSparkSpeculator = DSparkV2Speculator
    rule = _RULES.get(_scheduler_mode(_dspark_spec(vllm_config)))
    if rule is None:  # unset or fixed: upstream's manager, if the user enabled it
        return

    def make(original):
        def patched(**kwargs):
            manager = original(**kwargs)
            if manager is None:
                return None
            return DSparkBudgetManager(
                kwargs["req_states"], kwargs["query_start_loc"], kwargs["num_bonus_tokens"],
                max_total_logits=kwargs["max_total_logits"], rule=rule)
        return patched

    _wrap(model_runner, "maybe_create_adaptive_verification_manager", make)


def gate_choice(spec) -> str | None:
    """Whether the V2 draft gate runs for this dspark config: ``"asked"``
    (``VLLM_DSPARK_DRAFT_COST=measure`` set explicitly: a clash with it is an error),
    ``"default"`` (unset, and the draft has a confidence head, as the V1 default), or
    None (off: a number, e.g. ``0``, always drafts; unset with no confidence head, with
    ``VLLM_DSPARK_SCHEDULER=fixed`` or with draft trees, as on V1, where the gate belongs
    to the scheduler's causal/async modes). A bad value is one start-up error.

    Default on since its GPU tests passed (H100, 2026-12-07: greedy equal to plain with
    the reference drafts, chi-square at T = 1); swept on an H100, 1.09× the always-
    drafting default in geometric mean over 13 cells (benchmarks/README.md)."""
    from vllm_dspark.schedule.verification import DRAFT_COST_ENV, SCHEDULER_ENV, _draft_cost

    raw = os.environ.get(DRAFT_COST_ENV, "").strip().lower()
    if raw == "measure":
        return "asked"
    if raw:
        _draft_cost(os.environ)  # a bad value: one error naming it and the fix
        return None
    cfg = DSparkConfig.from_dict(spec.draft_model_config.hf_config.to_dict())
    if tree_mode() or not cfg.enable_confidence_head:
        return None
    if os.environ.get(SCHEDULER_ENV, "").strip().lower() == "fixed":
        return None
    return "default"


def _gate_tiers(vllm_config) -> list[tuple[int, int, int]]:
    from vllm_dspark.schedule.scheduler_gate import draft_count_tiers

    return draft_count_tiers(vllm_config.speculative_config.num_speculative_tokens,
                             vllm_config.scheduler_config.max_num_seqs)


def _holds_gate_tiers(vllm_config) -> bool:
    """The config's draft-count schedule is the gate's (``configure_gate`` set it)."""
    have = vllm_config.speculative_config.num_speculative_tokens_per_batch_size
    return have is not None and [tuple(t) for t in have] == _gate_tiers(vllm_config)


def gate_in_effect(vllm_config) -> bool:
    """The gate runs in this config: chosen (``gate_choice``) and its draft-count
    schedule in place (``configure_gate``; vLLM drops it with data parallelism)."""
    spec = _dspark_spec(vllm_config)
    if spec is None or not vllm_config.use_v2_model_runner or gate_choice(spec) is None:
        return False
    return _holds_gate_tiers(vllm_config)


@patch(runner="V2", scope="dspark only")
def gate_drafting_in_the_scheduler() -> None:
    """Where ``gate_choice`` turns it on (by default with a confidence head), the V2 draft
    gate decides each step's draft count K (γ or 0) in vLLM's scheduler
    (schedule/scheduler_gate.py), through vLLM's dynamic speculative decoding: the
    config gets a draft-count schedule naming both counts (so target graphs exist for
    both query lengths), the scheduler's lookup of it becomes the gate, and every step's
    output times the choice."""
    from vllm.config import VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler

    def config(original):
        def patched(self):
            configure_gate(self)
            original(self)  # vLLM's own check: no dynamic draft counts with DP > 1
        return patched

    def init(original):
        def patched(self, *args, **kwargs):
            original(self, *args, **kwargs)
            install_gate(self)
        return patched

    def update(original):
        def patched(self, scheduler_output, model_runner_output):
            gate = getattr(self, "_dspark_gate", None)
            if gate is not None:
                observe_step(self, gate, scheduler_output, model_runner_output)
            return original(self, scheduler_output, model_runner_output)
        return patched

    # Runs in VllmConfig.__post_init__ before the CUDA-graph sizes are chosen.
    _wrap(VllmConfig, "_maybe_disable_dynamic_sd_for_data_parallel", config)
    _wrap(Scheduler, "__init__", init)
    _wrap(Scheduler, "update_from_output", update)


def configure_gate(vllm_config) -> None:
    """``gate_drafting_in_the_scheduler``'s config half: for dspark on V2 with the gate
    chosen (``gate_choice``), name both draft counts in
    ``num_speculative_tokens_per_batch_size``. A user's own schedule wins over the default
    gate (one info line) and clashes with an explicit ``measure`` (one error)."""
    spec = _dspark_spec(vllm_config)
    if spec is None or not vllm_config.use_v2_model_runner:
        return
    choice = gate_choice(spec)
    if choice is None:
        return
    from vllm_dspark.schedule.verification import DRAFT_COST_ENV

    if _holds_gate_tiers(vllm_config):
        return  # ours: a config copied from this one (the draft's) is validated again
    have = spec.num_speculative_tokens_per_batch_size
    if have is not None and choice == "default":
        from vllm.logger import init_logger

        init_logger(__name__).info(
            "vllm-dspark: draft gate off: num_speculative_tokens_per_batch_size chooses "
            "the draft count per step (set %s=0 to silence this).", DRAFT_COST_ENV)
        return
    if have is not None:
        from vllm_dspark.config import DSparkConfigError

        raise DSparkConfigError(
            f"{DRAFT_COST_ENV}=measure (the draft gate) and num_speculative_tokens_per_"
            "batch_size both choose the draft count per step; remove one: unset "
            f"{DRAFT_COST_ENV} to keep your schedule, or drop the schedule from "
            "speculative_config to let the gate measure.")
    spec.num_speculative_tokens_per_batch_size = _gate_tiers(vllm_config)


def install_gate(scheduler) -> None:
    """The scheduler half: its draft-count lookup becomes the gate (only where
    ``configure_gate`` set the schedule; vLLM drops it with data parallelism, and a
    user's own schedule stays the user's)."""
    if scheduler.dynamic_sd_lookup is None or not gate_in_effect(scheduler.vllm_config):
        return
    from vllm_dspark.schedule.scheduler_gate import SchedulerGate

    path = os.environ.get(GATE_TRACE_ENV, "").strip()
    trace = open(path, "a") if path else None  # debugging: the gate's samples and choices
    scheduler._dspark_gate = SchedulerGate(scheduler.num_spec_tokens, trace=trace)
    scheduler.dynamic_sd_lookup = scheduler._dspark_gate


def observe_step(scheduler, gate, scheduler_output, model_runner_output) -> None:
    """One step's output reached the engine core: time it for the gate (a sample only
    when every request decoded: no new request, no prefill chunk), and count the
    step's decision for the plugin's metrics."""
    if scheduler_output.total_num_scheduled_tokens == 0:
        return  # nothing ran
    now = time.perf_counter()
    spec = scheduler_output.scheduled_spec_decode_tokens
    scheduled = scheduler_output.num_scheduled_tokens
    decoding = not scheduler_output.scheduled_new_reqs and all(
        n == 1 + len(spec.get(req_id, ())) for req_id, n in scheduled.items())
    tokens = (sum(map(len, model_runner_output.sampled_token_ids)) if decoding else None)
    drafted = scheduler_output.num_spec_tokens_to_schedule > 0
    gate.observe(now, len(scheduled), tokens, verified=any(spec.values()), drafted=drafted)
    if scheduler.log_stats:
        add_pending(scheduler, {"drafted": 1} if drafted else {"skipped": 1})


TREE_ENV = "VLLM_DSPARK_TREE"
GATE_TRACE_ENV = "VLLM_DSPARK_GATE_TRACE"


def tree_mode(environ=None) -> bool:
    """``VLLM_DSPARK_TREE``: ``off`` (the default: chains) or ``on`` (draft trees of γ
    nodes on the V2 runner, issue 17; experimental: run on an H100, far slower than
    chains so far)."""
    from vllm_dspark.config import DSparkConfigError

    value = (environ if environ is not None else os.environ).get(TREE_ENV, "").strip()
    if value.lower() in ("", "off", "0"):
        return False
    if value.lower() in ("on", "1"):
        return True
    raise DSparkConfigError(f"{TREE_ENV}={value!r} is not a tree mode: use off (the "
                            "default, chains) or on (draft trees on the V2 runner).")


@patch(runner="V2", scope="dspark only")
def verify_trees_on_v2() -> None:
    """With VLLM_DSPARK_TREE=on, dspark on the V2 runner verifies draft trees of γ nodes
    (the chain's width) instead of chains: ``engine/v2/tree_runner.py``'s step, its five
    calls placed by wrapping the runner, its rejection sampler and FlashAttention. Off
    (the default), nothing is installed."""
    if not tree_mode():
        return
    from vllm.config import VllmConfig
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    from vllm.v1.worker.gpu import model_runner
    from vllm.v1.worker.gpu.spec_decode import rejection_sampler

    from vllm_dspark.engine.v2 import tree_attention, tree_runner

    def config(original):
        def patched(self):
            original(self)
            configure_tree(self)
        return patched

    def prepare_attn(original):
        def patched(self, input_batch):
            out = original(self, input_batch)
            run = tree_runner.RUN
            if run is not None and input_batch.num_draft_tokens > 0:
                tree_runner.begin(run, input_batch.positions, input_batch.query_start_loc,
                                  input_batch.cu_num_logits, input_batch.idx_mapping,
                                  self.req_states.num_computed_tokens.gpu, out[0][0],
                                  int(input_batch.cu_num_logits_np[-1]),
                                  input_batch.num_tokens, input_batch.cu_num_logits_np)
            return out
        return patched

    def execute_model(original):
        def patched(self, *args, **kwargs):
            try:
                return original(self, *args, **kwargs)
            finally:
                tree_attention.set_step(None)
                run, st = tree_runner.RUN, self.execute_model_state
                if run is not None and run.active and st is not None:
                    run.aux = st.aux_hidden_states
                    tree_runner.end_forward(run, st.input_batch.positions,
                                            int(st.input_batch.cu_num_logits_np[-1]))
        return patched

    def sample(original):
        def patched(self, hidden_states, input_batch, *args, **kwargs):
            out = original(self, hidden_states, input_batch, *args, **kwargs)
            run = tree_runner.RUN
            if run is not None and run.active:
                tree_runner.commit(run, [hidden_states, *(run.aux or [])],
                                   int(input_batch.cu_num_logits_np[-1]))
            return out
        return patched

    def rejection_sample(original):
        def patched(target_logits, draft_logits, draft_sampled, cu_num_logits, pos,
                    idx_mapping, expanded_idx_mapping, expanded_local_pos, temperature,
                    seed, *args, use_fp64=False, **kwargs):
            run = tree_runner.RUN
            if run is None or not run.active:
                return original(target_logits, draft_logits, draft_sampled, cu_num_logits,
                                pos, idx_mapping, expanded_idx_mapping, expanded_local_pos,
                                temperature, seed, *args, use_fp64=use_fp64, **kwargs)
            from vllm.v1.worker.gpu.sample.gumbel import gumbel_sample

            def draw(logits, eim, key):  # V2's own seeded draw (argmax on greedy rows)
                return gumbel_sample(logits, eim, temperature, seed, key,
                                     apply_temperature=False, is_drafting=False,
                                     use_fp64=use_fp64)
            return tree_runner.sample_rows(run, target_logits, draft_sampled, cu_num_logits,
                                           idx_mapping, expanded_idx_mapping, pos, draw)
        return patched

    _wrap(VllmConfig, "_validate_v2_model_runner", config)
    _wrap(FlashAttentionImpl, "forward", tree_attention.with_tree_rows)
    _wrap(model_runner.GPUModelRunner, "prepare_attn", prepare_attn)
    _wrap(model_runner.GPUModelRunner, "execute_model", execute_model)
    _wrap(model_runner.GPUModelRunner, "sample", sample)
    _wrap(rejection_sampler, "rejection_sample", rejection_sample)


def configure_tree(vllm_config) -> None:
    """``verify_trees_on_v2``'s start-up checks, on a config vLLM built for V2: what the
    first tree mode cannot run with is refused with its fix."""
    spec = _dspark_spec(vllm_config)
    if spec is None or not tree_mode():
        return
    from vllm_dspark.config import DSparkConfigError

    clash = None
    if spec.enable_adaptive_verification:
        clash = ("the verification budget (VLLM_DSPARK_SCHEDULER=causal|async or "
                 "enable_adaptive_verification)", "unset it")
    elif gate_choice(spec) == "asked":
        clash = ("the draft gate (VLLM_DSPARK_DRAFT_COST=measure)", "unset it")
    elif _full_graphs_of_mixed_batches(vllm_config):
        clash = ("FULL CUDA graphs of mixed batches (cudagraph_mode FULL; tree attention is "
                 "captured for uniform decode batches only)",
                 "pass compilation_config={'cudagraph_mode': 'FULL_AND_PIECEWISE'} (vLLM's "
                 "default), 'PIECEWISE' or enforce_eager=True")
    elif vllm_config.parallel_config.pipeline_parallel_size > 1:
        clash = ("pipeline parallelism", "use one pipeline stage")
    if clash is not None:
        raise DSparkConfigError(f"{TREE_ENV}=on does not run with {clash[0]} yet: "
                                f"{clash[1]}, or unset {TREE_ENV}.")


def _full_graphs_of_mixed_batches(vllm_config) -> bool:
    """FULL graphs for batches mixing prefill and decode rows (``cudagraph_mode=FULL``):
    the tree rows of such a batch are found per step on the host, which no graph replay
    repeats. FULL graphs of uniform decode batches (FULL_AND_PIECEWISE, FULL_DECODE_ONLY)
    capture tree attention from persistent buffers (``tree_attention.graph_forward``)."""
    from vllm.config.compilation import CUDAGraphMode

    return vllm_config.compilation_config.cudagraph_mode.mixed_mode() == CUDAGraphMode.FULL


PATCHES = (schedule_verification_on_v2, install_v2_speculator, gate_drafting_in_the_scheduler,
           verify_trees_on_v2)


def apply() -> None:
    for install in PATCHES:
        install()
