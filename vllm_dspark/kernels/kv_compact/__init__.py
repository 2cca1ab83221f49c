"""KV compaction after tree verification: the root's and the accepted path's K/V into
the request's contiguous cache slots, in place (``ref.py`` is the spec).

``compact_kv`` runs the Triton kernel where it can (a GPU, or ``TRITON_INTERPRET=1``)
and the torch reference otherwise.
"""

from vllm_dspark.kernels.kv_compact.kernel import available, compact_kv_triton
from vllm_dspark.kernels.kv_compact.ref import compact_kv_ref


def compact_kv(k_cache, v_cache, block_table, context_lens, kept, num_kept,
               check: bool = True) -> None:
    """``check=False`` skips the Triton path's input checks (host read-backs); the
    reference always checks."""
    args = (k_cache, v_cache, block_table, context_lens, kept, num_kept)
    if available(k_cache.device):
        return compact_kv_triton(*args, check=check)
    return compact_kv_ref(*args)


__all__ = ["available", "compact_kv", "compact_kv_ref", "compact_kv_triton"]
