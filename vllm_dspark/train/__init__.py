"""One-GPU DSpark drafter training (paper §3.3): data, blocks, objective, loop.

``data`` regenerates answers with the target through vLLM (Magpie-style prompts
by default), ``blocks`` turns sequences into anchored γ-blocks, ``objective``
holds the loss (eq. 9-12), ``trainer`` the loop with target hidden states
computed on the fly, ``cli`` the ``vllm-dspark train`` command.
"""
