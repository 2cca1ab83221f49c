"""Prompt files and chat-templated prompt ids, shared by train, eval, calibrate, benchmarks.

A prompt file is jsonl; each record's first user turn is the prompt (MT-Bench /
EAGLE ``{"turns": [...]}``, chat ``messages``/``conversations``, or a plain
``prompt``-like string field).

Where a tool takes a dataset, it takes a .jsonl path or a name: ``gsm8k`` is
``<prompt dir>/gsm8k.jsonl``, the prompt directory being ``--prompt-dir``, else
``$VLLM_DSPARK_PROMPT_DIR``, else the reference sets that ship in the package
(``vllm_dspark/reference_prompts``: gsm8k, humaneval, math500, mbpp, mt-bench; their
sources and licences are in its README.md).
"""

from __future__ import annotations

import json
import os
from typing import Any

PROMPT_DIR_ENV = "VLLM_DSPARK_PROMPT_DIR"
REFERENCE_PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "reference_prompts")


class PromptFileError(ValueError):
    """A dataset name or prompt file that cannot be used, and how to fix it."""


def default_prompt_dir() -> str:
    """``$VLLM_DSPARK_PROMPT_DIR`` if set, else the packaged reference prompt sets."""
    return os.environ.get(PROMPT_DIR_ENV) or REFERENCE_PROMPT_DIR


def available_datasets(prompt_dir: str | None = None) -> list[str]:
    """The names (``<name>.jsonl``) in ``prompt_dir`` (default: ``default_prompt_dir()``)."""
    prompt_dir = prompt_dir or default_prompt_dir()
    if not os.path.isdir(prompt_dir):
        return []
    return sorted(f[: -len(".jsonl")] for f in os.listdir(prompt_dir) if f.endswith(".jsonl"))


def resolve_dataset(spec: str, prompt_dir: str | None = None) -> tuple[str, str]:
    """(name, path) for a dataset given as a .jsonl path or a name in ``prompt_dir``
    (default: ``default_prompt_dir()``); PromptFileError naming what exists otherwise."""
    prompt_dir = prompt_dir or default_prompt_dir()
    if os.path.isfile(spec):
        name = os.path.basename(spec)
        return (name[: -len(".jsonl")] if name.endswith(".jsonl") else name), spec
    if os.sep in spec or (os.altsep and os.altsep in spec):  # a path, not a name
        raise PromptFileError(f"prompt file {spec!r} does not exist; pass a jsonl file with "
                              "one {\"turns\": [\"...\"]} per line, or a dataset name.")
    name = spec[: -len(".jsonl")] if spec.endswith(".jsonl") else spec
    path = os.path.join(prompt_dir, name + ".jsonl")
    if os.path.isfile(path):
        return name, path
    names = available_datasets(prompt_dir)
    where = (f"available names there: {', '.join(names)}" if names
             else "that directory holds no .jsonl files" if os.path.isdir(prompt_dir)
             else "that directory does not exist")
    raise PromptFileError(
        f"unknown dataset {spec!r}: not a file, and no {name}.jsonl in the prompt directory "
        f"{os.path.abspath(prompt_dir)!r}; {where}. Pass a .jsonl path, or point --prompt-dir "
        f"(or ${PROMPT_DIR_ENV}) at a directory of <name>.jsonl files."
    )


def first_user_turn(record: Any) -> str:
    """The first user message of one jsonl record (MT-Bench/EAGLE ``turns`` and common forms)."""
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        raise ValueError(f"a prompt record must be an object or a string, not {type(record)}")
    turns = record.get("turns")
    if isinstance(turns, list) and turns:
        first = turns[0]
        return first if isinstance(first, str) else first_user_turn(first)
    for key in ("messages", "conversations", "conversation"):
        msgs = record.get(key)
        if isinstance(msgs, list):
            for m in msgs:
                if isinstance(m, dict) and (m.get("role") or m.get("from")) in ("user", "human"):
                    return str(m.get("content", m.get("value", "")))
    for key in ("prompt", "question", "instruction", "input", "problem", "text", "content"):
        if isinstance(record.get(key), str):
            return record[key]
    raise ValueError(f"no user turn found in record with keys {sorted(record)}; write "
                     "prompts as {\"turns\": [\"...\"]} per line")


def read_prompts(path: str, limit: int | None = None) -> list[str]:
    """The first user turn of the first ``limit`` (default: all) records of a jsonl file.
    A bad line raises ValueError naming ``path:line``."""
    prompts: list[str] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(prompts) >= limit:
                break
            if not line.strip():
                continue
            try:
                prompts.append(first_user_turn(json.loads(line)))
            except ValueError as e:  # json.JSONDecodeError is a ValueError
                raise ValueError(f"{path}:{lineno}: {e}") from e
    return prompts


def token_ids(encoded: Any) -> list[int]:
    """Plain ids from a tokenizer call: transformers 5 may return a BatchEncoding."""
    if isinstance(encoded, dict) or hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def chat_prompt_ids(tokenizer: Any, user_text: str) -> list[int]:
    """``user_text`` as a one-turn chat ready for the answer (the template's generation
    prompt); a tokenizer without a chat template tokenizes the text as is."""
    if not getattr(tokenizer, "chat_template", None):
        return token_ids(tokenizer(user_text))
    return token_ids(tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=True, add_generation_prompt=True))
