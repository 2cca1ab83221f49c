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


def _set_env(monkeypatch, name, value):
    """Set ``name`` to ``value``, or unset it for None (restored after the test)."""
    if value is None:
        monkeypatch.delenv(name, raising=False)
    else:
        monkeypatch.setenv(name, value)


def _config(draft_dir, full_graphs=True, lora=None, pp=1, mode=None):
    from vllm.config.compilation import CUDAGraphMode

    cfg = json.load(open(os.path.join(draft_dir, "config.json")))
    spec = SimpleNamespace(method="dspark", enable_adaptive_verification=False,
                           draft_model_config=SimpleNamespace(hf_config=_HF(cfg)))
    if mode is None:  # vLLM's default with FULL graphs, or PIECEWISE only
        mode = CUDAGraphMode.FULL_AND_PIECEWISE if full_graphs else CUDAGraphMode.PIECEWISE
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

    _set_env(monkeypatch, "VLLM_DSPARK_SCHEDULER", env)
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


@pytest.mark.parametrize("adaptive,env,cost,says", [
    (False, None, "0", "scheduler fixed (verify all γ), draft gate off"),
    (True, "causal", "0", "device-side budget, rule causal"),
    (True, "async", "0", "device-side budget, rule global"),
    (True, None, "0", "vLLM's adaptive verification (its own rule)"),
    (False, None, None, "scheduler fixed (verify all γ), draft gate on"),  # the default
    (False, None, "measure", "scheduler fixed (verify all γ), draft gate on"),
    (False, "fixed", None, "scheduler fixed (verify all γ), draft gate off"),
])
def test_the_v2_start_up_line_says_what_runs(drafter_factory, monkeypatch, adaptive, env, cost,
                                             says):
    from vllm_dspark.config import DSparkConfig
    from vllm_dspark.engine.v2.patches import configure_gate
    from vllm_dspark.engine.v2.speculator import DSparkV2Speculator

    _set_env(monkeypatch, "VLLM_DSPARK_SCHEDULER", env)
    _set_env(monkeypatch, "VLLM_DSPARK_DRAFT_COST", cost)
    draft = drafter_factory("qwen3", "gated")
    cfg = _gate_config(draft)
    spec = cfg.speculative_config
    spec.enable_adaptive_verification, spec.draft_sample_method = adaptive, "probabilistic"
    configure_gate(cfg)  # as at start-up: the gate's draft-count schedule, where it runs
    stand_in = SimpleNamespace(speculative_config=spec, dspark=DSparkConfig.from_dir(draft),
                               num_speculative_steps=4, vllm_config=cfg)
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
        tree_spec=None,
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


def _gate_config(draft_dir, max_num_seqs=8, schedule=None, v2=True):
    cfg = _config(draft_dir)
    cfg.use_v2_model_runner = v2
    cfg.speculative_config.num_speculative_tokens = 4
    cfg.speculative_config.num_speculative_tokens_per_batch_size = schedule
    cfg.scheduler_config = SimpleNamespace(max_num_seqs=max_num_seqs)
    return cfg


TIERS = [(1, 1, 4), (2, 8, 0)]


@pytest.mark.parametrize("env,v2,other,want", [
    ("measure", True, {}, TIERS),
    (None, True, {}, TIERS),  # unset, with a confidence head: on (the default, as on V1)
    (None, True, {"confidence": False}, None),  # no confidence head: off, as on V1
    (None, True, {"VLLM_DSPARK_SCHEDULER": "fixed"}, None),  # fixed γ: off, as on V1
    ("measure", True, {"VLLM_DSPARK_SCHEDULER": "fixed"}, TIERS),  # asked: on
    (None, True, {"VLLM_DSPARK_TREE": "on"}, None),  # draft trees: off
    ("0", True, {}, None),  # a fixed drafting time never gates
    ("measure", False, {}, None),  # V1: the worker's gate (engine/v1)
])
def test_the_v2_gate_names_both_draft_counts(drafter_factory, monkeypatch, env, v2, other,
                                             want):
    from vllm_dspark.engine.v2.patches import configure_gate, gate_in_effect

    _set_env(monkeypatch, "VLLM_DSPARK_DRAFT_COST", env)
    for name in ("VLLM_DSPARK_SCHEDULER", "VLLM_DSPARK_TREE"):
        _set_env(monkeypatch, name, other.get(name))
    draft = drafter_factory("qwen3", "vanilla", **({"confidence": False}
                                                   if other.get("confidence") is False else {}))
    cfg = _gate_config(draft, v2=v2)
    configure_gate(cfg)
    assert cfg.speculative_config.num_speculative_tokens_per_batch_size == want
    assert gate_in_effect(cfg) is (want is not None)


def test_a_users_draft_count_schedule_wins_over_the_default_gate(drafter_factory,
                                                                 monkeypatch):
    from vllm_dspark.engine.v2.patches import configure_gate, gate_in_effect

    monkeypatch.delenv("VLLM_DSPARK_DRAFT_COST", raising=False)
    cfg = _gate_config(drafter_factory("qwen3", "vanilla"), schedule=[(1, 8, 2)])
    configure_gate(cfg)
    assert cfg.speculative_config.num_speculative_tokens_per_batch_size == [(1, 8, 2)]
    assert not gate_in_effect(cfg)


def test_a_bad_draft_cost_is_one_error_on_v2(drafter_factory, monkeypatch):
    from vllm_dspark.config import DSparkConfigError
    from vllm_dspark.engine.v2.patches import configure_gate

    monkeypatch.setenv("VLLM_DSPARK_DRAFT_COST", "fast")
    cfg = _gate_config(drafter_factory("qwen3", "vanilla"))
    with pytest.raises(DSparkConfigError, match="VLLM_DSPARK_DRAFT_COST='fast'.*measure"):
        configure_gate(cfg)


def test_the_v2_gate_refuses_a_users_draft_count_schedule(drafter_factory, monkeypatch):
    from vllm_dspark.config import DSparkConfigError
    from vllm_dspark.engine.v2.patches import configure_gate

    monkeypatch.setenv("VLLM_DSPARK_DRAFT_COST", "measure")
    cfg = _gate_config(drafter_factory("qwen3", "vanilla"), schedule=[(1, 8, 2)])
    with pytest.raises(DSparkConfigError, match="num_speculative_tokens_per_batch_size"):
        configure_gate(cfg)


class _Scripted:
    """A DraftGate that answers a script and records what it is told."""

    def __init__(self, answers):
        self.answers, self.samples = list(answers), []

    def decide(self, requests):
        return self.answers.pop(0)

    def observe(self, requests, drafted, tokens, seconds):
        self.samples.append((requests, drafted, tokens))


@pytest.mark.parametrize("cost", ["measure", None])  # asked for, and the default
def test_vllms_scheduler_drafts_what_the_v2_gate_says(corrupted_oracle_pair, monkeypatch, cost):
    """vLLM's own (async) scheduler, driven step by step with made-up outputs: the gate
    answers its draft-count lookup, the next step schedules that many draft slots per
    request, only steps between equal decisions are timed, and the step stats carry
    the gate's decisions and the scheduled draft lengths (the V2 metrics). The same with
    the knob unset: the draft has a confidence head, so the gate is the default."""
    import torch
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import Request
    from vllm.v1.structured_output import StructuredOutputManager

    from vllm_dspark.engine import metrics
    from vllm_dspark.engine.patches import apply_all
    from vllm_dspark.engine.v2.patches import configure_gate
    from vllm_dspark.schedule.scheduler_gate import SchedulerGate

    apply_all()
    _set_env(monkeypatch, "VLLM_DSPARK_DRAFT_COST", cost)
    target, draft = corrupted_oracle_pair
    cfg = EngineArgs(model=target, enforce_eager=True, max_model_len=256, max_num_seqs=8,
                     enable_prefix_caching=False,
                     speculative_config={"method": "dspark", "model": draft,
                                         "num_speculative_tokens": 3}).create_engine_config()
    # This box runs V1; from here on vLLM sees the V2 runner, as on a GPU.
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    configure_gate(cfg)
    assert cfg.speculative_config.num_speculative_tokens_per_batch_size == [(1, 1, 3),
                                                                           (2, 8, 0)]
    cfg.cache_config.num_gpu_blocks = 64
    kv = KVCacheConfig(num_blocks=64, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(
        ["layer"], FullAttentionSpec(block_size=16, num_kv_heads=1, head_size=8,
                                     dtype=torch.float32))])
    sched = AsyncScheduler(vllm_config=cfg, kv_cache_config=kv, block_size=16,
                           structured_output_manager=StructuredOutputManager(cfg),
                           log_stats=True)
    assert isinstance(sched.dynamic_sd_lookup, SchedulerGate)
    # Decisions the gate makes (a switch is held one more step): draft, skip, draft.
    script = _Scripted([True, True, False, True, True])
    sched._dspark_gate.gate = script
    for i in range(3):
        sched.add_request(Request(f"r{i}", prompt_token_ids=list(range(1, 20)),
                                  sampling_params=SamplingParams(max_tokens=40, temperature=0),
                                  pooling_params=None))
    ks, slots, payloads = [], [], []
    for _ in range(8):
        out = sched.schedule()
        ks.append(out.num_spec_tokens_to_schedule)
        slots.append(sorted({len(v) for v in out.scheduled_spec_decode_tokens.values()}))
        ids = list(out.num_scheduled_tokens)
        result = ModelRunnerOutput(
            req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
            sampled_token_ids=[[7] * (1 + len(out.scheduled_spec_decode_tokens.get(r, ())))
                               for r in ids])
        eco = sched.update_from_output(out, result)
        stats = next(o.scheduler_stats for o in eco.values() if o.scheduler_stats)
        payloads.append((stats.kv_connector_stats or {}).get(metrics.PAYLOAD_KEY))
    # decide(draft) → 3, held 3; decide(draft) → 3; decide(skip) → 0, held 0; draft → 3, 3; …
    assert ks == [3, 3, 3, 0, 0, 3, 3, 3]
    assert slots == [[]] + [[k] if k else [] for k in ks[:-1]]
    # Timed: the steps whose predecessor drafted as they do (not the prefill, not a switch).
    drafted, plain = (3, True, 12), (3, False, 3)
    assert script.samples == [drafted, drafted, plain, drafted, drafted]
    assert [p.get("drafted", 0) - p.get("skipped", 0) for p in payloads] == [
        1 if k else -1 for k in ks]
    assert [p.get("admitted") for p in payloads[1:]] == [
        [0, 0, 0, 3] if k else [3, 0, 0, 0] for k in ks[:-1]]


def test_tree_mode_keeps_the_drafters_full_graphs(monkeypatch):
    """Tree mode gives the target PIECEWISE graphs; upstream's drafter would then draft
    eagerly. Ours asks for FULL decode graphs of the draft step in tree mode, and leaves
    every other mode as vLLM chose it."""
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.spec_decode.dspark.speculator import DSparkSpeculator

    from vllm_dspark.decode.tree import TreeSpec
    from vllm_dspark.engine.v2.speculator import DSparkV2Speculator

    seen = []
    monkeypatch.setattr(DSparkSpeculator, "init_cudagraph_manager",
                        lambda self, mode: seen.append(mode))
    sp = object.__new__(DSparkV2Speculator)
    for tree in (TreeSpec(budget=4), None):
        sp.tree_spec = tree
        for mode in (CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_AND_PIECEWISE,
                     CUDAGraphMode.NONE):
            sp.init_cudagraph_manager(mode)
    P, F, N = CUDAGraphMode.PIECEWISE, CUDAGraphMode.FULL_AND_PIECEWISE, CUDAGraphMode.NONE
    assert seen == [F, F, N, P, F, N]
    assert seen[0].decode_mode() == CUDAGraphMode.FULL  # what upstream's drafter reads


def test_a_step_without_drafts_stores_context_and_drafts_nothing(monkeypatch):
    """K = 0 (the gate skipped): upstream's preparation runs on its eager path, which
    stores the drafter's context K/V, and neither the draft itself (``_generate_draft``)
    nor its attention metadata is built; a step with drafts, and the graph capture's
    dummy runs, draft as upstream."""
    from vllm.v1.worker.gpu.spec_decode.dspark.speculator import DSparkSpeculator

    from vllm_dspark.engine.v2.speculator import DSparkV2Speculator

    calls = []

    def upstream_propose(self, input_batch, *args, **kwargs):
        calls.append(("propose", kwargs.get("is_profile", False)))
        meta = self._build_uniform_attn_metadata(num_reqs=input_batch.num_reqs)
        self._generate_draft(input_batch.num_reqs, 8, meta, None, None)
        return "drafts"

    monkeypatch.setattr(DSparkSpeculator, "propose", upstream_propose)
    monkeypatch.setattr(DSparkSpeculator, "_generate_draft",
                        lambda self, *a, **kw: calls.append(("draft",)))
    # The draft query's metadata: built only where a draft forward reads it.
    monkeypatch.setattr(DSparkSpeculator, "_build_uniform_attn_metadata",
                        lambda self, **kw: calls.append(("metadata",)) or "meta")
    sp = object.__new__(DSparkV2Speculator)
    sp._context_only, sp._trace_path, sp.tree_spec = False, None, None
    batch = SimpleNamespace(num_reqs=2)
    assert sp.propose(batch, num_speculative_tokens=0) == "drafts"
    assert calls == [("propose", True)] and sp._context_only is False
    calls.clear()
    sp.propose(batch, num_speculative_tokens=4)
    sp.propose(batch, num_speculative_tokens=0, dummy_run=True)
    assert calls == [("propose", False), ("metadata",), ("draft",)] * 2


def test_the_v2_gate_survives_the_draft_config_copy(corrupted_oracle_pair, monkeypatch):
    """Upstream's draft loader copies the engine's VllmConfig (``config.utils.replace``),
    which validates the copy again, the gate's hook included. The copy holds the gate's
    own schedule: that is not a user's schedule to refuse (on an H100 on 2026-12-07
    every gated V2 engine failed to start here)."""
    from vllm.config import VllmConfig
    from vllm.config.utils import replace
    from vllm.engine.arg_utils import EngineArgs

    from vllm_dspark.engine.patches import apply_all
    from vllm_dspark.engine.v2.patches import configure_gate

    apply_all()
    monkeypatch.setenv("VLLM_DSPARK_DRAFT_COST", "measure")
    target, draft = corrupted_oracle_pair
    cfg = EngineArgs(model=target, enforce_eager=True, max_model_len=256, max_num_seqs=8,
                     speculative_config={"method": "dspark", "model": draft,
                                         "num_speculative_tokens": 3}).create_engine_config()
    monkeypatch.setattr(VllmConfig, "use_v2_model_runner", property(lambda self: True))
    monkeypatch.setattr("vllm.config.vllm.HAS_TRITON", True)  # as on a GPU (V2's check)
    configure_gate(cfg)
    copy = replace(cfg, parallel_config=cfg.parallel_config)
    assert [tuple(t) for t in copy.speculative_config.num_speculative_tokens_per_batch_size] \
        == [(1, 1, 3), (2, 8, 0)]


@pytest.mark.parametrize("head", ["vanilla", "gated", "rnn"])
def test_the_v2_sequential_stage_drafts_decode_trees_tree(head):
    """Tree mode of our ``_sample_sequential`` (issue 17): the γ best nodes of the block's
    tree, as ``decode.tree.draft_tree`` builds them from the same backbone output, each
    row at its request's temperature; the node structure lands beside the tokens."""
    import torch

    from vllm_dspark.config import DSparkConfigError
    from vllm_dspark.decode.tree import TreeSpec, draft_tree

    sp, head_hidden, reqs = _sequential_stand_in(head, torch.float32, adaptive=False)
    gamma = sp.num_speculative_steps
    sts = [0.9, 1.2, 1.0]
    sp.dspark = SimpleNamespace(sts_temperatures=sts)
    sp.temperature = torch.tensor([0.0, 1.0, 0.7]).repeat_interleave(gamma)  # by req state
    with pytest.raises(DSparkConfigError, match="node budget"):
        sp.enable_tree(TreeSpec(budget=gamma + 1))
    sp.enable_tree(TreeSpec(budget=gamma))
    with torch.no_grad():
        sp._sample_sequential(reqs, head_hidden)
        hidden = head_hidden[sp.sample_indices].view(reqs, gamma, -1)
        base = sp.model.compute_draft_logits(hidden)
        anchor = sp.input_buffers.input_ids[:reqs]
        want = draft_tree(base, hidden, anchor, torch.tensor([0.0, 1.0, 0.7]),
                          sp.model.markov_head, sp.model.confidence_head, sts,
                          TreeSpec(budget=gamma))
    assert torch.equal(sp.draft_tokens[:reqs], want.tokens)
    assert torch.equal(sp.tree_parents[:reqs], want.parents)
    assert torch.equal(sp.tree_depth[:reqs], want.depth)
    from vllm_dspark.decode.tree_attention import ancestor_mask

    # The ancestor masks the target's tree step reads, built in the draft step.
    assert torch.equal(sp.tree_mask[:reqs], ancestor_mask(want.parents))
    assert bool((want.sibling > 0).any()), "the case should branch somewhere"
    assert (sp.draft_token_confidence_probs == -1).all()  # no budget: none computed


@pytest.mark.parametrize("value,want", [(None, False), ("off", False), ("", False),
                                        ("on", True), ("ON", True), ("1", True)])
def test_the_tree_knob(monkeypatch, value, want):
    from vllm_dspark.engine.v2.patches import tree_mode

    _set_env(monkeypatch, "VLLM_DSPARK_TREE", value)
    assert tree_mode() is want


def test_a_bad_tree_knob_is_one_clear_error(monkeypatch):
    from vllm_dspark.config import DSparkConfigError
    from vllm_dspark.engine.v2.patches import tree_mode

    monkeypatch.setenv("VLLM_DSPARK_TREE", "auto")
    with pytest.raises(DSparkConfigError, match="VLLM_DSPARK_TREE='auto'.*off.*on"):
        tree_mode()


@pytest.mark.parametrize("case,match", [
    ("budget", "verification budget"), ("gate", "draft gate"),
    ("full_mixed", "FULL_AND_PIECEWISE"), ("pp", "pipeline"), ("ok", None),
    ("full_decode", None), ("knob_off", None)])
def test_tree_mode_refuses_what_it_cannot_run_with(drafter_factory, monkeypatch, case, match):
    """FULL graphs of uniform decode batches (vLLM's default FULL_AND_PIECEWISE, and
    FULL_DECODE_ONLY) run with trees; FULL graphs of mixed batches do not."""
    from vllm.config.compilation import CUDAGraphMode

    from vllm_dspark.config import DSparkConfigError
    from vllm_dspark.engine.v2.patches import configure_tree

    monkeypatch.setenv("VLLM_DSPARK_TREE", "off" if case == "knob_off" else "on")
    _set_env(monkeypatch, "VLLM_DSPARK_DRAFT_COST", "measure" if case == "gate" else None)
    mode = {"full_mixed": CUDAGraphMode.FULL, "knob_off": CUDAGraphMode.FULL,
            "full_decode": CUDAGraphMode.FULL_DECODE_ONLY, "ok": CUDAGraphMode.PIECEWISE}
    cfg = _config(drafter_factory("qwen3", "vanilla"), mode=mode.get(case),
                  pp=2 if case == "pp" else 1)
    cfg.speculative_config.enable_adaptive_verification = case == "budget"
    if match is None:
        configure_tree(cfg)
    else:
        with pytest.raises(DSparkConfigError, match=match):
            configure_tree(cfg)


def test_the_tree_patch_is_installed_only_when_asked(monkeypatch):
    """Off (the default) the tree patch wraps nothing; on, it wraps the runner's
    prepare_attn / execute_model / sample, FlashAttention's forward and the rejection
    sampler's chain walk, each once."""
    from vllm.v1.attention.backends.flash_attn import FlashAttentionImpl
    from vllm.v1.worker.gpu import model_runner
    from vllm.v1.worker.gpu.spec_decode import rejection_sampler

    from vllm_dspark.engine.v2.patches import verify_trees_on_v2

    targets = [(model_runner.GPUModelRunner, "prepare_attn"),
               (model_runner.GPUModelRunner, "execute_model"),
               (model_runner.GPUModelRunner, "sample"), (FlashAttentionImpl, "forward"),
               (rejection_sampler, "rejection_sample")]
    for obj, name in targets:  # undone after the test
        monkeypatch.setattr(obj, name, getattr(obj, name))
    monkeypatch.delenv("VLLM_DSPARK_TREE", raising=False)
    verify_trees_on_v2()
    assert not any(getattr(getattr(o, n), "_dspark_wraps", ()) and any(
        "verify_trees" in w or "with_tree_rows" in w for w in getattr(o, n)._dspark_wraps)
        for o, n in targets)
    monkeypatch.setenv("VLLM_DSPARK_TREE", "on")
    verify_trees_on_v2()
    verify_trees_on_v2()  # idempotent
    for obj, name in targets:
        wraps = getattr(obj, name)._dspark_wraps
        assert sum("verify_trees" in w or "with_tree_rows" in w for w in wraps) == 1, name
