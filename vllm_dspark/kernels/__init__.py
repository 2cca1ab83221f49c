"""Kernels, each next to its torch reference (``ref.py``, the spec and the CPU path).

- ``tree_accept``: the acceptance walk over a draft tree (greedy, and T > 0 against a
  fixed candidate set), one Triton program per request.
"""
