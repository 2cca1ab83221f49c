"""The V2 runner's patches and budget manager (engine/v2/), on CPU: decisions and
bookkeeping without a GPU (tests/engine/test_v2.py runs them in engines on a GPU)."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import requires_vllm

pytestmark = requires_vllm


class _HF:
    def __init__(self, cfg):
        self._cfg = cfg

    def to_dict(self):
        return dict(self._cfg)


def _config(draft_dir, full_graphs=True, lora=None, pp=1):
    cfg = json.load(open(os.path.join(draft_dir, "config.json")))
    spec = SimpleNamespace(method="dspark", enable_adaptive_verification=False,
                           draft_model_config=SimpleNamespace(hf_config=_HF(cfg)))
    mode = SimpleNamespace(has_full_cudagraphs=lambda: full_graphs)
    return SimpleNamespace(speculative_config=spec, lora_config=lora,
                           compilation_config=SimpleNamespace(cudagraph_mode=mode),
                           parallel_config=SimpleNamespace(pipeline_parallel_size=pp,
                                                           enable_batch_sharded_sampling=False))


@pytest.mark.parametrize("env,graphs,want", [
    (None, True, False),  # unset: full-γ verification on V2 (measured faster)
    ("fixed", True, False), ("causal", True, True), ("async", True, True),
    ("causal", False, False),  # enforce_eager: no FULL graphs, the budget cannot run
])
def test_the_budget_follows_the_scheduler_knob(drafter_factory, monkeypatch, env, graphs, want):
    from vllm_dspark.engine.v2.patches import configure_budget

    if env is None:
        monkeypatch.delenv("VLLM_DSPARK_SCHEDULER", raising=False)
    else:
        monkeypatch.setenv("VLLM_DSPARK_SCHEDULER", env)
    cfg = _config(drafter_factory("qwen3", "gated"), full_graphs=graphs)
    cfg.speculative_config.enable_adaptive_verification = env == "fixed"  # user's setting
    configure_budget(cfg)
    assert cfg.speculative_config.enable_adaptive_verification is want


def test_the_budget_needs_a_confidence_head(drafter_factory, monkeypatch):
    from vllm_dspark.config import DSparkConfigError
    from vllm_dspark.engine.v2.patches import configure_budget

    monkeypatch.setenv("VLLM_DSPARK_SCHEDULER", "causal")
    cfg = _config(drafter_factory("qwen3", "vanilla", confidence=False))
    with pytest.raises(DSparkConfigError, match="confidence head"):
        configure_budget(cfg)


@pytest.mark.parametrize("env,rule", [("causal", "causal"), ("async", "global"), ("fixed", None)])
def test_the_worker_builds_our_speculator_and_budget_manager(drafter_factory, monkeypatch,
                                                            env, rule):
    from vllm.v1.worker.gpu import model_runner
    from vllm.v1.worker.gpu.spec_decode.dspark import speculator as upstream

    from vllm_dspark.engine.v2 import budget, patches
    from vllm_dspark.engine.v2.speculator import DSparkV2Speculator

    monkeypatch.setenv("VLLM_DSPARK_SCHEDULER", env)
    monkeypatch.setattr(upstream, "DSparkSpeculator", upstream.DSparkSpeculator)  # restored
    made = []
    monkeypatch.setattr(budget, "DSparkBudgetManager",
                        lambda *a, **kw: made.append((a, kw)) or "ours")
    calls = []

    def factory(**kwargs):  # stands in for vLLM's (which needs a GPU)
        calls.append(kwargs)
        return "upstream" if kwargs["enable_adaptive_verification"] else None

    monkeypatch.setattr(model_runner, "maybe_create_adaptive_verification_manager", factory)
    patches.point_v2_at_ours(_config(drafter_factory("qwen3", "rnn")))
    assert upstream.DSparkSpeculator is DSparkV2Speculator
    kw = dict(req_states="rs", query_start_loc="qsl", num_bonus_tokens=1, max_total_logits=9)
    got = model_runner.maybe_create_adaptive_verification_manager(
        enable_adaptive_verification=True, **kw)
    off = model_runner.maybe_create_adaptive_verification_manager(
        enable_adaptive_verification=False, **kw)
    assert off is None
    if rule is None:  # fixed: vLLM's factory untouched
        assert got == "upstream" and not made
    else:
        assert got == "ours" and made == [(("rs", "qsl", 1), {"max_total_logits": 9,
                                                              "rule": rule})]


def _manager(cls, rule=None, seed=0, reqs=6, gamma=7):
    """A budget manager with hand-made host state (its __init__ needs CUDA streams)."""
    rng = np.random.default_rng(seed)
    m = object.__new__(cls)
    if rule is not None:
        m.rule, m.last_budget = rule, None
    m.num_speculative_steps, m.num_bonus_tokens, m._max_total_logits = gamma, 1, 10_000
    m._stale_idx = 0
    conf = rng.uniform(0.2, 1.0, size=(16, gamma)).astype(np.float32)
    m._stale_confidences = [SimpleNamespace(np=conf), SimpleNamespace(np=conf * 0)]
    ids = [f"r{i}" for i in range(reqs)]
    m.req_states = SimpleNamespace(
        req_id_to_index={r: 2 * i for i, r in enumerate(ids)},
        num_computed_tokens_np=np.full(16, 100), prefill_len=SimpleNamespace(np=np.full(16, 50)))
    verify = 1.0 + 0.03 * np.arange(512) + rng.uniform(0, 0.05, 512)
    m.cost_tables = (np.full(64, 0.4), verify)
    drafts = {r: [0] * int(rng.integers(0, gamma + 1)) for r in ids}
    return m, {r: 1 + len(d) for r, d in drafts.items()}, drafts


@pytest.mark.parametrize("seed", range(8))
def test_the_budget_manager_keeps_vllms_bookkeeping(seed):
    """Rule "global" is vLLM's own decision: same token count, same stashed budget."""
    from vllm.v1.worker.gpu.spec_decode.adaptive_verification import (
        AdaptiveVerificationManager,
    )

    from vllm_dspark.engine.v2.budget import DSparkBudgetManager

    ours, tokens, drafts = _manager(DSparkBudgetManager, "global", seed)
    theirs, _, _ = _manager(AdaptiveVerificationManager, None, seed)
    assert ours.get_num_tokens(tokens, drafts) == theirs.get_num_tokens(tokens, drafts)
    assert ours._batch_budget == theirs._batch_budget
    # "causal" stops at the first non-improvement of the same path.
    causal, _, _ = _manager(DSparkBudgetManager, "causal", seed)
    n = causal.get_num_tokens(tokens, drafts)
    budget, scheduled = causal.last_budget
    assert n == len(tokens) + budget and budget <= scheduled
    # Θ rises strictly up to the causal stop, so the global first argmax is never before it.
    assert budget <= ours.last_budget[0]


@pytest.mark.parametrize("adaptive,env,says", [
    (False, None, "scheduler fixed (verify all γ)"),
    (True, "causal", "device-side budget, rule causal"),
    (True, "async", "device-side budget, rule global"),
    (True, None, "vLLM's adaptive verification (its own rule)"),
])
def test_the_v2_start_up_line_says_what_runs(drafter_factory, monkeypatch, adaptive, env, says):
    from vllm_dspark.config import DSparkConfig
    from vllm_dspark.engine.v2.speculator import DSparkV2Speculator

    if env is None:
        monkeypatch.delenv("VLLM_DSPARK_SCHEDULER", raising=False)
    else:
        monkeypatch.setenv("VLLM_DSPARK_SCHEDULER", env)
    draft = drafter_factory("qwen3", "gated")
    spec = _config(draft).speculative_config
    spec.enable_adaptive_verification, spec.draft_sample_method = adaptive, "probabilistic"
    stand_in = SimpleNamespace(speculative_config=spec, dspark=DSparkConfig.from_dir(draft),
                               num_speculative_steps=4)
    line = DSparkV2Speculator._describe_choice(stand_in)
    assert line.startswith("vllm-dspark: runner V2, γ=4, gated Markov head") and says in line
