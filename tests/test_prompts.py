"""Dataset names resolve in the packaged reference prompt sets unless the user says otherwise."""

import json
import os
import subprocess
import sys

import pytest

from vllm_dspark import prompts
from vllm_dspark.eval.acceptance import EvalError
from vllm_dspark.eval.acceptance import resolve_dataset as eval_resolve
from vllm_dspark.train.data import excluded_prompts

REFERENCE_SETS = ["gsm8k", "humaneval", "math500", "mbpp", "mt-bench"]


def test_the_reference_sets_ship_in_the_package():
    assert prompts.available_datasets(prompts.REFERENCE_PROMPT_DIR) == REFERENCE_SETS
    readme = open(os.path.join(prompts.REFERENCE_PROMPT_DIR, "README.md")).read()
    for name in REFERENCE_SETS:
        assert f"`{name}.jsonl`" in readme  # each file's source and licence is named
        assert prompts.read_prompts(os.path.join(prompts.REFERENCE_PROMPT_DIR, name + ".jsonl"), 2)


def test_names_resolve_in_the_package_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv(prompts.PROMPT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)  # not the repository: nothing relative to the cwd
    for name in REFERENCE_SETS:
        assert prompts.resolve_dataset(name) == (
            name, os.path.join(prompts.REFERENCE_PROMPT_DIR, name + ".jsonl"))
        assert eval_resolve(name + ".jsonl")[0] == name
    with pytest.raises(prompts.PromptFileError, match="available names there: gsm8k, "):
        prompts.resolve_dataset("nope")
    with pytest.raises(EvalError, match="unknown dataset 'nope'"):
        eval_resolve("nope")
    with pytest.raises(prompts.PromptFileError, match="prompt file 'x/gsm8k.jsonl' does not"):
        prompts.resolve_dataset("x/gsm8k.jsonl")  # a path is never looked up as a name


def test_the_environment_and_an_explicit_dir_override(monkeypatch, tmp_path):
    (tmp_path / "mine.jsonl").write_text(json.dumps({"turns": ["hi"]}) + "\n")
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"turns": ["my gsm8k"]}) + "\n")
    monkeypatch.setenv(prompts.PROMPT_DIR_ENV, str(tmp_path))
    assert prompts.default_prompt_dir() == str(tmp_path)
    assert prompts.resolve_dataset("gsm8k")[1] == str(tmp_path / "gsm8k.jsonl")
    with pytest.raises(prompts.PromptFileError, match="available names there: gsm8k, mine"):
        prompts.resolve_dataset("math500")
    assert prompts.resolve_dataset("math500", prompts.REFERENCE_PROMPT_DIR)[1].startswith(
        prompts.REFERENCE_PROMPT_DIR)
    # A path is a path wherever the directory points.
    path = os.path.join(prompts.REFERENCE_PROMPT_DIR, "mbpp.jsonl")
    assert prompts.resolve_dataset(path) == ("mbpp", path)


def test_training_data_excludes_the_reference_sets_by_default(monkeypatch, tmp_path):
    monkeypatch.delenv(prompts.PROMPT_DIR_ENV, raising=False)
    first = prompts.read_prompts(os.path.join(prompts.REFERENCE_PROMPT_DIR, "gsm8k.jsonl"), 1)
    assert first[0].strip() in excluded_prompts(None)
    assert excluded_prompts("none") == set()
    monkeypatch.setenv(prompts.PROMPT_DIR_ENV, str(tmp_path))
    assert excluded_prompts(None) == set()


def test_calibrate_resolves_a_name_before_anything_runs(tmp_path, oracle_pair):
    target, draft = oracle_pair
    cli = [sys.executable, "-m", "vllm_dspark.cli", "calibrate", "--target", target,
           "--draft", draft, "--dry-run"]
    env = {k: v for k, v in os.environ.items() if k != prompts.PROMPT_DIR_ENV}
    p = subprocess.run(cli + ["--prompts", "no-such-set"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode != 0 and "unknown dataset 'no-such-set'" in p.stderr, p.stderr
    assert "math500" in p.stderr and "Traceback" not in p.stderr
