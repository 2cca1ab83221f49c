"""The only package that touches vLLM internals (pinned to vLLM 0.32; see PATCHES.md)."""
