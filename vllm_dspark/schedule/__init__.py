"""Confidence-scheduled verification (paper §3.2.2, §5.2), engine-free: plain torch.

``sps`` holds the target's profiled steps-per-second curve SPS(B); ``prefix``
turns calibrated confidences into per-request verification lengths.
"""

from vllm_dspark.schedule.prefix import (
    Schedule,
    admission_floor,
    async_schedule,
    capacity_budget,
    causal_schedule,
    causal_schedule_reference,
    fixed_schedule,
    survival,
    topk_schedule,
)
from vllm_dspark.schedule.sps import (
    SPSTable,
    cache_path,
    default_grid,
    load_cached,
    measure,
    store,
)

__all__ = [
    "SPSTable", "Schedule", "admission_floor", "async_schedule", "cache_path", "capacity_budget",
    "causal_schedule", "causal_schedule_reference", "default_grid", "fixed_schedule",
    "load_cached", "measure", "store", "survival", "topk_schedule",
]
