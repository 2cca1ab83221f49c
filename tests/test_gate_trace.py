"""benchmarks/gate_trace.py on CPU: the gate's trace lines fall into the sweep's cells by
wall-clock time; per cell the drafted and skipped rates, the time spent at K = 0 and
the sweep's own tok/s beside them."""

import json

import pytest
from checks import load_benchmark


def _tool():
    return load_benchmark("gate_trace")


def _run(c, wall):
    return dict(tokens=256 * c, seconds=wall[1] - wall[0], concurrency=c, temperature=0.0,
                repeat=0, wall=list(wall))


def test_cells_get_their_samples_rates_and_skipped_share(tmp_path, capsys):
    tool = _tool()
    sweep = {"raw": {"ours": [_run(1, (100.0, 110.0)), _run(8, (200.0, 210.0))],
                     "plain": [_run(1, (0.0, 1.0))]},
             "rows": [{"config": "plain", "concurrency": 8, "temperature": 0.0, "tok_s": 900.0},
                      {"config": "ours-skip", "concurrency": 8, "temperature": 0.0,
                       "tok_s": 800.0},
                      {"config": "ours", "concurrency": 8, "temperature": 0.0, "tok_s": 700.0}]}
    trace = [
        {"r": 1, "k": 7, "wall": 99.0},  # in force when the C = 1 run starts
        {"r": 1, "drafted": True, "tokens": 3, "s": 0.01, "wall": 101.0},
        {"r": 1, "drafted": True, "tokens": 1, "s": 0.01, "wall": 102.0},
        {"r": 1, "k": 0, "wall": 105.0},  # skipping from 105 to 108: 3 of 10 s
        {"r": 1, "drafted": False, "tokens": 1, "s": 0.004, "wall": 106.0},
        {"r": 1, "k": 7, "wall": 108.0},
        {"r": 8, "drafted": False, "tokens": 8, "s": 0.01, "wall": 150.0},  # between runs
        {"r": 8, "drafted": True, "tokens": 16, "s": 0.02, "wall": 201.0},
        {"r": 8, "k": 0, "wall": 209.0},  # skipping for the run's last second
        {"r": 8, "drafted": False, "tokens": 8, "s": 0.008, "wall": 209.5},
    ]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    (tmp_path / "sweep_gate_ours.jsonl").write_text(
        "\n".join(json.dumps(r) for r in reversed(trace)) + "\n")  # order is not assumed
    out = tmp_path / "summary.json"
    assert tool.main([str(path), "--out", str(out)]) == 0
    rows = {r["concurrency"]: r for r in json.loads(out.read_text())["rows"]}
    one, eight = rows[1], rows[8]
    assert one["gate_drafted_samples"] == 2 and one["gate_drafted_tok_s"] == pytest.approx(200)
    assert one["gate_skipped_samples"] == 1 and one["gate_skipped_tok_s"] == pytest.approx(250)
    assert one["skipped_time_share"] == pytest.approx(0.3) and one["k_changes"] == 2
    assert eight["gate_skipped_samples"] == 1  # the sample between runs belongs to none
    assert eight["gate_skipped_tok_s"] == pytest.approx(1000)
    assert eight["skipped_time_share"] == pytest.approx(0.1) and eight["k_changes"] == 1
    assert (eight["sweep_plain_tok_s"], eight["sweep_ours_skip_tok_s"],
            eight["sweep_ours_tok_s"], eight["sweep_ours_nogate_tok_s"]) == (900, 800, 700, None)
    printed = capsys.readouterr().out
    assert "| 8 | 0 | 800 (1) | 1000 (1) | 0.10 | 1 | 900 | 800 | - | 700 |" in printed


def test_bad_inputs_name_the_problem(tmp_path):
    tool = _tool()
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"raw": {"ours": [_run(1, (0, 1))]}}))
    with pytest.raises(SystemExit, match="no gate trace"):
        tool.main([str(path)])
    (tmp_path / "sweep_gate_ours.jsonl").write_text('{"r": 1, "k": 7}\n')
    with pytest.raises(SystemExit, match="no wall-clock time"):
        tool.main([str(path)])
    (tmp_path / "sweep_gate_ours.jsonl").write_text('{"r": 1, "k": 7, "wall": 0.5}\n')
    with pytest.raises(SystemExit, match="no runs of 'ours-gate'"):
        tool.main([str(path), "--config", "ours-gate",
                   "--trace", str(tmp_path / "sweep_gate_ours.jsonl")])
    path.write_text(json.dumps({"raw": {"ours": [{"concurrency": 1, "temperature": 0.0}]}}))
    with pytest.raises(SystemExit, match="no wall-clock spans"):
        tool.main([str(path)])
