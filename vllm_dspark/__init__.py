"""vllm-dspark: DSpark speculative decoding for vLLM.

The engine-free core (``model``, ``decode``, ``config``, ``checkpoint``) imports
only torch; everything touching vLLM internals lives in ``vllm_dspark.engine``.
"""

__version__ = "0.1.0"


def cache_root() -> str:
    """Where built targets and SPS tables are cached: ``$VLLM_DSPARK_CACHE``, default
    ``~/.cache/vllm-dspark``."""
    import os

    return os.environ.get("VLLM_DSPARK_CACHE") or os.path.expanduser("~/.cache/vllm-dspark")


def register() -> None:
    """vLLM ``general_plugins`` entry point: runs in every vLLM process, once. The
    plugin's loggers (``vllm_dspark.*``) then go through vLLM's logging setup."""
    from vllm_dspark import logs
    from vllm_dspark.engine.patches import apply_all

    logs.setup()
    apply_all()
