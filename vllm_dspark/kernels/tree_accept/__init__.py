"""The acceptance walk over a draft tree: greedy, and T > 0 with a fixed candidate set.

``tree_accept`` runs the Triton kernel where it can (a GPU, or ``TRITON_INTERPRET=1``)
and the vectorised torch reference otherwise; both return a
``decode.tree_verify.TreeVerdict`` and draw the same tokens from the same noise.
``walk_draws`` is the same walk over draws made beforehand (V2 draws every tree row
in one sampler call), kernel or ``decode.tree_verify.walk_draws``.
Sampled children (recursive rejection) stay in ``decode.tree_verify`` for now.
"""

from vllm_dspark.decode.tree_verify import walk_draws as walk_draws_ref
from vllm_dspark.kernels.tree_accept.kernel import (available, tree_accept_triton,
                                                    walk_draws_triton)
from vllm_dspark.kernels.tree_accept.ref import tree_accept_ref


def tree_accept(logits, tokens, parents, admitted, temperature, gumbel=None):
    """See ``ref.tree_accept_ref`` for the contract."""
    if available(logits.device):
        return tree_accept_triton(logits, tokens, parents, admitted, temperature, gumbel)
    return tree_accept_ref(logits, tokens, parents, admitted, temperature, gumbel)


def walk_draws(draws, tokens, parents, admitted):
    """The walk over draws made beforehand (V2's tree step): see
    ``decode.tree_verify.walk_draws``, its torch reference."""
    if available(tokens.device):
        return walk_draws_triton(draws, tokens, parents, admitted)
    return walk_draws_ref(draws, tokens, parents, admitted)


__all__ = ["available", "tree_accept", "tree_accept_ref", "tree_accept_triton", "walk_draws",
           "walk_draws_ref", "walk_draws_triton"]
