"""Training data in compressed parts, without an engine: the writer's size cap, what the
trainer reads (directory, file, glob), the generator's resume / extend / recipe checks
with a fake vLLM, and when `vllm-dspark train` generates."""

import argparse
import gzip
import json
import os
import random
import sys
import types

import pytest

from vllm_dspark.train import dataset as ds
from vllm_dspark.train.cli import needs_generation
from vllm_dspark.train.data import generate


def _rows(n, seed=0, length=200):
    rng = random.Random(seed)
    return [{"prompt": f"p{seed}-{i}", "topic": "t",
             "prompt_ids": [rng.randrange(49152) for _ in range(20)],
             "answer_ids": [rng.randrange(49152) for _ in range(length)]} for i in range(n)]


def _write_part(directory, index, rows, max_bytes=ds.MAX_PART_BYTES):
    w = ds.PartWriter(str(directory), index, max_bytes)
    for r in rows:
        w.write(r)
    return w.close()


def test_part_writer_caps_every_file_and_round_trips(tmp_path):
    rows = _rows(1000)  # ~0.6 MB compressed (random ids: ~2.6 bytes each)
    files = _write_part(tmp_path, 0, rows, max_bytes=200_000)
    names = [f["file"] for f in files]
    assert len(names) >= 3 and names[0] == "data-00000.jsonl.gz"
    assert names[1:] == [f"data-00000.{i}.jsonl.gz" for i in range(1, len(names))]
    assert all(0 < f["bytes"] <= 200_000 for f in files)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    assert ds.complete_parts(str(tmp_path)) == {0}
    loaded = ds.load_rows(str(tmp_path))  # written order: main file, then .1, .2 ...
    assert [(list(p), list(a)) for p, a in loaded] == [
        (r["prompt_ids"], r["answer_ids"]) for r in rows]
    # The same rows give the same bytes (no name or time in the gzip header).
    other = tmp_path / "again"
    other.mkdir()
    _write_part(other, 0, rows, max_bytes=200_000)
    for n in names:
        assert (tmp_path / n).read_bytes() == (other / n).read_bytes()


def test_a_part_is_complete_only_once_its_main_file_exists(tmp_path):
    w = ds.PartWriter(str(tmp_path), 3)
    w.write(_rows(1)[0])
    assert ds.complete_parts(str(tmp_path)) == set()  # still .tmp
    w.close()
    assert ds.complete_parts(str(tmp_path)) == {3}
    (tmp_path / "data-00003.1.jsonl.gz.tmp").write_bytes(b"x")  # an interrupted redo
    ds.remove_part(str(tmp_path), 3)
    assert os.listdir(tmp_path) == []


def test_data_accepts_a_directory_a_file_a_gz_file_and_a_glob(tmp_path):
    rows = _rows(6, length=5)
    plain = tmp_path / "a.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows[3:]))
    assert len(ds.load_rows(str(plain))) == 3
    assert len(ds.load_rows(str(tmp_path / "b.jsonl.gz"))) == 3
    assert len(ds.load_rows(str(tmp_path))) == 6
    assert len(ds.load_rows(str(tmp_path / "*.jsonl*"))) == 6
    (tmp_path / "notes.txt").write_text("ignored")
    assert [os.path.basename(f) for f in ds.data_files(str(tmp_path))] == ["a.jsonl",
                                                                        "b.jsonl.gz"]
    with pytest.raises(ds.DataError, match="no training data"):
        ds.data_files(str(tmp_path / "nothing-*.jsonl"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ds.DataError, match="bad.jsonl:1"):
        ds.load_rows(str(tmp_path / "bad.jsonl"))


# ----------------------------------------------------------- the generator, fake vLLM
class _Out:
    def __init__(self, text="", token_ids=(), finish_reason="stop"):
        self.text, self.token_ids, self.finish_reason = text, list(token_ids), finish_reason


class _Result:
    def __init__(self, out):
        self.outputs = [out]


class FakeLLM:
    """Magpie pre-queries get a prompt chosen by the request's seed (a few repeat, one is
    an evaluation prompt); answers are a function of the prompt ids."""
    instances = 0
    answered = 0

    def __init__(self, *a, **kw):
        FakeLLM.instances += 1

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                seed = params[i].kw["seed"]
                text = ("What is the capital of France, exactly?" if seed % 50 == 7
                        else f"Question number {seed % 400} about things")
                outs.append(_Result(_Out(text=text)))
            else:
                FakeLLM.answered += 1
                ids = p["prompt_token_ids"]
                outs.append(_Result(_Out(token_ids=[(sum(ids) + k) % 300 for k in range(9)])))
        return outs


class _Params:
    def __init__(self, **kw):
        self.kw = kw


@pytest.fixture
def fake_vllm(monkeypatch):
    mod = types.ModuleType("vllm")
    mod.LLM, mod.SamplingParams = FakeLLM, _Params
    monkeypatch.setitem(sys.modules, "vllm", mod)
    FakeLLM.instances = FakeLLM.answered = 0
    return FakeLLM


def _args(target, out, excluded, **kw):
    a = dict(target=target, out=str(out), seed=0, dtype="float32", max_len=256,
             enforce_eager=False, prompts=None, num_samples=50, part_rows=20,
             max_part_bytes=ds.MAX_PART_BYTES, exclude_prompts=str(excluded),
             max_prompt_tokens=32, max_answer_tokens=16, answer_temperature=0.0,
             answer_top_p=1.0, gpu_memory_utilization=0.5, max_num_seqs=None)
    a.update(kw)
    return argparse.Namespace(**a)


@pytest.fixture
def evalset(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    (d / "toy.jsonl").write_text(json.dumps({"turns": ["What is the capital of France, "
                                                       "exactly?"]}) + "\n")
    return d


def test_generator_writes_resumes_and_extends_parts(targets, tmp_path, fake_vllm, evalset):
    out = tmp_path / "data"
    meta = generate(_args(targets["qwen3"], out, evalset))
    assert meta["complete"] and meta["num_parts"] == 3 and fake_vllm.instances == 1
    assert [p["index"] for p in meta["parts"]] == [0, 1, 2]
    assert [p["rows"] for p in meta["parts"]] == [20, 20, 10]
    assert meta["num_rows"] == 50 == len(ds.load_rows(str(out)))
    assert meta["recipe"]["seed"] == 0 and meta["source"] == "magpie"
    assert meta["excluded"]["files"] == {"toy.jsonl": 1} and meta["excluded"]["dropped"] > 0
    prompts = [r["prompt"] for f in ds.data_files(str(out)) for r in ds.iter_records(f)]
    assert len(set(prompts)) == 50  # distinct across parts
    assert not any("France" in p for p in prompts)  # never an evaluation prompt
    before = (out / "data-00001.jsonl.gz").read_bytes()

    # A lost part is regenerated alone, identically; the others are skipped.
    os.remove(out / "data-00001.jsonl.gz")
    fake_vllm.answered = 0
    meta = generate(_args(targets["qwen3"], out, evalset))
    assert fake_vllm.answered == 20 and meta["complete"]
    assert (out / "data-00001.jsonl.gz").read_bytes() == before

    # Complete: no engine at all.
    generate(_args(targets["qwen3"], out, evalset))
    assert fake_vllm.instances == 2

    # More samples add parts; the first ones stay.
    meta = generate(_args(targets["qwen3"], out, evalset, num_samples=70))
    assert meta["num_parts"] == 4 and meta["num_rows"] == 70 and meta["complete"]
    assert (out / "data-00001.jsonl.gz").read_bytes() == before


def test_generator_refuses_another_recipe_or_parts_without_meta(targets, tmp_path,
                                                                 fake_vllm, evalset):
    out = tmp_path / "data"
    generate(_args(targets["qwen3"], out, evalset, num_samples=20))
    with pytest.raises(ds.DataError, match="another recipe.*seed"):
        generate(_args(targets["qwen3"], out, evalset, num_samples=40, seed=1))
    os.remove(out / ds.META_NAME)
    with pytest.raises(ds.DataError, match="no data.meta.json"):
        generate(_args(targets["qwen3"], out, evalset, num_samples=40))


def test_generator_with_a_prompt_file(targets, tmp_path, fake_vllm, evalset):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"prompt {i}"]}) + "\n"
                               for i in range(30))
                       + json.dumps({"turns": ["What is the capital of France, exactly?"]}))
    meta = generate(_args(targets["qwen3"], tmp_path / "d", evalset, prompts=str(prompts),
                          num_samples=100))
    assert meta["num_rows"] == 30 and meta["source"] == "prompts file"
    assert meta["excluded"]["dropped_from_prompts_file"] == 1


# ----------------------------------------------------------- when train generates
def test_train_generates_only_what_is_missing(tmp_path):
    d = tmp_path / "data"
    assert needs_generation(str(d), 50, 20)  # absent
    d.mkdir()
    assert needs_generation(str(d), 50, 20)  # empty
    for k in range(3):
        _write_part(d, k, _rows(2, seed=k, length=4))
    assert not needs_generation(str(d), 50, 20)  # carried parts without a meta: used
    ds.write_meta(str(d), {"complete": True, "parts": []})
    assert not needs_generation(str(d), 50, 20)
    assert needs_generation(str(d), 70, 20)  # a fourth part is planned
    ds.write_meta(str(d), {"complete": True, "num_samples": 50, "parts": []})
    assert needs_generation(str(d), 60, 20)  # the short last part grows
    assert not needs_generation(str(d), 40, 20)  # a smaller plan keeps what is there
    ds.write_meta(str(d), {"complete": False, "parts": []})
    assert needs_generation(str(d), 50, 20)
    f = tmp_path / "x.jsonl"
    f.write_text("")
    assert not needs_generation(str(f), 50, 20)
    assert not needs_generation(str(tmp_path / "data" / "*.jsonl.gz"), 50, 20)
    with pytest.raises(SystemExit, match="does not exist"):
        needs_generation(str(tmp_path / "missing.jsonl.gz"), 50, 20)


def test_shards_write_every_part_once_and_a_lost_part_stays_missing(targets, tmp_path,
                                                                     fake_vllm, evalset):
    out = tmp_path / "data"
    first = generate(_args(targets["qwen3"], out, evalset, shard=(0, 2)))
    assert [p["index"] for p in first["parts"]] == [0, 2] and not first["complete"]
    meta = generate(_args(targets["qwen3"], out, evalset, shard=(1, 2)))
    assert [p["index"] for p in meta["parts"]] == [0, 1, 2] and meta["complete"]
    assert [r["shard"] for r in meta["runs"]] == ["0/2", "1/2"]
    assert meta["num_rows"] == 50 and len(ds.load_rows(str(out))) <= 50
    assert ds.read_meta(str(out)) == meta

    # Part 1 is lost: shard 0 has nothing to do, and its meta must not call part 1 done
    # from the stale entry on disk; shard 1 then regenerates it.
    os.remove(out / "data-00001.jsonl.gz")
    meta = generate(_args(targets["qwen3"], out, evalset, shard=(0, 2)))
    assert not meta["complete"] and [p["index"] for p in meta["parts"]] == [0, 2]
    fake_vllm.answered = 0
    meta = generate(_args(targets["qwen3"], out, evalset, shard=(1, 2)))
    assert meta["complete"] and fake_vllm.answered == 20


def test_load_rows_counts_a_repeated_prompt_once(tmp_path):
    w = ds.PartWriter(str(tmp_path), 0)
    for answer in ([1, 2], [3, 4]):
        w.write({"prompt": "p", "topic": "t", "prompt_ids": [5, 6], "answer_ids": answer})
    w.write({"prompt": "q", "topic": "t", "prompt_ids": [7], "answer_ids": [8, 9]})
    w.close()
    rows = ds.load_rows(str(tmp_path))
    assert [list(a) for _, a in rows] == [[1, 2], [8, 9]]


def test_train_data_shards_start_one_generator_each_with_its_share(targets, tmp_path,
                                                                   fake_vllm, evalset,
                                                                   monkeypatch):
    """`train --data-shards 2`: two generator processes, each `--shard i/2` and half the
    memory; together they write the whole plan (run here in-process, fake vLLM)."""
    from vllm_dspark.train import cli, data, proc

    seen = []

    def fake_run(cmd, done, **kw):
        argv = cmd[cmd.index("vllm_dspark.train.data") + 1:]
        seen.append(argv)
        data.generate(data.parse_args(argv))
        return 0

    monkeypatch.setattr(proc, "run_until_done", fake_run)
    out = tmp_path / "run"
    args = argparse.Namespace(
        target=targets["qwen3"], num_samples=50, part_rows=20, seed=0, max_len=256,
        max_part_bytes=ds.MAX_PART_BYTES, max_prompt_tokens=32, max_answer_tokens=16,
        answer_temperature=0.0, answer_top_p=1.0, gpu_memory_utilization=0.5,
        max_num_seqs=None, prompts=None, exclude_prompts=str(evalset), enforce_eager=False,
        data_shards=2)
    cli.generate_data(args, str(out))
    assert sorted(a[a.index("--shard") + 1] for a in seen) == ["0/2", "1/2"]
    assert all(a[a.index("--gpu-memory-utilization") + 1] == "0.2500" for a in seen)
    meta = ds.read_meta(str(out))
    assert meta["complete"] and [p["index"] for p in meta["parts"]] == [0, 1, 2]


def test_a_shard_starting_beside_another_finds_its_recipe(targets, tmp_path, fake_vllm,
                                                         evalset, monkeypatch):
    """The meta (with the recipe) is on disk before the first part, so a shard that
    starts while another has written parts but no meta entry for them yet does not take
    them for parts of an unknown recipe (seen in CI, two shards in threads)."""
    out = tmp_path / "data"
    seen = []
    answer = fake_vllm.generate

    def generate_checking_meta(self, prompts, params, use_tqdm=False):
        seen.append(ds.read_meta(str(out)) is not None)
        return answer(self, prompts, params, use_tqdm)

    monkeypatch.setattr(fake_vllm, "generate", generate_checking_meta)
    generate(_args(targets["qwen3"], out, evalset, shard=(0, 2)))
    assert seen and all(seen)
    # Shard 0 mid-run: its parts on disk, the meta still as it started (no parts).
    meta = ds.read_meta(str(out))
    ds.write_meta(str(out), dict(meta, parts=[], runs=[]))
    second = generate(_args(targets["qwen3"], out, evalset, shard=(1, 2)))
    assert [p["index"] for p in second["parts"]] == [1] and not second["complete"]
