"""One test per patch in vllm_dspark/engine/patches.py (see engine/PATCHES.md)."""

import pytest
import torch

from conftest import requires_vllm

pytestmark = requires_vllm


def test_apply_all_is_idempotent():
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.interfaces import EagleModelMixin
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_dspark.engine import patches

    patches.apply_all()
    before = (VllmConfig._get_v1_model_runner_unsupported_features,
              VllmConfig._validate_v1_model_runner,
              EngineArgs.create_speculative_config, GPUModelRunner.__init__,
              GPUModelRunner._prepare_inputs, EagleModelMixin._maybe_add_hidden_state)
    patches._applied = False
    patches.apply_all()
    after = (VllmConfig._get_v1_model_runner_unsupported_features,
             VllmConfig._validate_v1_model_runner,
             EngineArgs.create_speculative_config, GPUModelRunner.__init__,
             GPUModelRunner._prepare_inputs, EagleModelMixin._maybe_add_hidden_state)
    assert before == after
    assert all(getattr(f, "_dspark", False) for f in after)


def test_draft_architecture_is_ours():
    from vllm import ModelRegistry

    from vllm_dspark.engine.patches import apply_all

    apply_all()
    cls = ModelRegistry._try_load_model_cls("Qwen3DSparkModel")
    assert cls.__name__ == "DSparkForCausalLM"


def test_the_embedding_state_is_captured_as_a_copy():
    """On CUDA, layer 0's fused add + RMSNorm updates its residual (the embedding tensor)
    in place; the captured aux state must not see that."""
    from vllm.model_executor.models.interfaces import EagleModelMixin

    from vllm_dspark.engine.patches import apply_all

    apply_all()
    model = EagleModelMixin()
    model.aux_hidden_state_layers = (0, 2)
    embeddings, residual = torch.ones(3, 4), torch.zeros(3, 4)
    captured = []
    model._maybe_add_hidden_state(captured, 0, embeddings, None)  # the embeddings
    model._maybe_add_hidden_state(captured, 1, embeddings, residual)  # not captured
    model._maybe_add_hidden_state(captured, 2, embeddings, residual)
    embeddings.add_(5.0)  # what the in-place fused add does to layer 0's residual
    assert len(captured) == 2
    torch.testing.assert_close(captured[0], torch.ones(3, 4))
    torch.testing.assert_close(captured[1], torch.ones(3, 4))
    # Unpatched, the capture is the live tensor (what the GPU test caught).
    aliased = []
    EagleModelMixin._maybe_add_hidden_state.__wrapped__(model, aliased, 0, embeddings, None)
    assert aliased[0] is embeddings


def test_expand_kernel_twin_writes_float_outputs():
    """Upstream's CPU override wrote into an int64 copy; ours fills the real tensor."""
    from vllm_dspark.engine.patches import _expand_kernel_impl

    out = torch.full((6,), -7.0)
    temps = torch.tensor([0.5, -1.0, 2.0])
    _expand_kernel_impl(out, temps, torch.tensor([2, 3, 6], dtype=torch.int32), -1.0, 1.0)
    assert out.tolist() == [0.5, 0.5, 1.0, 2.0, 2.0, 2.0]
    ids = torch.zeros(4, dtype=torch.int32)
    _expand_kernel_impl(ids, torch.tensor([3, 9]), torch.tensor([1, 4]), 0, 0)
    assert ids.tolist() == [3, 9, 9, 9]


def test_expand_kernel_is_replaced_on_cpu():
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils

    from vllm_dspark.engine.patches import _expand_kernel_impl, apply_all

    if not current_platform.is_cpu():
        pytest.skip("the fix applies to the CPU platform only")
    apply_all()
    assert cpu_triton_utils._expand_kernel_impl is _expand_kernel_impl


def test_verification_scheduler_hook_is_installed_once():
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_dspark.engine.patches import install_verification_scheduler

    classes = [Worker]
    if current_platform.is_cpu():  # never imported on a GPU (see the next test)
        from vllm.v1.worker.cpu_worker import CPUWorker

        classes.append(CPUWorker)
    install_verification_scheduler()
    before = [cls.compile_or_warm_up_model for cls in classes]
    install_verification_scheduler()
    assert [cls.compile_or_warm_up_model for cls in classes] == before
    assert all(getattr(f, "_dspark", False) for f in before)


def test_gpu_platforms_never_import_the_cpu_worker():
    """Importing vLLM's cpu_worker replaces torch.cuda.Stream/stream/current_stream and
    Tensor.pin_memory with CPU placeholders process-wide; on a GPU that broke CUDA graphs
    and Inductor. Off the CPU platform the hook must leave it unimported."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from vllm.platforms import current_platform\n"
        "current_platform.is_cpu = lambda: False\n"
        "stream = torch.cuda.Stream\n"
        "from vllm_dspark.engine.patches import install_verification_scheduler\n"
        "install_verification_scheduler()\n"
        "assert 'vllm.v1.worker.cpu_worker' not in sys.modules\n"
        "assert torch.cuda.Stream is stream\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_decode_steps_without_drafts_are_counted():
    """count_unverified_decode_steps: which requests ran a decode step with ℓ_r = 0.
    (End to end: tests/engine/test_scheduler.py checks num_drafts == decode steps.)"""
    from types import SimpleNamespace as NS

    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_dspark.engine import patches

    patches.count_unverified_decode_steps()
    assert getattr(Scheduler.update_from_output, "_dspark", False)
    reqs = {
        "decode-no-draft": NS(num_output_tokens=5, num_computed_tokens=15, num_tokens=15),
        "decode-drafted": NS(num_output_tokens=5, num_computed_tokens=18, num_tokens=15),
        "prefill-last-token": NS(num_output_tokens=0, num_computed_tokens=10, num_tokens=10),
        "prefill-chunk": NS(num_output_tokens=0, num_computed_tokens=8, num_tokens=10),
    }
    out = NS(num_scheduled_tokens={"decode-no-draft": 1, "decode-drafted": 4,
                                   "prefill-last-token": 1, "prefill-chunk": 8},
             scheduled_spec_decode_tokens={"decode-drafted": [1, 2, 3]})
    assert patches._decode_steps_without_drafts(NS(requests=reqs), out) == 1
