"""KV compaction after tree verification: the root's and the accepted path's K/V into
the request's contiguous cache slots, in place (``ref.py`` is the spec).

``compact_kv`` (one layer) and ``compact_kv_layers`` (every layer of a step, one
launch) run the Triton kernel where they can (a GPU, or ``TRITON_INTERPRET=1``) and the
torch reference otherwise.
"""

from vllm_dspark.kernels.kv_compact.kernel import (available, compact_kv_layers_triton,
                                                   compact_kv_triton, layer_offsets)
from vllm_dspark.kernels.kv_compact.ref import compact_kv_ref


def compact_kv(k_cache, v_cache, block_table, context_lens, kept, num_kept,
               check: bool = True) -> None:
    """``check=False`` skips the Triton path's input checks (host read-backs); the
    reference always checks."""
    args = (k_cache, v_cache, block_table, context_lens, kept, num_kept)
    if available(k_cache.device):
        return compact_kv_triton(*args, check=check)
    return compact_kv_ref(*args)


def compact_kv_layers(kv_views, block_table, context_lens, kept, num_kept,
                      offsets=None, check: bool = True) -> None:
    """``compact_kv`` on each layer's (K, V) in ``kv_views``, which share every other
    input: one launch on the Triton path (``offsets``: ``layer_offsets(kv_views)``,
    kept by a caller that compacts the same caches every step)."""
    if kv_views and available(kv_views[0][0].device):
        return compact_kv_layers_triton(kv_views, block_table, context_lens, kept,
                                        num_kept, offsets=offsets, check=check)
    for k, v in kv_views:
        compact_kv_ref(k, v, block_table, context_lens, kept, num_kept)


__all__ = ["available", "compact_kv", "compact_kv_layers", "compact_kv_layers_triton",
           "compact_kv_ref", "compact_kv_triton", "layer_offsets"]
