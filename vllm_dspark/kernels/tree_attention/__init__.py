"""Tree attention over vLLM's paged KV cache: each tree node attends to the cached
context, its ancestors and itself (``decode.tree_attention`` builds the mask).

``tree_attention`` runs the Triton kernel where it can (a GPU, or ``TRITON_INTERPRET=1``)
and the torch reference otherwise.
"""

from vllm_dspark.kernels.tree_attention.kernel import available, tree_attention_triton
from vllm_dspark.kernels.tree_attention.ref import tree_attention_ref


def tree_attention(q, k_cache, v_cache, block_table, context_lens, query_start, tree_mask,
                   scale, check: bool = True):
    """See ``ref.tree_attention_ref`` for the contract. ``check=False`` skips the Triton
    path's input checks, which read values back to the host (the reference, a host loop
    anyway, always checks)."""
    args = (q, k_cache, v_cache, block_table, context_lens, query_start, tree_mask, scale)
    if available(q.device):
        return tree_attention_triton(*args, check=check)
    return tree_attention_ref(*args)


__all__ = ["available", "tree_attention", "tree_attention_ref", "tree_attention_triton"]
