"""The verification scheduler inside an engine: SPS(B) from the runner, built after warm-up.

Runner-neutral: both vLLM runners (V1 and V2) have ``vllm_config``, ``model_config``,
``device`` and ``_dummy_run(num_tokens, skip_eplb=...)``; the caller passes its
drafter's γ (and, if it must, another dummy forward). The knobs and the scheduler
itself are engine-free (``vllm_dspark.schedule.verification``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from vllm_dspark.config import DSparkConfig
from vllm_dspark.schedule.verification import (
    SCHEDULER_ENV,
    SPS_ENV,
    VerificationScheduler,
    read_settings,
)


def profile_sps(runner, gamma: int, forward: Callable[[int], object] | None = None) -> object:
    """Measure SPS(B) with the runner's own dummy forward passes (after warm-up, so the
    compiled graphs and CUDA-graph buckets are what serving uses), or reuse the cache.
    ``forward(num_tokens)`` runs one target step of that many tokens; default
    ``runner._dummy_run(num_tokens, skip_eplb=True)``."""
    return _profile_sps(runner, gamma, forward)[0]


def _profile_sps(runner, gamma: int, forward) -> tuple[object, str]:
    """``profile_sps``'s table, and where it came from (for the start-up line)."""
    import vllm
    from vllm.logger import init_logger

    from vllm_dspark.schedule import sps as sps_mod

    log = init_logger(__name__)
    mc = runner.vllm_config.model_config
    dev = runner.device
    device_name = (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                   else f"cpu-{os.cpu_count()}")
    key = dict(model=str(mc.model), dtype=str(mc.dtype), device_name=device_name,
               vllm_version=vllm.__version__)
    cached = sps_mod.load_cached(**key)
    if cached is not None:
        path = sps_mod.cache_path(**key)
        log.info("vllm-dspark: SPS profile from cache (%d sizes): %s", len(cached.b), path)
        return cached, f"from the cache {path}"
    if forward is None:
        def forward(b):
            return runner._dummy_run(b, skip_eplb=True)
    sc = runner.vllm_config.scheduler_config
    max_tokens = min(sc.max_num_batched_tokens, sc.max_num_seqs * (gamma + 1))
    capture = runner.vllm_config.compilation_config.cudagraph_capture_sizes
    graphs = dev.type == "cuda" and bool(capture) and not runner.model_config.enforce_eager
    if graphs:  # the captured sizes are the step function's breakpoints
        grid = sps_mod.default_grid(max(max_tokens, 2), capture)
        warmup, iters, sync = 3, 10, torch.cuda.synchronize
    else:
        # No graphs: time per step is smooth in B (interpolated, extrapolated past the
        # table), so powers of two up to 256 suffice and keep CPU start-up short.
        grid = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b <= max(max_tokens, 2)]
        warmup, iters = 1, 2
        sync = torch.cuda.synchronize if dev.type == "cuda" else None
    table = sps_mod.measure(forward, grid, warmup=warmup, iters=iters, sync=sync,
                            max_capture_size=max(capture) if graphs else None, **key)
    path = sps_mod.store(table)
    log.info("vllm-dspark: profiled SPS(B) at %d sizes -> %s", len(grid), path)
    return table, f"profiled at start-up, cached in {path}"


def build(runner, cfg: DSparkConfig, gamma: int,
          forward: Callable[[int], object] | None = None) -> VerificationScheduler:
    """The engine's scheduler, after warm-up (profiles SPS when asked to); ``gamma`` is
    the drafter's γ, ``forward`` as for ``profile_sps``."""
    from vllm.logger import init_logger

    settings = read_settings(cfg)
    sched = VerificationScheduler(settings)
    if settings.mode == "fixed":
        return sched
    if runner.vllm_config.scheduler_config.async_scheduling:
        init_logger(__name__).warning(
            "vllm-dspark: %s=%s needs per-request draft lengths, which vLLM's async "
            "scheduling does not allow; verifying all γ drafts (pass async_scheduling="
            "False to enable the scheduler).", SCHEDULER_ENV, settings.mode)
        sched.mode = "fixed"
        return sched
    sched.max_requests = runner.vllm_config.scheduler_config.max_num_seqs
    sched.gamma = gamma
    if settings.table is not None:
        table, sched.sps_source = settings.table, f"from {settings.sps} ({SPS_ENV})"
    else:
        table, sched.sps_source = _profile_sps(runner, gamma, forward)
    sched.set_sps(table)
    return sched
