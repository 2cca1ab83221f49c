"""The plugin's own Prometheus metrics, and how their numbers reach the frontend.

Exported next to vLLM's, in the process that serves ``/metrics`` and answers
``LLM.get_metrics()`` (the API server / ``LLM``'s process; both read the
``vllm:``-prefixed collectors of prometheus_client's registry), for method dspark.
Labels ``model_name`` and ``engine`` as vLLM's:

- ``vllm:dspark_verified_tokens_per_request_step`` (histogram, buckets 0..γ): per
  request and step, the draft tokens the verification scheduler admitted (ℓ_r, the
  length of the draft the proposer handed vLLM's scheduler; γ without a scheduler, 0
  when the gate skipped). vLLM may verify fewer (it trims drafts at the model length
  or the token budget); its ``spec_decode_num_draft_tokens`` counts what it verified.
- ``vllm:dspark_draft_gate_steps`` (counter, label ``decision`` = drafted | skipped):
  drafting rounds (one per engine step that ran the model) by the draft gate's
  decision; without a gate every round drafts.
- ``vllm:dspark_verified_tokens_per_pos``, ``vllm:dspark_accepted_tokens_per_pos``
  (counters, label ``position`` 0..γ-1): how many requests verified draft position k
  (non-increasing in k) and how many of those accepted it;
  ``vllm:dspark_acceptance_rate_per_pos`` (gauge) is their ratio since start: the
  acceptance of position k among the requests that verified it. (vLLM's own
  per-position rates divide by every request step, so shortened drafts read low.)
- ``vllm:dspark_scheduler_decision_seconds`` (histogram): per scheduled round, the
  wall time of the verification scheduler's decisions (draft gate, draft width or
  survival floor, lengths ℓ_r).

The route, least invasive found in vLLM 0.32 (engine/PATCHES.md has the rows):

1. worker: the runner's drafter counts its rounds (``schedule/round.py: RoundStats``)
   and attaches ``take()`` to the step's ``ModelRunnerOutput`` as ``ROUND_ATTR``
   (V1: ``carry_round_stats_in_the_output``; the output is pickled to the engine core).
2. engine core: ``collect_dspark_step_stats`` counts ℓ_r per request from the drafts
   the scheduler receives (``update_draft_token_ids``: the requests that decode with
   them; on V2, whose drafts stay on the GPU, from the draft slots it scheduled), takes
   the V2 draft gate's decisions (``gate_drafting_in_the_scheduler``), adds the
   worker's counts, and puts the step's ``payload`` into its
   ``SchedulerStats`` (``attach``). SchedulerStats is a typed dataclass encoded by
   msgspec, which drops attributes it does not declare, so the payload rides under
   ``PAYLOAD_KEY`` in its one free-form dict, ``kv_connector_stats``.
3. frontend: ``export_dspark_metrics`` wraps vLLM's ``StatLoggerManager`` (both
   ``LLM`` and the API server record through it): ``take`` removes the payload before
   any vLLM logger sees the dict, and ``DSparkMetrics.observe`` records it with the
   step's ``SpecDecodingStats`` (per-position counts; vLLM computes the denominators,
   ``num_draft_tokens_per_pos``, but does not export them).

Engine-free: prometheus_client only (a vLLM dependency).
"""

from __future__ import annotations

PAYLOAD_KEY = "vllm_dspark"  # in SchedulerStats.kv_connector_stats, engine core -> frontend
ROUND_ATTR = "dspark_round"  # on ModelRunnerOutput, worker -> engine core

VERIFIED = "vllm:dspark_verified_tokens_per_request_step"
GATE = "vllm:dspark_draft_gate_steps"
VERIFIED_PER_POS = "vllm:dspark_verified_tokens_per_pos"
ACCEPTED_PER_POS = "vllm:dspark_accepted_tokens_per_pos"
ACCEPTANCE_PER_POS = "vllm:dspark_acceptance_rate_per_pos"
DECISION = "vllm:dspark_scheduler_decision_seconds"
NAMES = (VERIFIED, GATE, VERIFIED_PER_POS, ACCEPTED_PER_POS, ACCEPTANCE_PER_POS, DECISION)
DECISION_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2,
                    5e-2, 0.1, 0.25)


def merge(a: dict | None, b: dict | None) -> dict | None:
    """Two payloads as one: counts add, ``admitted`` adds per length, timings concatenate.

    A payload: ``admitted`` (list: request steps whose admitted draft had k tokens, at
    index k), ``drafted`` and ``skipped`` (rounds), ``decision_seconds`` (list)."""
    if not a:
        return dict(b) if b else None
    if not b:
        return dict(a)
    out = dict(a)
    for key, value in b.items():
        if key == "admitted":
            x, y = list(out.get(key) or []), list(value)
            out[key] = [(x[i] if i < len(x) else 0) + (y[i] if i < len(y) else 0)
                        for i in range(max(len(x), len(y)))]
        elif key == "decision_seconds":
            out[key] = list(out.get(key) or []) + list(value)
        else:
            out[key] = out.get(key, 0) + value
    return out


def count_admitted(counts: list[int], length: int) -> None:
    """One request step whose admitted draft has ``length`` tokens (capped at γ)."""
    counts[min(length, len(counts) - 1)] += 1


def attach(scheduler_stats, payload: dict | None) -> None:
    """Put ``payload`` into the step's SchedulerStats (engine core), merged with any
    already there. The dict is replaced, never mutated: with a KV connector it is the
    connector's own stats payload."""
    if not payload:
        return
    d = scheduler_stats.kv_connector_stats or {}
    scheduler_stats.kv_connector_stats = {**d, PAYLOAD_KEY: merge(d.get(PAYLOAD_KEY), payload)}


def take(scheduler_stats) -> dict | None:
    """Remove and return the payload (frontend, before vLLM's loggers read the stats:
    without a KV connector they must find ``kv_connector_stats`` None)."""
    d = getattr(scheduler_stats, "kv_connector_stats", None)
    if not d or PAYLOAD_KEY not in d:
        return None
    rest = {k: v for k, v in d.items() if k != PAYLOAD_KEY}
    scheduler_stats.kv_connector_stats = rest or None
    return d[PAYLOAD_KEY]


def _observe_many(histogram, value: float, n: int) -> None:
    """``n`` observations of ``value`` (one bucket increment, not n)."""
    if n <= 0:
        return
    buckets, bounds, total = (getattr(histogram, a, None)
                              for a in ("_buckets", "_upper_bounds", "_sum"))
    if buckets is None or bounds is None or total is None:  # another prometheus_client
        for _ in range(n):
            histogram.observe(value)
        return
    total.inc(value * n)
    for i, bound in enumerate(bounds):
        if value <= bound:
            buckets[i].inc(n)
            break


class DSparkMetrics:
    """The plugin's collectors (module docstring), one child per engine, and what they
    record per step. ``gamma``: the drafts' γ (the buckets and positions)."""

    def __init__(self, gamma: int, model_name: str, engine_indexes: list[int] | None = None,
                 registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        self.registry = REGISTRY if registry is None else registry
        self.gamma = int(gamma)
        engines = list(engine_indexes) if engine_indexes else [0]
        unregister(self.registry)  # a second engine in this process re-creates them
        labels = ["model_name", "engine"]
        reg = dict(registry=self.registry)
        verified = Histogram(
            VERIFIED, "Draft tokens the DSpark verification scheduler admitted, per request "
            "per step (0 when the draft gate skipped drafting).", labels,
            buckets=[float(k) for k in range(self.gamma + 1)], **reg)
        gate = Counter(GATE, "DSpark drafting rounds by the draft gate's decision.",
                       labels + ["decision"], **reg)
        verified_pos = Counter(VERIFIED_PER_POS, "Requests that verified draft position k.",
                               labels + ["position"], **reg)
        accepted_pos = Counter(ACCEPTED_PER_POS, "Requests that accepted draft position k.",
                               labels + ["position"], **reg)
        self._rate = Gauge(ACCEPTANCE_PER_POS, "Acceptance of draft position k among the "
                           "requests that verified it, since start.", labels + ["position"],
                           multiprocess_mode="mostrecent", **reg)
        decision = Histogram(DECISION, "Wall time of the DSpark verification scheduler's "
                             "decisions per scheduled round (gate, plan, lengths).", labels,
                             buckets=DECISION_BUCKETS, **reg)
        self._labels = {e: [model_name, str(e)] for e in engines}
        self.verified = {e: verified.labels(*lv) for e, lv in self._labels.items()}
        self.gate = {e: {d: gate.labels(*lv, d) for d in ("drafted", "skipped")}
                     for e, lv in self._labels.items()}
        positions = [str(k) for k in range(self.gamma)]
        self.verified_pos = {e: [verified_pos.labels(*lv, k) for k in positions]
                             for e, lv in self._labels.items()}
        self.accepted_pos = {e: [accepted_pos.labels(*lv, k) for k in positions]
                             for e, lv in self._labels.items()}
        self.decision = {e: decision.labels(*lv) for e, lv in self._labels.items()}
        # Running totals per engine for the gauge: [verified], [accepted] by position.
        self._totals = {e: ([0] * self.gamma, [0] * self.gamma) for e in engines}

    def observe(self, spec_decoding_stats, payload: dict | None, engine_idx: int = 0) -> None:
        """One step's numbers: vLLM's SpecDecodingStats (None when nothing was verified)
        and the plugin's payload (None when there is none)."""
        if engine_idx not in self._labels:
            return
        if payload:
            for k, n in enumerate((payload.get("admitted") or [])[: self.gamma + 1]):
                _observe_many(self.verified[engine_idx], float(k), int(n))
            for d in ("drafted", "skipped"):
                if payload.get(d):
                    self.gate[engine_idx][d].inc(payload[d])
            for seconds in payload.get("decision_seconds") or ():
                self.decision[engine_idx].observe(seconds)
        if spec_decoding_stats is not None:
            verified, accepted = self._totals[engine_idx]
            v_pos = list(spec_decoding_stats.num_draft_tokens_per_pos)[: self.gamma]
            a_pos = list(spec_decoding_stats.num_accepted_tokens_per_pos)[: self.gamma]
            for k, (v, a) in enumerate(zip(v_pos, a_pos)):
                if not v:
                    continue
                self.verified_pos[engine_idx][k].inc(v)
                self.accepted_pos[engine_idx][k].inc(a)
                verified[k] += v
                accepted[k] += a
                self._rate.labels(*self._labels[engine_idx], str(k)).set(
                    accepted[k] / verified[k])


def unregister(registry=None) -> None:
    """Remove the plugin's collectors from ``registry`` (default: prometheus_client's)."""
    if registry is None:
        from prometheus_client import REGISTRY as registry
    for collector in list(registry._collector_to_names):
        if getattr(collector, "_name", None) in NAMES:
            registry.unregister(collector)
