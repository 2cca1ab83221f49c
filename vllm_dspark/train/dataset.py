"""Training data on disk: the generator's compressed parts, and what the trainer reads.

A data set is one of

- a directory of parts ``data-00000.jsonl.gz``, ``data-00001.jsonl.gz``, ... with
  ``data.meta.json`` beside them (counts, recipe, seed, excluded evaluation prompts),
  as ``python -m vllm_dspark.train.data`` writes it;
- a ``.jsonl`` or ``.jsonl.gz`` file (the generator's older single-file output);
- a glob over such files (quote it).

Each row is ``{"prompt", "topic", "prompt_ids", "answer_ids"}``. A part is one unit of
generation work (``part_rows`` prompts); it is written to ``<name>.tmp`` and renamed
when complete, so a part that exists is whole and a rerun skips it. Every file stays
under ``MAX_PART_BYTES`` (15 MB, below the 16 MiB a lent GPU machine returns per file):
a part that would grow past it continues in ``data-00003.1.jsonl.gz``, ``.2`` ..., which
are renamed before the part's main file, whose existence marks the part complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import gzip
import json
import os
import re
from array import array
from collections.abc import Iterator

META_NAME = "data.meta.json"
MAX_PART_BYTES = 15_000_000
# The compressed size lags what was written by zlib's buffer; roll over this early
# (at most a quarter of the limit).
_ROLL_SLACK = 1_000_000
_PART_RE = re.compile(r"^data-(\d{5})(?:\.(\d+))?\.jsonl\.gz$")


class DataError(ValueError):
    """Training data that cannot be used, and what to do about it."""


def part_name(index: int, sub: int = 0) -> str:
    return f"data-{index:05d}.jsonl.gz" if sub == 0 else f"data-{index:05d}.{sub}.jsonl.gz"


def complete_parts(directory: str) -> set[int]:
    """Indices of the parts whose main file exists (written whole, then renamed)."""
    if not os.path.isdir(directory):
        return set()
    out = set()
    for name in os.listdir(directory):
        m = _PART_RE.match(name)
        if m and m.group(2) is None:
            out.add(int(m.group(1)))
    return out


def remove_part(directory: str, index: int) -> None:
    """Every file of part ``index`` (main, continuations, temporaries): before a redo."""
    prefix = f"data-{index:05d}."
    for name in os.listdir(directory):
        if name.startswith(prefix):
            os.remove(os.path.join(directory, name))


def read_meta(directory: str) -> dict | None:
    path = os.path.join(directory, META_NAME)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def write_meta(directory: str, meta: dict) -> None:
    path = os.path.join(directory, META_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: shards write side by side
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, path)


@contextlib.contextmanager
def meta_lock(directory: str):
    """Exclusive while held: the shards of one generation read-modify-write the meta."""
    fd = os.open(directory, os.O_RDONLY)  # the directory itself: no lock file left behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class PartWriter:
    """Rows of one part, gzip-compressed, in files of at most ``max_bytes`` each.

    Files are written as ``.tmp`` and renamed by ``close()``: continuations first, the
    main file last. gzip headers carry no name or time, so equal rows give equal bytes.
    """

    def __init__(self, directory: str, index: int, max_bytes: int = MAX_PART_BYTES):
        if max_bytes < 100_000:
            raise ValueError("max_bytes must be at least 100 kB")
        self.directory, self.index, self.max_bytes = directory, index, max_bytes
        self._slack = min(_ROLL_SLACK, max_bytes // 4)
        self.files: list[str] = []  # final paths, in order
        self.rows = 0
        self._rows_in_file = 0
        self._raw = self._gz = None
        self._open()

    def _open(self) -> None:
        path = os.path.join(self.directory, part_name(self.index, len(self.files)))
        self.files.append(path)
        self._raw = open(path + ".tmp", "wb")
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)
        self._rows_in_file = 0

    def _finish_file(self) -> None:
        self._gz.close()
        self._raw.close()
        size = os.path.getsize(self.files[-1] + ".tmp")
        if size > self.max_bytes:  # one row larger than the slack: cannot happen here
            raise DataError(f"{self.files[-1]} is {size} bytes, over {self.max_bytes}")

    def write(self, row: dict) -> None:
        line = (json.dumps(row, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        if (self._rows_in_file
                and self._raw.tell() + len(line) > self.max_bytes - self._slack):
            self._finish_file()
            self._open()
        self._gz.write(line)
        self._rows_in_file += 1
        self.rows += 1

    def close(self) -> list[dict]:
        """Rename the files into place (the main one last); their names and sizes."""
        self._finish_file()
        for path in self.files[1:] + self.files[:1]:
            os.replace(path + ".tmp", path)
        return [{"file": os.path.basename(p), "bytes": os.path.getsize(p)} for p in self.files]


# ------------------------------------------------------------------------- reading
def data_files(spec: str) -> list[str]:
    """The data files ``spec`` names: a directory's parts (and any *.jsonl / *.jsonl.gz
    in it), a file, or a glob; sorted, so that every machine reads the rows in one order."""
    if os.path.isdir(spec):
        files = [os.path.join(spec, f) for f in os.listdir(spec)
                 if f.endswith((".jsonl", ".jsonl.gz"))]
    elif os.path.isfile(spec):
        files = [spec]
    else:
        files = [f for f in glob.glob(spec) if os.path.isfile(f)
                 and f.endswith((".jsonl", ".jsonl.gz"))]
    if not files:
        what = ("a directory without .jsonl / .jsonl.gz files" if os.path.isdir(spec)
                else "no such file, and a glob that matches no .jsonl / .jsonl.gz file")
        raise DataError(f"no training data at {spec!r} ({what}). Pass --data a directory of "
                        "parts (data-00000.jsonl.gz ...), a .jsonl or .jsonl.gz file, or a "
                        "quoted glob; or let `vllm-dspark train` generate the data.")
    return sorted(files, key=_order)


def _order(path: str) -> tuple:
    """Parts by (index, continuation), i.e. in the order they were written; others by name."""
    m = _PART_RE.match(os.path.basename(path))
    if m:
        return (os.path.dirname(path), 0, int(m.group(1)), int(m.group(2) or 0), "")
    return (os.path.dirname(path), 1, 0, 0, os.path.basename(path))


def iter_records(path: str) -> Iterator[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not a JSON row ({e}); regenerate that "
                                    "file (delete it and rerun the generator)") from e


def load_rows(spec: str) -> list[tuple[array, array]]:
    """(prompt_ids, answer_ids) of every row, as compact int32 arrays (a 50 k-row set
    holds ~35 M token ids: Python lists of ints would take over a GB). A prompt that
    repeats (the shards of one generation each keep their own prompts distinct, not
    each other's) counts once: its first row in part order."""
    rows, seen = [], set()
    for path in data_files(spec):
        for r in iter_records(path):
            key = tuple(r["prompt_ids"])
            if key in seen:
                continue
            seen.add(key)
            rows.append((array("i", r["prompt_ids"]), array("i", r["answer_ids"])))
    if not rows:
        raise DataError(f"{spec} holds no training rows; regenerate it.")
    return rows


def describe(spec: str) -> dict:
    """What the training report records about its data: files, and the generator's meta
    (recipe, counts) when ``spec`` is a directory that has one."""
    files = data_files(spec)
    out: dict = {"spec": spec, "files": [os.path.basename(f) for f in files],
                 "bytes": sum(os.path.getsize(f) for f in files)}
    meta = read_meta(spec) if os.path.isdir(spec) else None
    if meta:
        out["meta"] = {k: meta.get(k) for k in ("num_rows", "answer_tokens", "complete",
                                                "source", "recipe", "excluded")}
    return out
