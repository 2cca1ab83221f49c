"""Tiny models: one thread is faster than two on a shared 2-core box (no oversubscription
with engine processes), and the setting is restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def qwen3_target(models_dir):
    """(path, HF model in float64) of a tiny random Qwen3: float64 so that a tree-masked
    pass and a sequential one agree to 1e-9 and argmax ties cannot flip."""
    import os

    from transformers import AutoModelForCausalLM

    from tiny_models import make_target

    path = make_target(os.path.join(models_dir, "tree-qwen3"), "qwen3", seed=5)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
