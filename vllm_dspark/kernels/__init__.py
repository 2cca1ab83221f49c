"""Kernels, each next to its torch reference (``ref.py``, the spec and the CPU path).

- ``tree_accept``: the acceptance walk over a draft tree (greedy, and T > 0 against a
  fixed candidate set), one Triton program per request.
- ``tree_attention``: a draft tree's verification attention over vLLM's paged KV cache
  (context + ancestors, never other branches), one Triton program per query row and head.
- ``kv_compact``: after verification, the root's and the accepted path's K/V into the
  request's contiguous slots, in place, one Triton program per request and KV head.
"""
