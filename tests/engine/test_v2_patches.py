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


def _sequential_stand_in(head, dtype, adaptive, seed=0, reqs=3, gamma=5, vocab=64, hidden=16):
    """A DSparkV2Speculator without __init__: just what ``_sample_sequential`` reads, with
    our heads on a random backbone output, greedy drafts (upstream's argmax path)."""
    import torch

    from vllm_dspark.engine.v2.speculator import DSparkV2Speculator
    from vllm_dspark.model.confidence_head import ConfidenceHead
    from vllm_dspark.model.markov_head import build_markov_head

    torch.manual_seed(seed)
    markov = build_markov_head(head, vocab_size=vocab, rank=8, hidden_size=hidden).to(dtype)
    conf = ConfidenceHead(hidden_size=hidden, markov_rank=8, with_markov=True).to(dtype)
    lm = torch.nn.Linear(hidden, vocab, bias=False).to(dtype)
    sp = object.__new__(DSparkV2Speculator)
    n = reqs * gamma
    sp.__dict__.update(
        num_speculative_steps=gamma, draft_logits=None, acceptance_estimator=None,
        _step_cols=[torch.tensor(k) for k in range(gamma)],
        model=SimpleNamespace(markov_head=markov, confidence_head=conf,
                              compute_draft_logits=lm, map_draft_to_target=lambda ids: ids),
        use_confidence_head=adaptive, sts=torch.tensor([0.5 + 0.25 * k for k in range(gamma)]),
        sample_indices=torch.randperm(n + 4)[:n], sample_idx_mapping=torch.arange(n),
        sample_pos=torch.arange(n), _anchor_idx=torch.arange(reqs),
        input_buffers=SimpleNamespace(input_ids=torch.randint(0, vocab, (reqs + 2,))),
        draft_tokens=torch.zeros(reqs + 1, gamma, dtype=torch.long),
        draft_token_confidence_probs=torch.full((reqs + 1, gamma), -1.0))
    head_hidden = torch.randn(n + 4, hidden, dtype=dtype)
    return sp, head_hidden, reqs


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_v2_sequential_stage_drafts_greedily_with_batched_confidences(head, dtype):
    """Our ``_sample_sequential``: each token is the argmax of the backbone's logits plus
    the head's bias from the token before (teacher-forced over the drafted block), and
    the confidences of the batched pass equal ``position_confidence`` per position; with
    a fixed γ (no budget, no trace) no confidence is computed at all."""
    import torch

    from vllm_dspark.decode.draft import position_confidence

    dt = getattr(torch, dtype)
    sp, head_hidden, reqs = _sequential_stand_in(head, dt, adaptive=True)
    gamma = sp.num_speculative_steps
    with torch.no_grad():
        sp._sample_sequential(reqs, head_hidden)
        hidden = head_hidden[sp.sample_indices].view(reqs, gamma, -1)
        base = sp.model.compute_draft_logits(hidden)
        anchor = sp.input_buffers.input_ids[:reqs]
        drafts = sp.draft_tokens[:reqs]
        prevs = torch.cat([anchor[:, None], drafts[:, :-1]], dim=1)
        corrected = sp.model.markov_head.block_logits(base, prevs, hidden)
        assert torch.equal(corrected.argmax(-1), drafts)
        want = torch.stack([position_confidence(sp.model.confidence_head, sp.model.markov_head,
                                                hidden[:, k], prevs[:, k], float(sp.sts[k]))
                            for k in range(gamma)], dim=1)
        torch.testing.assert_close(sp.draft_token_confidence_probs[:reqs], want)
        assert (sp.draft_token_confidence_probs[reqs:] == -1).all()  # rows past num_reqs

        fixed, head_hidden, reqs = _sequential_stand_in(head, dt, adaptive=False)
        fixed._sample_sequential(reqs, head_hidden)
        assert torch.equal(fixed.draft_tokens, sp.draft_tokens)  # same seed: same drafts
        assert (fixed.draft_token_confidence_probs == -1).all()
