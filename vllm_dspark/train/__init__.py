"""One-GPU DSpark drafter training (paper §3.3): data, blocks, objective, loop.

``data`` regenerates answers with the target through vLLM (Magpie-style prompts
by default) into compressed parts that ``dataset`` writes and reads, ``proc`` lets
the generator leave without waiting on the engine's shutdown, ``blocks`` turns
sequences into anchored γ-blocks, ``objective`` holds the loss (eq. 9-12),
``trainer`` the loop with target hidden states computed on the fly (exact resume,
or a warm restart from the bf16 export), ``cli`` the ``vllm-dspark train`` command.
"""
