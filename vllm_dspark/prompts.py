"""Prompt files and chat-templated prompt ids, shared by train, eval, calibrate, benchmarks.

A prompt file is jsonl; each record's first user turn is the prompt (MT-Bench /
EAGLE ``{"turns": [...]}``, chat ``messages``/``conversations``, or a plain
``prompt``-like string field).
"""

from __future__ import annotations

import json
from typing import Any


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
