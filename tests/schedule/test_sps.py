"""SPS(B) table: step-function lookup, tail extrapolation, JSON, validation, cache, measure."""

import json
import math

import pytest
import torch

from vllm_dspark.config import DSparkConfigError
from vllm_dspark.schedule.sps import (
    FORMAT,
    SPSTable,
    cache_path,
    default_grid,
    load_cached,
    measure,
    store,
)

META = {"model": "m", "dtype": "bfloat16", "device_name": "H100", "vllm_version": "0.32.0"}


def table(b=(1, 4, 8), s=(100.0, 80.0, 50.0), **kw):
    return SPSTable(b=b, sps=s, **{**META, **kw})


def test_step_function_lookup():
    t = table(max_capture_size=8)  # CUDA graphs captured at 1, 4, 8
    # Smallest measured size ≥ B: 1→100; 2,3,4→80 (padded to 4); 5..8→50 (padded to 8).
    # Below the first point (B = 0) the first bucket applies.
    want = {0: 100.0, 1: 100.0, 2: 80.0, 3: 80.0, 4: 80.0, 5: 50.0, 8: 50.0}
    for b, s in want.items():
        assert t.sps_at(b) == s
    got = t.sps_many(torch.tensor(list(want)))
    assert got.dtype == torch.float64 and got.tolist() == list(want.values())
    assert t(torch.tensor([3])).tolist() == [80.0]  # callable


def test_interpolation_without_graphs_and_above_the_capture_limit():
    # Eager / CPU: nothing is padded, time per step is linear between measured sizes.
    t = table()
    # t(1) = 0.01 s, t(4) = 0.0125 s: B = 2 -> 0.01 + (1/3)·0.0025 s.
    assert t.sps_at(2) == pytest.approx(1 / (0.01 + 0.0025 / 3))
    assert t.sps_at(4) == pytest.approx(80.0) and t.sps_at(6) == pytest.approx(1 / 0.01625)
    # Graphs captured up to 4: step function there, interpolation above.
    g = table(max_capture_size=4)
    assert g.sps_at(2) == 80.0 and g.sps_at(6) == pytest.approx(1 / 0.01625)


def test_extrapolation_linear_in_time_per_step():
    t = table()
    # t(4) = 1/80 = 0.0125 s, t(8) = 1/50 = 0.02 s: 0.001875 s per extra token, so
    # t(12) = 0.02 + 4 * 0.001875 = 0.0275 s -> 36.36 steps/s.
    assert t.sps_at(12) == pytest.approx(1 / 0.0275)
    assert t.sps_many(torch.tensor([12, 100])).tolist() == [t.sps_at(12), t.sps_at(100)]
    # Noise making the last point faster must not make bigger batches faster: slope ≥ 0.
    flat = table(b=(1, 2), s=(50.0, 100.0))
    assert flat.sps_at(1000) == 100.0


def test_json_round_trip(tmp_path):
    t = table(max_capture_size=512, created="2026-01-01T00:00:00+00:00")
    p = tmp_path / "t.json"
    t.save(str(p))
    d = json.loads(p.read_text())
    assert d["format"] == FORMAT and d["batch_sizes"] == [1, 4, 8]
    assert SPSTable.load(str(p)) == t
    assert SPSTable.from_dict(t.to_dict()).meta() == t.meta()


def good():
    return {"format": FORMAT, "batch_sizes": [1, 2, 4], "steps_per_s": [9.0, 8.0, 7.0],
            "meta": dict(META)}


def _mutate(**kw):
    d = good()
    for k, v in kw.items():
        if v is KeyError:
            d.pop(k)
        else:
            d[k] = v
    return d


@pytest.mark.parametrize("d, needle", [
    ([1, 2], "not a JSON object"),
    (_mutate(format="vllm-dspark-sps/0"), "format"),
    (_mutate(batch_sizes=KeyError), "batch_sizes"),
    (_mutate(meta=KeyError), "meta"),
    (_mutate(meta={"model": "m"}), "meta.dtype"),
    (_mutate(steps_per_s=[1.0, 2.0]), "lengths differ"),
    (_mutate(batch_sizes=[1, 4, 2]), "strictly increasing"),
    (_mutate(batch_sizes=[1, 2, 2]), "duplicate"),
    (_mutate(batch_sizes=[0, 2, 4]), "< 1"),
    (_mutate(batch_sizes=[1, 2.5, 4]), "not an integer"),
    (_mutate(steps_per_s=[9.0, 0.0, 7.0]), "positive finite"),
    (_mutate(steps_per_s=[9.0, -1.0, 7.0]), "positive finite"),
    (_mutate(steps_per_s=[9.0, math.inf, 7.0]), "positive finite"),
    (_mutate(steps_per_s=[9.0, math.nan, 7.0]), "positive finite"),
    (_mutate(batch_sizes=[1], steps_per_s=[9.0]), "at least 2"),
])
def test_malformed_tables(d, needle):
    with pytest.raises(DSparkConfigError) as e:
        SPSTable.from_dict(d)
    assert needle in str(e.value) and "re-profile" in str(e.value)  # problem and fix


def test_not_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(DSparkConfigError, match="not valid JSON.*re-profile"):
        SPSTable.load(str(p))


def test_constructor_validates():
    with pytest.raises(DSparkConfigError, match="strictly increasing"):
        SPSTable(b=[2, 1], sps=[1.0, 2.0])


def test_cache_path_keyed_by_all_four_fields(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_DSPARK_CACHE", str(tmp_path))
    base = cache_path(**META)
    assert base.startswith(str(tmp_path / "sps")) and base.endswith(".json")
    assert cache_path(**META) == base
    for k in META:
        assert cache_path(**{**META, k: META[k] + "x"}) != base, k
    monkeypatch.delenv("VLLM_DSPARK_CACHE")
    assert "/.cache/vllm-dspark/sps/" in cache_path(**META)


def test_store_and_load_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_DSPARK_CACHE", str(tmp_path))
    assert load_cached(**META) is None
    t = table()
    assert store(t) == cache_path(**META)
    assert load_cached(**META) == t
    # A file whose metadata does not match its key (hand-copied) is refused.
    other = {**META, "vllm_version": "0.33.0"}
    SPSTable(b=t.b, sps=t.sps, **META).save(cache_path(**other))
    with pytest.raises(DSparkConfigError, match="delete it to re-profile"):
        load_cached(**other)


def test_default_grid():
    assert default_grid(20) == [1, 2, 3, 4, 6, 8, 12, 16, 20]
    assert default_grid(16) == [1, 2, 3, 4, 6, 8, 12, 16]
    assert default_grid(100, capture_sizes=[512, 1, 2, 4, 8, 16, 24, 200]) == [
        1, 2, 4, 8, 16, 24, 100]
    assert default_grid(2) == [1, 2]
    with pytest.raises(DSparkConfigError):
        default_grid(1)


def test_measure_counts_calls_and_syncs():
    calls, syncs = [], []
    t = measure(calls.append, [4, 1, 2], warmup=2, iters=5, sync=lambda: syncs.append(1),
                **META, max_capture_size=None)
    assert t.b == (1, 2, 4) and all(s > 0 for s in t.sps)
    assert calls == [1] * 7 + [2] * 7 + [4] * 7 and len(syncs) == 6
    assert t.model == "m" and t.created  # timestamp filled in
