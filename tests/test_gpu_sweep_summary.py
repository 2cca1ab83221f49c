"""benchmarks/gpu_sweep.py's summary on CPU: rows from raw runs, and a configuration that
died mid-sweep keeps the cells it measured and is left out of the rest."""

from types import SimpleNamespace

from checks import load_benchmark


def _sweep():
    return load_benchmark("gpu_sweep")


def _run(c, seconds, digest="d", drafts=0, accepted=0):
    return dict(tokens=256 * c, seconds=seconds, digest=digest, num_drafts=drafts,
                num_draft_tokens=7 * drafts, num_accepted_tokens=accepted, concurrency=c,
                temperature=0.0, repeat=0)


def test_a_configuration_that_died_keeps_its_cells(capsys):
    sweep = _sweep()
    raw = {"plain": [_run(1, 1.0), _run(4, 1.0)],
           "ours": [_run(1, 0.5, drafts=100, accepted=50), _run(4, 2.0, digest="x", drafts=10)],
           "ours-tree": [_run(1, 0.8, drafts=100, accepted=150)]}  # died before C = 4
    args = SimpleNamespace(temperatures=[0.0], concurrency=[1, 4])
    rows = {(r["config"], r["concurrency"]): r for r in sweep.summarize(raw, args)}
    assert set(rows) == {("plain", 1), ("plain", 4), ("ours", 1), ("ours", 4), ("ours-tree", 1)}
    assert rows[("ours", 1)]["ratio_to_plain"] == 2.0 and rows[("ours", 1)]["tau"] == 1.5
    assert rows[("ours", 1)]["identical_to_plain"] is True
    assert rows[("ours", 4)]["identical_to_plain"] is False
    assert rows[("ours-tree", 1)]["tau"] == 2.5 and rows[("ours-tree", 1)]["tok_s"] == 320
    sweep.print_table(list(rows.values()), ["plain", "ours", "ours-tree"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].split()[0] == "4" and lines[-1].split()[-1] == "-"


def test_every_configuration_has_a_job():
    sweep = _sweep()
    args = SimpleNamespace(draft="d", gamma=7)
    for name in sweep.CONFIGS:
        spec, env = sweep.config_job(name, args)
        assert (spec is None) == (name == "plain"), name
    assert sweep.config_job("ours-tree", args)[1] == {"VLLM_DSPARK_TREE": "on"}
    modes = {name: sweep.LLM_KWARGS[name]["compilation_config"]["cudagraph_mode"]
             for name in ("ours-tree", "ours-tree-piecewise")}
    assert modes == {"ours-tree": "FULL_AND_PIECEWISE", "ours-tree-piecewise": "PIECEWISE"}
    assert sweep.config_job("ours-tree-piecewise", args)[1] == {"VLLM_DSPARK_TREE": "on"}


def test_the_gates_share_of_skipped_steps_and_the_skip_config():
    sweep = _sweep()
    gated = dict(_run(8, 1.0, drafts=70, accepted=35), gate_drafted=30, gate_skipped=10)
    raw = {"plain": [_run(8, 1.0)], "ours": [gated], "ours-nogate": [_run(8, 1.0, drafts=80)]}
    rows = {r["config"]: r for r in sweep.summarize(raw, SimpleNamespace(
        temperatures=[0.0], concurrency=[8]))}
    assert rows["ours"]["gate_skipped_share"] == 0.25
    assert "gate_skipped_share" not in rows["ours-nogate"]  # no gate ran there
    spec, env = sweep.config_job("ours-skip", SimpleNamespace(draft="d", gamma=7))
    assert spec["num_speculative_tokens_per_batch_size"] == [[1, 1, 0]] and env == {}
