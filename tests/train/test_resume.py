"""The trainer on data parts, without an engine: --epochs, --pause-at, the exact resume
from train_state.pt, and the warm restart from the exported bf16 checkpoint alone (what
travels between machines)."""

import json
import os
import random
import shutil

import pytest
import torch

from vllm_dspark.train import dataset as ds
from vllm_dspark.train.trainer import STATE_NAME, Trainer, TrainConfig


@pytest.fixture(autouse=True)
def _tiny_models_on_one_thread(one_thread):
    """tests/conftest.one_thread for every test here."""


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """Two parts of synthetic rows (token ids of the tiny vocabulary)."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    for k in range(2):
        w = ds.PartWriter(str(d), k)
        for i in range(20):
            w.write({"prompt": f"{k}-{i}", "topic": "t",
                     "prompt_ids": [rng.randrange(4, 300) for _ in range(6)],
                     "answer_ids": [rng.randrange(4, 300) for _ in range(rng.randint(12, 30))]})
        w.close()
    ds.write_meta(str(d), {"complete": True, "num_rows": 40, "parts": []})
    return str(d)


def _cfg(target, out, data, **kw):
    base = dict(target=target, out=str(out), data=data, gamma=3, num_layers=1, markov_rank=8,
                batch_size=4, anchors=4, max_len=64, lr=3e-3, warmup=2, rewarmup=4,
                save_every=1000, log_every=1, dtype="float32", device="cpu", steps=12)
    base.update(kw)
    return TrainConfig(**base)


def _report(out):
    with open(os.path.join(out, "training.json")) as f:
        return json.load(f)


def test_epochs_set_the_steps_and_the_report_counts_sequences(targets, tmp_path, parts):
    t = Trainer(_cfg(targets["qwen3"], tmp_path / "a", parts, steps=None, epochs=1.5))
    assert len(t.train_rows) + len(t.val_rows) == 40
    assert t.cfg.steps == -(-int(1.5 * len(t.train_rows)) // 4)
    assert t.train()
    rep = _report(tmp_path / "a")
    assert rep["sequences_seen"] == rep["step"] * 4 == t.cfg.steps * 4
    assert rep["data_rows"] == 40 and rep["data_info"]["files"] == [
        "data-00000.jsonl.gz", "data-00001.jsonl.gz"]
    assert rep["throughput"]["steps"] == t.cfg.steps and rep["restarts"] == []
    assert (tmp_path / "a" / "loss.png").stat().st_size > 0


def test_pause_then_exact_resume_equals_one_run(targets, tmp_path, parts):
    Trainer(_cfg(targets["qwen3"], tmp_path / "one", parts)).train()
    assert not Trainer(_cfg(targets["qwen3"], tmp_path / "two", parts, pause_at=5)).train()
    assert _report(tmp_path / "two")["step"] == 5 and not _report(tmp_path / "two")["finished"]
    assert Trainer(_cfg(targets["qwen3"], tmp_path / "two", parts)).train()
    a, b = _report(tmp_path / "one"), _report(tmp_path / "two")
    assert [h["loss"] for h in a["history"]] == pytest.approx(
        [h["loss"] for h in b["history"]], rel=1e-5)


def test_warm_restart_from_the_bf16_export(targets, tmp_path, parts, capsys):
    out = tmp_path / "w"
    Trainer(_cfg(targets["qwen3"], out, parts, pause_at=6)).train()
    os.remove(out / STATE_NAME)  # only config.json, model.safetensors, training.json travel
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)
    t = Trainer(_cfg(targets["qwen3"], moved, parts))
    t.resume()
    assert "warm restart" in capsys.readouterr().err
    assert t.step == 6 and (t.epoch, t.cursor) == divmod(6 * 4, len(t.train_rows))
    assert not t.opt.state  # a fresh optimizer
    from safetensors.torch import load_file

    saved = load_file(str(out / "model.safetensors"))
    for k, v in t.drafter.state_dict().items():
        if k in saved:
            assert v.dtype == torch.float32 and torch.equal(v, saved[k].float()), k
    # The learning rate ramps back over rewarmup steps, then follows the schedule.
    assert t._lr(6) == pytest.approx(_plain_lr(t, 6) / 4)  # rewarmup 4
    assert t._lr(8) == pytest.approx(_plain_lr(t, 8) * 3 / 4)
    assert t._lr(10) == pytest.approx(_plain_lr(t, 10))
    t.train()
    rep = _report(moved)
    assert rep["finished"] and rep["step"] == 12
    assert [r["step"] for r in rep["restarts"]] == [6] and rep["restarts"][0]["kind"] == "warm"
    assert [h["step"] for h in rep["history"]][:6] == [1, 2, 3, 4, 5, 6]
    assert len(rep["history"]) == 12


def _plain_lr(t, step):
    restarts, t.restarts = t.restarts, []
    try:
        return t._lr(step)
    finally:
        t.restarts = restarts


def test_resume_refuses_other_data(targets, tmp_path, parts):
    out = tmp_path / "x"
    Trainer(_cfg(targets["qwen3"], out, parts, pause_at=2)).train()
    one_part = os.path.join(parts, "data-00000.jsonl.gz")
    with pytest.raises(ValueError, match="20 data rows|40 data rows"):
        Trainer(_cfg(targets["qwen3"], out, one_part)).resume()
    os.remove(out / STATE_NAME)
    with pytest.raises(ValueError, match="40 data rows"):
        Trainer(_cfg(targets["qwen3"], out, one_part)).resume()
    with pytest.raises(ValueError, match="another configuration"):
        Trainer(_cfg(targets["qwen3"], out, parts, markov_rank=4)).resume()
