"""`vllm-dspark eval`: the τ / per-position math, dataset loading, and one real run.

The end-to-end test runs the CLI on the oracle pair (tiny_models.make_oracle_pair,
corrupt_fraction 0): its drafts are the bigram target's own next tokens (and at
T > 0 its q is the target's p), so nearly every draft is accepted and τ sits near
γ + 1 at both temperatures.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import requires_vllm
from vllm_dspark.eval.acceptance import (
    ACCEPTED_PER_POS,
    NUM_ACCEPTED,
    NUM_DRAFT_TOKENS,
    NUM_DRAFTS,
    EvalError,
    acceptance_metrics,
    aggregate_request_metrics,
    diff_counters,
    env_without_our_plugin,
    load_prompts,
    resolve_dataset,
)
from vllm_dspark.prompts import first_user_turn

CLI = [sys.executable, "-m", "vllm_dspark.cli", "eval"]


# ------------------------------------------------------------------------- math
def test_tau_rate_and_per_position_on_hand_made_counters():
    # 10 steps of γ = 3: accepted lengths 0,1,1,2,2,2,3,3,3,3 (histogram [1, 2, 3, 4]).
    per_pos = [9, 7, 4]  # steps with >= 1, >= 2, >= 3 accepted
    m = acceptance_metrics(10, 30, sum(per_pos), per_pos)
    assert m["tau"] == pytest.approx(1 + 20 / 10)
    assert m["acceptance_rate"] == pytest.approx(20 / 30)
    assert m["per_position"] == pytest.approx([0.9, 0.7, 0.4])
    assert m["per_position_conditional"] == pytest.approx([0.9, 7 / 9, 4 / 7])
    assert m["num_drafts"] == 10 and m["accepted_per_position"] == per_pos


def test_undefined_ratios_are_none():
    m = acceptance_metrics(0, 0, 0, [0, 0])
    assert m["tau"] is None and m["acceptance_rate"] is None
    assert m["per_position_conditional"] == [None, None]
    m = acceptance_metrics(4, 12, 1, [1, 0, 0])  # nothing reaches position 2
    assert m["per_position_conditional"] == [0.25, 0.0, None]
    json.dumps(m)  # no NaN: stays valid JSON


def test_counter_differences_separate_runs():
    before = {NUM_DRAFTS: 10, NUM_DRAFT_TOKENS: 40, NUM_ACCEPTED: 12, ACCEPTED_PER_POS: [6, 4, 2]}
    after = {NUM_DRAFTS: 15, NUM_DRAFT_TOKENS: 60, NUM_ACCEPTED: 20, ACCEPTED_PER_POS: [9, 7, 4]}
    d = diff_counters(before, after)
    assert d == {NUM_DRAFTS: 5, NUM_DRAFT_TOKENS: 20, NUM_ACCEPTED: 8, ACCEPTED_PER_POS: [3, 3, 2]}
    # A first snapshot taken before any spec step has no per-position vector yet.
    d0 = diff_counters({NUM_DRAFTS: 0, NUM_DRAFT_TOKENS: 0, NUM_ACCEPTED: 0,
                        ACCEPTED_PER_POS: []}, after)
    assert d0[ACCEPTED_PER_POS] == [9, 7, 4]


def test_per_request_metrics_sum_to_the_counters():
    items = [
        {"acceptance_histogram": [1, 0, 1, 1], "num_draft_tokens": 9,
         "per_step_accepted": [0, 2, 3], "per_step_drafted": [3, 3, 3]},
        {"acceptance_histogram": [0, 1, 0, 1], "num_draft_tokens": 5,
         "per_step_accepted": [1, 3], "per_step_drafted": [3, 2]},
    ]
    agg = aggregate_request_metrics(items, gamma=3)
    assert agg[NUM_DRAFTS] == 5 and agg[NUM_DRAFT_TOKENS] == 14
    assert agg[NUM_ACCEPTED] == 0 + 2 + 3 + 1 + 3
    assert agg[ACCEPTED_PER_POS] == [4, 3, 2]
    assert agg["drafted_per_position"] == [5, 5, 4]


def test_upstream_env_hides_only_our_plugin():
    env = env_without_our_plugin({"VLLM_PLUGINS": "dspark,other"})
    assert env["VLLM_PLUGINS"] == "other"
    names = env_without_our_plugin({})["VLLM_PLUGINS"].split(",")
    assert "dspark" not in names


# ------------------------------------------------------------------------- datasets
def write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_first_user_turn_of_the_common_formats():
    assert first_user_turn({"turns": ["first", "second"]}) == "first"
    assert first_user_turn({"messages": [{"role": "system", "content": "s"},
                                         {"role": "user", "content": "u"}]}) == "u"
    assert first_user_turn({"conversations": [{"from": "human", "value": "h"}]}) == "h"
    assert first_user_turn({"prompt": "p"}) == "p"
    with pytest.raises(ValueError):
        first_user_turn({"answer": 3})


def test_load_prompts_takes_the_first_n(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"turns": [f"q{i}", "later"]} for i in range(5)])
    assert load_prompts(path, 3) == ["q0", "q1", "q2"]
    assert len(load_prompts(path, 80)) == 5


def test_dataset_names_resolve_in_the_prompt_dir(tmp_path, monkeypatch):
    write_jsonl(tmp_path / "alpha.jsonl", [{"turns": ["a"]}])
    write_jsonl(tmp_path / "beta.jsonl", [{"turns": ["b"]}])
    assert resolve_dataset("alpha", str(tmp_path)) == ("alpha", str(tmp_path / "alpha.jsonl"))
    assert resolve_dataset(str(tmp_path / "beta.jsonl"))[0] == "beta"  # a path
    monkeypatch.setenv("VLLM_DSPARK_PROMPT_DIR", str(tmp_path))
    assert resolve_dataset("beta")[1] == str(tmp_path / "beta.jsonl")
    with pytest.raises(EvalError, match="available names there: alpha, beta"):
        resolve_dataset("gamma", str(tmp_path))


def test_cli_errors_before_vllm_starts(tmp_path, oracle_pair):
    target, draft = oracle_pair
    data = write_jsonl(tmp_path / "d.jsonl", [{"turns": ["Hi"]}])
    env = dict(os.environ, VLLM_DSPARK_PROMPT_DIR=str(tmp_path))
    p = subprocess.run(CLI + ["--target", target, "--draft", draft, "--datasets", "d", "nope"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert "unknown dataset 'nope'" in p.stderr and "available names there: d" in p.stderr
    p = subprocess.run(CLI + ["--target", target, "--draft", target, "--datasets", data],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and "is not a DSpark draft" in p.stderr
    assert "Traceback" not in p.stderr


@requires_vllm
def test_quiet_keeps_the_engines_last_error_lines(tmp_path, oracle_pair):
    """--quiet hides the engine's log while it runs, but a failure prints its last lines
    (with the exception) and keeps the whole log, instead of pointing at nothing."""
    import re

    target, draft = oracle_pair
    data = write_jsonl(tmp_path / "d.jsonl", [{"turns": ["Hi"]}])
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="lots")  # the engine fails on it
    p = subprocess.run(CLI + ["--target", target, "--draft", draft, "--datasets", data,
                              "--quiet", "--enforce-eager", "--max-model-len", "256",
                              "--max-tokens", "8", "--temperatures", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    err = p.stderr
    assert "the vLLM engine process failed" in err and "is above" not in err
    assert "The last lines of its log" in err
    assert "invalid literal for int() with base 10: 'lots'" in err
    kept = re.search(r"all of it: (\S+)\)", err).group(1)
    assert "'lots'" in open(kept).read()
    os.remove(kept)

def test_help():
    p = subprocess.run(CLI + ["--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--upstream" in p.stdout and "--temperatures" in p.stdout


# ------------------------------------------------------------------------- engine
@requires_vllm
@pytest.mark.engine
def test_eval_end_to_end_on_the_oracle_pair(tmp_path, oracle_pair):
    target, draft = oracle_pair
    with open(os.path.join(draft, "config.json")) as f:
        gamma = json.load(f)["block_size"]
    first = write_jsonl(tmp_path / "first.jsonl",
                        [{"turns": [p, "ignored"]} for p in
                         ("The quick brown fox", "def add(a, b):", "Once upon a time")])
    second = write_jsonl(tmp_path / "second.jsonl",
                         [{"turns": [p]} for p in ("Lorem ipsum", "What is 9 plus 10?")])
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    cmd = CLI + ["--target", target, "--draft", draft, "--datasets", first, second,
                 "--max-tokens", "48", "--max-model-len", "512", "--enforce-eager",
                 "--ignore-eos", "--out", str(out), "--plot", str(png)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["gamma"] == gamma  # default: the draft's block_size
    assert res["dtype"] == "float32"  # auto on CPU
    assert {"platform", "cpu", "gpu", "vllm", "torch"} <= set(res["machine"])
    assert res["command"].startswith("vllm-dspark eval")
    assert set(res["results"]) == {"first", "second"}
    for name, n in (("first", 3), ("second", 2)):
        assert set(res["results"][name]) == {"T=0", "T=1"}
        for tk, m in res["results"][name].items():
            assert m["num_prompts"] == n and m["generated_tokens"] == 48 * n
            assert m["tokens_per_s"] > 0 and m["num_drafts"] > 0
            assert len(m["per_position"]) == len(m["per_position_conditional"]) == gamma
            assert 1 < m["tau"] <= gamma + 1
            # The oracle's drafts are the target's tokens: almost all are accepted.
            assert m["tau"] > 0.9 * (gamma + 1), (name, tk, m)
            assert m["acceptance_rate"] > 0.9
            assert 1 <= m["tau_emitted"] <= m["tau"] + 1e-9
            assert m["tau"] == pytest.approx(1 + m["num_accepted_tokens"] / m["num_drafts"])
            # Counter differences (per run) agree with vLLM's per-request metrics.
            assert m["per_request_metrics_agree"] is True
    assert png.stat().st_size > 10_000
    assert "dataset" in p.stdout and "second" in p.stdout
