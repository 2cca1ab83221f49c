"""Evaluation tools: acceptance (τ, per-position acceptance) measured through vLLM.

``vllm_dspark.eval.acceptance`` is the ``vllm-dspark eval`` subcommand; its
``evaluate(...)`` is the same measurement as a Python function. ``vllm_dspark.eval.tree``
decodes with draft trees through a plain HF target, engine-free (τ of trees against the
chain: ``benchmarks/tree_tau.py``).
"""
