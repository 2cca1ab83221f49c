"""The plugin's metrics without an engine (vllm_dspark/engine/metrics.py): payloads, their
carrier in SchedulerStats, and what DSparkMetrics records per step. End to end (a server's
/metrics, LLM.get_metrics()): tests/engine/test_metrics.py."""

from types import SimpleNamespace as NS

import pytest

prometheus_client = pytest.importorskip("prometheus_client")

from vllm_dspark.engine import metrics  # noqa: E402

GAMMA = 4


def spec_stats(draft_lengths, accepted):
    """vLLM's SpecDecodingStats of one step (its observe_draft, per request)."""
    s = NS(num_draft_tokens_per_pos=[0] * GAMMA, num_accepted_tokens_per_pos=[0] * GAMMA)
    for n, a in zip(draft_lengths, accepted):
        for i in range(n):
            s.num_draft_tokens_per_pos[i] += 1
        for i in range(a):
            s.num_accepted_tokens_per_pos[i] += 1
    return s


def sample(registry, name, **labels):
    want = {"model_name": "tiny", "engine": "0", **labels}
    return registry.get_sample_value(name, want)


def test_payloads_merge():
    a = {"admitted": [1, 2], "drafted": 1, "decision_seconds": [0.1]}
    b = {"admitted": [0, 1, 0, 0, 3], "skipped": 2, "drafted": 1, "decision_seconds": [0.2]}
    assert metrics.merge(a, b) == {"admitted": [1, 3, 0, 0, 3], "drafted": 2, "skipped": 2,
                                   "decision_seconds": [0.1, 0.2]}
    assert a == {"admitted": [1, 2], "drafted": 1, "decision_seconds": [0.1]}  # untouched
    assert metrics.merge(None, b) == b and metrics.merge(a, None) == a
    assert metrics.merge(None, None) is None and metrics.merge({}, None) is None
    counts = [0] * (GAMMA + 1)
    for n in (0, 2, 4, 9):  # a longer list than γ counts as γ
        metrics.count_admitted(counts, n)
    assert counts == [1, 0, 1, 0, 2]


def test_the_payload_rides_in_kv_connector_stats_and_leaves_it_as_it_was():
    stats = NS(kv_connector_stats=None)
    metrics.attach(stats, None)
    assert stats.kv_connector_stats is None
    metrics.attach(stats, {"drafted": 1})
    metrics.attach(stats, {"drafted": 2, "skipped": 1})
    assert metrics.take(stats) == {"drafted": 3, "skipped": 1}
    assert stats.kv_connector_stats is None  # vLLM's loggers then skip the KV connector
    assert metrics.take(stats) is None
    # With a KV connector: its dict is never mutated, and comes back as it was.
    connector = {"num_transfers": 5}
    stats = NS(kv_connector_stats=connector)
    metrics.attach(stats, {"drafted": 1})
    assert connector == {"num_transfers": 5}
    assert metrics.take(stats) == {"drafted": 1}
    assert stats.kv_connector_stats == {"num_transfers": 5}
    assert metrics.take(NS()) is None  # stats without the field


def test_dspark_metrics_record_a_step():
    registry = prometheus_client.CollectorRegistry()
    m = metrics.DSparkMetrics(GAMMA, "tiny", [0], registry=registry)
    # Four requests verified 0, 1, 3 and 4 drafts and accepted 0, 1, 1 and 4.
    m.observe(spec_stats([1, 3, 4], [1, 1, 4]),
              {"admitted": [1, 1, 0, 1, 1], "drafted": 1, "decision_seconds": [2e-4]})
    m.observe(None, {"skipped": 1, "admitted": [4], "decision_seconds": [3e-5]})
    v = metrics.VERIFIED
    assert sample(registry, v + "_count") == 8 and sample(registry, v + "_sum") == 8
    assert [sample(registry, v + "_bucket", le=le) for le in ("0.0", "1.0", "2.0", "3.0", "4.0")
            ] == [5, 6, 6, 7, 8]
    assert sample(registry, metrics.GATE + "_total", decision="drafted") == 1
    assert sample(registry, metrics.GATE + "_total", decision="skipped") == 1
    d = metrics.DECISION
    assert sample(registry, d + "_count") == 2
    assert sample(registry, d + "_sum") == pytest.approx(2.3e-4)
    assert sample(registry, d + "_bucket", le="5e-05") == 1
    verified = [sample(registry, metrics.VERIFIED_PER_POS + "_total", position=str(k))
                for k in range(GAMMA)]
    accepted = [sample(registry, metrics.ACCEPTED_PER_POS + "_total", position=str(k))
                for k in range(GAMMA)]
    assert verified == [3, 2, 2, 1] and accepted == [3, 1, 1, 1]
    rates = [sample(registry, metrics.ACCEPTANCE_PER_POS, position=str(k))
             for k in range(GAMMA)]
    assert rates == [1.0, 0.5, 0.5, 1.0]
    # The rate is cumulative: accepted / verified since start.
    m.observe(spec_stats([2, 2], [0, 0]), None)
    assert sample(registry, metrics.ACCEPTANCE_PER_POS, position="0") == pytest.approx(3 / 5)
    assert sample(registry, metrics.ACCEPTANCE_PER_POS, position="1") == pytest.approx(1 / 4)
    m.observe(None, {"drafted": 1}, engine_idx=7)  # an engine it does not serve: ignored
    assert sample(registry, metrics.GATE + "_total", decision="drafted") == 1


def test_a_position_nobody_verified_has_no_rate_yet():
    registry = prometheus_client.CollectorRegistry()
    m = metrics.DSparkMetrics(GAMMA, "tiny", registry=registry)
    m.observe(spec_stats([1], [0]), None)
    assert sample(registry, metrics.ACCEPTANCE_PER_POS, position="0") == 0.0
    assert sample(registry, metrics.ACCEPTANCE_PER_POS, position="1") is None
    assert sample(registry, metrics.VERIFIED_PER_POS + "_total", position="1") == 0


def test_many_observations_at_once_equal_one_by_one():
    registry = prometheus_client.CollectorRegistry()
    bulk = prometheus_client.Histogram("bulk", "", buckets=[0, 1, 2], registry=registry)
    single = prometheus_client.Histogram("single", "", buckets=[0, 1, 2], registry=registry)
    for value, n in ((0.0, 3), (2.0, 2), (5.0, 1), (1.0, 0)):
        metrics._observe_many(bulk, value, n)
        for _ in range(n):
            single.observe(value)
    for suffix, le in (("_count", None), ("_sum", None), ("_bucket", "0.0"),
                       ("_bucket", "2.0"), ("_bucket", "+Inf")):
        labels = {"le": le} if le else {}
        assert (registry.get_sample_value("bulk" + suffix, labels)
                == registry.get_sample_value("single" + suffix, labels))


def test_a_second_engine_in_the_process_recreates_the_collectors():
    registry = prometheus_client.CollectorRegistry()
    metrics.DSparkMetrics(GAMMA, "tiny", registry=registry).observe(None, {"drafted": 3})
    m = metrics.DSparkMetrics(GAMMA, "tiny", registry=registry)  # no duplicate error
    assert sample(registry, metrics.GATE + "_total", decision="drafted") == 0
    m.observe(None, {"drafted": 1})
    assert sample(registry, metrics.GATE + "_total", decision="drafted") == 1
    metrics.unregister(registry)
    assert sample(registry, metrics.GATE + "_total", decision="drafted") is None
