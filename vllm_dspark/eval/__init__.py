"""Evaluation tools: acceptance (τ, per-position acceptance) measured through vLLM.

``vllm_dspark.eval.acceptance`` is the ``vllm-dspark eval`` subcommand; its
``evaluate(...)`` is the same measurement as a Python function.
"""
