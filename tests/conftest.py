"""Shared fixtures: tiny models built once per test session (no model hub needed)."""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "engine"))

from tiny_models import make_drafter, make_oracle_pair, make_target  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def _has_vllm() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:
        return False
    return True


requires_vllm = pytest.mark.skipif(not _has_vllm(), reason="vLLM is not installed")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def targets(models_dir):
    return {fam: make_target(os.path.join(models_dir, fam), fam, seed=i)
            for i, fam in enumerate(("qwen3", "llama"))}


@pytest.fixture(scope="session")
def drafter_factory(models_dir, targets):
    made = {}

    def make(family: str, head_type: str, **kw):
        key = (family, head_type, tuple(sorted(kw.items())))
        if key not in made:
            path = os.path.join(models_dir, f"draft-{family}-{head_type}-{len(made)}")
            make_drafter(targets[family], path, head_type=head_type, **kw)
            made[key] = path
        return made[key]

    return make


@pytest.fixture(scope="session")
def oracle_pair(models_dir):
    return make_oracle_pair(models_dir, "qwen3", corrupt_fraction=0.0)


@pytest.fixture(scope="session")
def corrupted_oracle_pair(models_dir):
    return make_oracle_pair(models_dir, "qwen3", corrupt_fraction=0.35)


@pytest.fixture(scope="session")
def smollm2_target():
    """SmolLM2-135M-Instruct as an HF directory, built from the PyPI wheel.

    Built once per machine, not per session: it lands in the default cache
    ($VLLM_DSPARK_CACHE or ~/.cache/vllm-dspark) and later sessions reuse it.
    Set VLLM_DSPARK_SMOLLM2_GGUF to a local GGUF file to skip the download.
    """
    from vllm_dspark.targets import build_smollm2

    return build_smollm2()


@pytest.fixture
def one_thread():
    """Tiny models: one thread is faster than two on a shared 2-core box (no
    oversubscription with engine processes); restored after the test."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread_for_tree_tests(request):
    """Every test in tests/decode runs ``one_thread``. (Here, not in a
    tests/decode/conftest.py: a second conftest module would shadow this one for every
    ``from conftest import ...``.)"""
    if request.node.path.parent.name == "decode":
        request.getfixturevalue("one_thread")
    yield


@pytest.fixture(scope="session")
def qwen3_target(models_dir):
    """(path, HF model in float64) of a tiny random Qwen3: float64 so that a tree-masked
    pass and a sequential one agree to 1e-9 and argmax ties cannot flip."""
    import torch
    from transformers import AutoModelForCausalLM

    path = make_target(os.path.join(models_dir, "tree-qwen3"), "qwen3", seed=5)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()


def pytest_runtest_logreport(report):
    """With $VLLM_DSPARK_FAILURE_DIR set (the GPU runs), each failure's report is written
    the moment the test fails: a run cut short at the machine's time limit still leaves
    why (pytest itself prints the tracebacks only at the end of the session)."""
    where = os.environ.get("VLLM_DSPARK_FAILURE_DIR")
    if not where or not report.failed:
        return
    os.makedirs(where, exist_ok=True)
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in report.nodeid)[-150:]
    with open(os.path.join(where, f"{name}.{report.when}.txt"), "w") as f:
        f.write(f"{report.nodeid} ({report.when})\n\n{report.longreprtext}\n")
        for title, text in report.sections:
            f.write(f"\n--- {title} ---\n{text[-20000:]}\n")
