"""The benchmark-target builder (vllm_dspark.targets): GGUF -> HF Llama directory.

Fast tests check the rotary-permutation inverse against llama.cpp's own formula
and round-trip a tiny synthetic Llama through a GGUF file. The engine test builds
the real SmolLM2-135M-Instruct (from PyPI, cached) and checks that transformers
and vLLM greedy-decode it identically, and that it answers sensibly: a wrong
permutation undo still loads and runs, but talks nonsense.
"""

import argparse
import subprocess

import numpy as np
import pytest
import torch

from conftest import requires_vllm
from harness import run_job
from vllm_dspark import targets
from vllm_dspark.targets import TargetBuildError, convert_gguf_llama, unpermute_rope_rows


def llama_cpp_permute(weights, n_head: int, n_head_kv: int | None):
    """Copied from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


# --------------------------------------------------------------------------- fast


@pytest.mark.parametrize("n_head,n_kv,head_dim,hidden", [(9, 3, 64, 576), (4, 2, 8, 32)])
def test_unpermute_inverts_llama_cpp_permute(n_head, n_kv, head_dim, hidden):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    k = rng.standard_normal((n_kv * head_dim, hidden)).astype(np.float32)
    q_gguf, k_gguf = llama_cpp_permute(q, n_head, n_head), llama_cpp_permute(k, n_head, n_kv)
    assert not np.array_equal(q_gguf, q)  # the permutation does move rows
    np.testing.assert_array_equal(unpermute_rope_rows(q_gguf, n_head), q)
    np.testing.assert_array_equal(unpermute_rope_rows(k_gguf, n_kv), k)
    # torch tensors take the same path
    assert torch.equal(unpermute_rope_rows(torch.from_numpy(k_gguf), n_kv), torch.from_numpy(k))


TINY = dict(hidden=32, inter=48, layers=2, n_head=4, n_kv=2, head_dim=8)


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["Ġt", "Ġth"]
    types = [3] * len(specials) + [1] * (len(tokens) - len(specials))
    return tokens, types, ["Ġ t", "Ġt h"]


def hf_state(vocab: int, tied: bool) -> dict[str, np.ndarray]:
    """Random weights in HF LlamaForCausalLM layout."""
    rng = np.random.default_rng(1)
    h, inter = TINY["hidden"], TINY["inter"]
    q, kv = TINY["n_head"] * TINY["head_dim"], TINY["n_kv"] * TINY["head_dim"]

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    state = {"model.embed_tokens.weight": r(vocab, h), "model.norm.weight": r(h)}
    if not tied:
        state["lm_head.weight"] = r(vocab, h)
    for i in range(TINY["layers"]):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": r(q, h), p + "self_attn.k_proj.weight": r(kv, h),
            p + "self_attn.v_proj.weight": r(kv, h), p + "self_attn.o_proj.weight": r(h, q),
            p + "mlp.gate_proj.weight": r(inter, h), p + "mlp.up_proj.weight": r(inter, h),
            p + "mlp.down_proj.weight": r(h, inter),
            p + "input_layernorm.weight": r(h), p + "post_attention_layernorm.weight": r(h),
        })
    return state


def write_tiny_gguf(path: str, state: dict, arch: str = "llama") -> None:
    """What llama.cpp's converter would write for ``state`` (F32, permuted q/k)."""
    import gguf

    to_gguf = {v: k for k, v in targets._GLOBAL_NAMES.items()}
    to_gguf.update({f"model.layers.{i}.{v}.weight": f"blk.{i}.{k}.weight"
                    for i in range(TINY["layers"]) for k, v in targets._LAYER_NAMES.items()})
    tokens, types, merges = tiny_vocab()
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(TINY["layers"])
    w.add_context_length(256)
    w.add_embedding_length(TINY["hidden"])
    w.add_feed_forward_length(TINY["inter"])
    w.add_head_count(TINY["n_head"])
    w.add_head_count_kv(TINY["n_kv"])
    w.add_rope_dimension_count(TINY["head_dim"])
    w.add_rope_freq_base(100000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                        "{% endfor %}")
    for name, t in state.items():
        if name.endswith("q_proj.weight"):
            t = llama_cpp_permute(t, TINY["n_head"], TINY["n_head"])
        elif name.endswith("k_proj.weight"):
            t = llama_cpp_permute(t, TINY["n_head"], TINY["n_kv"])
        w.add_tensor(to_gguf[name], np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_gguf_round_trip(tmp_path, tied):
    import json

    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    tokens, _, _ = tiny_vocab()
    state = hf_state(len(tokens), tied)
    write_tiny_gguf(str(tmp_path / "m.gguf"), state)
    out = convert_gguf_llama(str(tmp_path / "m.gguf"), str(tmp_path / "hf"), dtype="float32")

    loaded = load_file(f"{out}/model.safetensors")
    assert set(loaded) == set(state)
    for name, t in state.items():
        assert torch.equal(loaded[name], torch.from_numpy(t)), name
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["rms_norm_eps"], cfg["rope_theta"], cfg["head_dim"]) == (1e-5, 100000.0, 8)
    assert AutoConfig.from_pretrained(out).num_key_value_heads == TINY["n_kv"]

    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    ids = tok.encode("<|im_start|> the<|im_end|>", add_special_tokens=False)
    assert ids == [1, tokens.index("Ġth"), tokens.index("e"), 2]
    assert tok.decode(ids, skip_special_tokens=True) == " the"
    assert "<|im_start|>" in tok.chat_template
    assert "chat_template" in json.load(open(f"{out}/tokenizer_config.json"))


def test_unsupported_architecture(tmp_path):
    write_tiny_gguf(str(tmp_path / "m.gguf"), hf_state(len(tiny_vocab()[0]), True), arch="gpt2")
    with pytest.raises(TargetBuildError, match="unsupported GGUF architecture 'gpt2'"):
        convert_gguf_llama(str(tmp_path / "m.gguf"), str(tmp_path / "hf"))


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(TargetBuildError, match="GGUF file not found"):
        convert_gguf_llama(str(tmp_path / "nope.gguf"), str(tmp_path / "hf"))
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(TargetBuildError, match="is not a GGUF file"):
        convert_gguf_llama(str(tmp_path / "x.gguf"), str(tmp_path / "hf"))


def test_download_failure_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.delenv(targets.SMOLLM2_ENV, raising=False)
    monkeypatch.setattr(targets, "_installed_smollm2_gguf", lambda: None)
    monkeypatch.setattr(targets.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: Could not find a version that satisfies the requirement"))
    with pytest.raises(TargetBuildError, match="pass --gguf PATH or set VLLM_DSPARK_SMOLLM2"):
        targets.build_smollm2(out_dir=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []  # the temporary build directory is gone too


def test_cli_reports_errors_and_reuses_builds(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    targets.add_arguments(parser)
    args = parser.parse_args(["smollm2", "--out", str(tmp_path / "o"),
                              "--gguf", str(tmp_path / "missing.gguf")])
    assert targets.run(args) == 2
    assert "GGUF file not found" in capsys.readouterr().err

    # A finished build (marker with the current recipe) is returned without any work.
    out = tmp_path / "done"
    out.mkdir()
    targets._write_json(str(out / targets.MARKER), targets._recipe("bfloat16"))
    args = parser.parse_args(["smollm2", "--out", str(out), "--gguf", "/nonexistent"])
    assert targets.run(args) == 0
    assert capsys.readouterr().out.strip() == str(out)


def test_the_build_says_what_it_is_doing(tmp_path, capsys):
    """build-target prints each stage to stderr as it starts (the quickstart's first half
    minute is this build); stdout stays the path alone, for $(vllm-dspark build-target)."""
    tokens, _, _ = tiny_vocab()
    write_tiny_gguf(str(tmp_path / "m.gguf"), hf_state(len(tokens), True))
    parser = argparse.ArgumentParser()
    targets.add_arguments(parser)
    args = parser.parse_args(["smollm2", "--out", str(tmp_path / "o"), "--gguf",
                              str(tmp_path / "m.gguf"), "--dtype", "auto"])
    assert targets.run(args) == 0
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "o")
    assert "converting m.gguf to an HF checkpoint (dequantizing to bfloat16" in err
    assert "built in" in err and str(tmp_path / "o") in err.splitlines()[-1]
    assert targets.run(args) == 0  # built already: said so, nothing redone
    assert "is built already" in capsys.readouterr().err


# --------------------------------------------------------------------------- engine

# Greedy paths whose top-2 logit margin stays >= 0.06 over all 24 steps (fp32), so
# kernel-order differences between transformers and vLLM (~1e-4) cannot flip a token.
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "What color is the sky on a clear day?"]
NEW_TOKENS = 24


@torch.no_grad()
def hf_greedy(path: str, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                             max_new_tokens=NEW_TOKENS, do_sample=False)
        outs.append(out[0, len(ids):].tolist())
    return outs


def strip_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


@requires_vllm
@pytest.mark.engine
def test_smollm2_transformers_and_vllm_agree_and_make_sense(smollm2_target):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_target)
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) for q in QUESTIONS]
    prompts = [tok.encode(t, add_special_tokens=False) for t in texts]
    hf = hf_greedy(smollm2_target, prompts)

    # vLLM gets the chat text, so its own tokenizer loading is checked as well.
    job = {"target": smollm2_target, "batches": [{"prompts": texts, "sampling": {
        "max_tokens": NEW_TOKENS, "temperature": 0.0}}]}
    result = run_job(job)["results"]
    assert [r["prompt_token_ids"] for r in result] == prompts
    vllm = [r["outputs"][0] for r in result]

    eos = tok.eos_token_id
    answers = [tok.decode(strip_eos(h, eos), skip_special_tokens=True) for h in hf]
    for q, h, v, a in zip(QUESTIONS, hf, vllm, answers):
        assert strip_eos(v, eos) == strip_eos(h, eos), (q, a, tok.decode(v))
    assert "Paris" in answers[0], answers
    assert "blue" in answers[2], answers
    assert len(answers[1].split()) >= 10, answers
