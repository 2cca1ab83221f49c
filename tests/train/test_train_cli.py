"""`vllm-dspark train` end to end on CPU: data regenerated through vLLM (in compressed
parts, the generator gone as soon as they are written), a few steps of training on the
tiny bigram target, resume and warm restart, and real acceptance in the engine."""

import json
import os
import random
import re
import subprocess
import sys

import psutil
import pytest
import torch
from safetensors import safe_open

from engine.harness import acceptance, run_job
from vllm_dspark.train import dataset as ds
from tiny_models import make_drafter, make_oracle_pair

pytestmark = [pytest.mark.engine]

WORDS = "the cat dog runs fast slow red blue green add sum code print list".split()


def _train(args, timeout=900):
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    return subprocess.run([sys.executable, "-m", "vllm_dspark.cli", "train", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


COMMON = ["--gamma", "4", "--num-layers", "1", "--markov-rank", "16", "--batch-size", "4",
          "--anchors", "16", "--max-len", "256", "--lr", "3e-3", "--warmup", "5",
          "--save-every", "1000", "--num-samples", "120", "--part-rows", "50",
          "--max-answer-tokens", "64",
          # Greedy answers: the engine check below decodes greedily, and a bigram
          # target's greedy paths are what a drafter this small can cover.
          "--answer-temperature", "0"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    target, _ = make_oracle_pair(str(root), "qwen3", 0.0)
    rng = random.Random(0)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(
        json.dumps({"turns": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))]})
        + "\n" for _ in range(200)))
    out = root / "draft"
    proc = _train(["--target", target, "--out", str(out), "--prompts", str(prompts),
                   "--steps", "200", *COMMON])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return target, out, prompts, proc.stderr


def test_data_was_regenerated_by_the_target_in_parts(trained):
    _, out, _, _ = trained
    data = out / "data"
    assert sorted(os.listdir(data)) == ["data-00000.jsonl.gz", "data-00001.jsonl.gz",
                                        "data-00002.jsonl.gz", "data.meta.json"]
    rows = [r for f in ds.data_files(str(data)) for r in ds.iter_records(f)]
    meta = json.loads((data / "data.meta.json").read_text())
    assert meta["complete"] and [p["rows"] for p in meta["parts"]] == [50, 50, 20]
    assert len(rows) == meta["num_rows"] == 120
    assert all(r["answer_ids"] and r["prompt_ids"] for r in rows)
    assert meta["source"] == "prompts file" and meta["recipe"]["seed"] == 0
    assert meta["excluded"]["prompts"] > 0  # the packaged reference sets
    report = json.loads((out / "training.json").read_text())
    assert report["train_rows"] + report["val_rows"] == 120 == report["data_rows"]


def test_the_generator_is_gone_once_its_data_is_written(trained):
    """No wait on vLLM's shutdown: the engine's processes are ended, the child exits."""
    _, _, _, stderr = trained
    m = re.search(r"ended the engine's processes \[([\d, ]+)\]", stderr)
    assert m, stderr[-3000:]
    for pid in (int(x) for x in m.group(1).split(",")):
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
    lag = float(re.search(r"the generator was gone ([\d.]+)s after", stderr).group(1))
    assert lag < 30, lag


def test_loss_falls_and_checkpoint_is_servable(trained):
    _, out, _, _ = trained
    report = json.loads((out / "training.json").read_text())
    assert report["finished"] and report["step"] == 200
    val = report["validation"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 200
    assert val[-1]["loss"] < 0.85 * val[0]["loss"]
    assert val[-1]["tau_greedy_est"] > val[0]["tau_greedy_est"] + 0.3
    assert report["history"][-1]["loss"] < report["history"][0]["loss"]
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert f.get_tensor("fc.weight").dtype == torch.bfloat16
    assert "embed_tokens.weight" not in names and "lm_head.weight" not in names
    assert {"markov_head.markov_w1.weight", "confidence_head.proj.weight"} <= names
    assert (out / "loss.png").stat().st_size > 0


def _copy(out, dest, skip=()):
    dest.mkdir()
    for name in os.listdir(out):
        if name not in skip and os.path.isfile(out / name):
            (dest / name).write_bytes((out / name).read_bytes())
    return dest


def test_rerun_resumes(trained, tmp_path):
    target, out, _, _ = trained
    copy = _copy(out, tmp_path / "resume")
    proc = _train(["--target", target, "--out", str(copy), "--data", str(out / "data"),
                   "--steps", "210", *COMMON])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "at step 200" in proc.stderr
    assert "generating training data" not in proc.stderr  # the parts are complete
    report = json.loads((copy / "training.json").read_text())
    assert report["step"] == 210 and report["finished"] and report["restarts"] == []


def test_a_machine_with_only_the_export_warm_restarts(trained, tmp_path):
    """What travels between GPU machines: config.json, model.safetensors (bf16),
    training.json (and the data parts); no train_state.pt."""
    target, out, _, _ = trained
    copy = _copy(out, tmp_path / "warm", skip=("train_state.pt",))
    proc = _train(["--target", target, "--out", str(copy), "--data", str(out / "data"),
                   "--steps", "220", *COMMON])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "warm restart from" in proc.stderr and "at step 200" in proc.stderr
    report = json.loads((copy / "training.json").read_text())
    assert report["step"] == 220 and report["finished"]
    assert [r["step"] for r in report["restarts"]] == [200]
    val = report["validation"]
    assert val[-1]["loss"] < 0.85 * val[0]["loss"]  # what was learnt came along


def test_trained_drafter_beats_a_random_one_in_the_engine(trained, tmp_path):
    target, out, _, _ = trained
    random_draft = str(tmp_path / "random")
    make_drafter(target, random_draft, block_size=4, num_layers=1, markov_rank=16)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    rng = random.Random(1)  # fresh prompts from the training prompts' distribution
    prompts = []
    for _ in range(8):
        text = " ".join(rng.choice(WORDS) for _ in range(5))
        ids = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True,
                                      add_generation_prompt=True)
        prompts.append(list(ids["input_ids"] if hasattr(ids, "keys") else ids))
    rates = {}
    for name, draft in (("trained", str(out)), ("random", random_draft)):
        res = run_job({"target": target, "draft": draft, "gamma": 4, "batches": [
            {"prompts": prompts, "sampling": {"temperature": 0.0, "max_tokens": 48,
                                              "ignore_eos": True}}]})
        drafted, accepted, _ = acceptance(res)
        rates[name] = accepted / drafted
    assert rates["trained"] > 0.6 and rates["random"] < 0.1, rates


def test_bad_arguments_fail_fast(tmp_path):
    proc = _train(["--target", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert proc.returncode != 0 and "build-target" in proc.stderr
    assert not (tmp_path / "o").exists()
