"""SPS(B): the target's verification steps per second as a function of batch size B.

The prefix scheduler (paper §3.2.2, Algorithm 1) maximises Θ = τ·SPS(B), where
B = Σ_r (1 + ℓ_r) is the number of tokens the target processes in one
verification step. The paper profiles this "capacity curve" once at engine start
and keeps it as a cost table; this module is that table: measured, saved as JSON,
cached per (model, dtype, device, vLLM version), and looked up in O(log n).

Lookup honours CUDA-graph buckets: up to ``max_capture_size`` (the largest captured
size) it is a step function — a batch of B tokens costs what the smallest measured
size ≥ B costs, since it runs padded to the next captured size, which is what gives
real curves their cliffs (§5.2). Without graphs (CPU, eager) and above the capture
limit nothing is padded, so 1/SPS (time per step) is interpolated linearly between
measured sizes. Above the largest measured size the target is compute bound: 1/SPS
is extrapolated linearly from the last two points (slope clamped at ≥ 0 so noise
cannot make larger batches faster).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch

from vllm_dspark.config import DSparkConfigError

FORMAT = "vllm-dspark-sps/1"
META_KEYS = ("model", "dtype", "device_name", "vllm_version")
# What to do about a bad table depends on whose file it is: the engine's cache is
# rebuilt by deleting it, a user's own table (VLLM_DSPARK_SPS=FILE) by profiling again.
CACHE_FIX = "re-profile (delete the file; the engine measures SPS again at start-up)"


def user_fix(path: str) -> str:
    """The advice for a malformed table the user named (``VLLM_DSPARK_SPS=path``): deleting
    it would only trade this error for "no such file"."""
    return (f"it is the table VLLM_DSPARK_SPS names, not the engine's cache: write it again "
            f"with `vllm-dspark profile --target TARGET --draft DRAFT --out {path}`, or set "
            "VLLM_DSPARK_SPS=profile (or unset it) to measure SPS at start-up")


@dataclass(frozen=True)
class SPSTable:
    b: tuple[int, ...]  # measured batch sizes (tokens per verification step), increasing
    sps: tuple[float, ...]  # measured steps per second at each size
    model: str = ""
    dtype: str = ""
    device_name: str = ""
    vllm_version: str = ""
    max_capture_size: int | None = None  # largest CUDA-graph size; None = eager / unknown
    created: str = ""
    _tensors: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "b", tuple(self.b))
        object.__setattr__(self, "sps", tuple(self.sps))
        _validate(list(self.b), list(self.sps), "SPSTable")
        object.__setattr__(self, "b", tuple(int(x) for x in self.b))
        object.__setattr__(self, "sps", tuple(float(x) for x in self.sps))

    # ------------------------------------------------------------------ lookup
    def _tail_slope(self) -> float:
        """d(seconds per step)/d(token) from the last two points, clamped at ≥ 0."""
        t1, t0 = 1.0 / self.sps[-1], 1.0 / self.sps[-2]
        return max(0.0, (t1 - t0) / (self.b[-1] - self.b[-2]))

    def sps_at(self, batch: int) -> float:
        """SPS of one batch size (scalar form of ``sps_many``)."""
        return float(self.sps_many(torch.tensor([batch]))[0])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return self.sps_many(batch)

    def _dense(self, dev) -> torch.Tensor:
        """SPS for every B = 0..max measured size (the paper's O(1) lookup, §3.2.2)."""
        if dev not in self._tensors:
            b = torch.tensor(self.b, dtype=torch.float64, device=dev)
            t = 1.0 / torch.tensor(self.sps, dtype=torch.float64, device=dev)
            every = torch.arange(self.b[-1] + 1, dtype=torch.float64, device=dev)
            hi = torch.searchsorted(b, every, side="left").clamp(max=len(self.b) - 1)
            lo = (hi - 1).clamp(min=0)
            span = (b[hi] - b[lo]).clamp(min=1.0)
            w = ((every - b[lo]) / span).clamp(0.0, 1.0)
            interp = t[lo] + w * (t[hi] - t[lo])  # linear in time per step
            step = t[hi]  # padded to the next measured (captured) size
            cap = self.max_capture_size
            graphs = every <= cap if cap is not None else torch.zeros_like(every, dtype=bool)
            self._tensors[dev] = 1.0 / torch.where(graphs, step, interp)
        return self._tensors[dev]

    def sps_many(self, batch: torch.Tensor) -> torch.Tensor:
        """Vectorised lookup: float64 tensor of SPS for each batch size in ``batch``."""
        dense = self._dense(batch.device)
        x = batch.to(torch.float64)
        inside = dense[x.ceil().clamp(0, self.b[-1]).long()]
        t = 1.0 / self.sps[-1] + (x - self.b[-1]) * self._tail_slope()
        return torch.where(x <= self.b[-1], inside, 1.0 / t)

    def meta(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "device_name": self.device_name,
                "vllm_version": self.vllm_version, "max_capture_size": self.max_capture_size,
                "created": self.created}

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "batch_sizes": list(self.b), "steps_per_s": list(self.sps),
                "meta": self.meta()}

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "SPS table", fix: str = CACHE_FIX) -> SPSTable:
        """The table in ``d``; one DSparkConfigError naming the problem and ``fix``."""
        if not isinstance(d, dict):
            raise DSparkConfigError(f"{source} is not a JSON object; {fix}.")
        if d.get("format") != FORMAT:
            raise DSparkConfigError(
                f"{source} has format {d.get('format')!r}, expected {FORMAT!r}; {fix}.")
        missing = [k for k in ("batch_sizes", "steps_per_s", "meta") if k not in d]
        meta = d.get("meta")
        if not missing and isinstance(meta, dict):
            missing = [f"meta.{k}" for k in META_KEYS if k not in meta]
        elif not missing:
            missing = ["meta (an object)"]
        if missing:
            raise DSparkConfigError(f"{source} lacks the key(s) {missing}; {fix}.")
        _validate(d["batch_sizes"], d["steps_per_s"], source, fix)
        mcs = meta.get("max_capture_size")
        return cls(b=d["batch_sizes"], sps=d["steps_per_s"],
                   model=str(meta["model"]), dtype=str(meta["dtype"]),
                   device_name=str(meta["device_name"]),
                   vllm_version=str(meta["vllm_version"]),
                   max_capture_size=None if mcs is None else int(mcs),
                   created=str(meta.get("created", "")))

    def save(self, path: str) -> None:
        """Write atomically (temp file + rename) so a crashed writer leaves no half table."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_dict(), f, indent=1)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, *, fix: str = CACHE_FIX) -> SPSTable:
        """Read a table; ``fix`` is the advice for a malformed one (default: the cache's,
        delete it; ``user_fix(path)`` for a table the user wrote or named)."""
        try:
            with open(path) as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise DSparkConfigError(f"SPS table {path} is not valid JSON ({e}); {fix}.") from e
        return cls.from_dict(d, source=f"SPS table {path}", fix=fix)


def _validate(b: Any, s: Any, source: str, fix: str = CACHE_FIX) -> None:
    """One DSparkConfigError naming the first problem found, and the fix."""
    if not isinstance(b, (list, tuple)) or not isinstance(s, (list, tuple)):
        raise DSparkConfigError(f"{source}: batch_sizes and steps_per_s must be lists; {fix}.")
    if len(b) != len(s):
        raise DSparkConfigError(
            f"{source}: {len(b)} batch_sizes but {len(s)} steps_per_s (lengths differ); {fix}.")
    if len(b) < 2:
        raise DSparkConfigError(
            f"{source} has {len(b)} point(s); at least 2 are needed (the tail extrapolation "
            f"uses the last two); {fix}.")
    for x in b:
        if isinstance(x, bool) or not isinstance(x, int):
            raise DSparkConfigError(f"{source}: batch size {x!r} is not an integer; {fix}.")
        if x < 1:
            raise DSparkConfigError(f"{source}: batch size {x} < 1 (B counts tokens); {fix}.")
    for x0, x1 in zip(b, b[1:]):
        if x1 <= x0:
            raise DSparkConfigError(
                f"{source}: batch_sizes must be strictly increasing, found {x0} then {x1} "
                f"(non-increasing or duplicate); {fix}.")
    for x in s:
        ok = isinstance(x, (int, float)) and not isinstance(x, bool)
        if not ok or not math.isfinite(x) or x <= 0:
            raise DSparkConfigError(
                f"{source}: steps_per_s value {x!r} is not a positive finite number; {fix}.")


# ---------------------------------------------------------------------- cache
def cache_dir() -> str:
    from vllm_dspark import cache_root

    return os.path.join(cache_root(), "sps")


def cache_path(model: str, dtype: str, device_name: str, vllm_version: str) -> str:
    """$VLLM_DSPARK_CACHE/sps/<sha1 of all four fields>.json: a table is valid only for the
    model, dtype, GPU and vLLM build it was measured on."""
    key = json.dumps([str(model), str(dtype), str(device_name), str(vllm_version)])
    return os.path.join(cache_dir(), hashlib.sha1(key.encode()).hexdigest() + ".json")


def load_cached(model: str, dtype: str, device_name: str, vllm_version: str) -> SPSTable | None:
    """The cached table for this key, or None when nothing is cached (measure then)."""
    path = cache_path(model, dtype, device_name, vllm_version)
    if not os.path.exists(path):
        return None
    table = SPSTable.load(path)
    got = (table.model, table.dtype, table.device_name, table.vllm_version)
    want = (str(model), str(dtype), str(device_name), str(vllm_version))
    if got != want:
        raise DSparkConfigError(
            f"SPS table {path} was measured for {got}, not {want}; delete it to re-profile.")
    return table


def store(table: SPSTable) -> str:
    path = cache_path(table.model, table.dtype, table.device_name, table.vllm_version)
    table.save(path)
    return path


# ---------------------------------------------------------------------- measuring
def default_grid(max_tokens: int, capture_sizes: Sequence[int] | None = None) -> list[int]:
    """Batch sizes to profile. With vLLM's cudagraph_capture_sizes, exactly the captured
    sizes ≤ max_tokens (the step function's breakpoints) plus max_tokens; otherwise
    1, 2, 3, 4, 6, 8, 12, 16, ... (powers of two and 1.5× between) plus max_tokens."""
    if max_tokens < 2:
        raise DSparkConfigError(
            f"SPS grid: max_tokens={max_tokens}; profiling needs at least 2 sizes, so "
            "max_tokens must be ≥ 2 (raise max_num_batched_tokens).")
    if capture_sizes:
        grid = {int(s) for s in capture_sizes if 1 <= int(s) <= max_tokens}
    else:
        grid, p = set(), 1
        while p <= max_tokens:
            grid.add(p)
            if p >= 2 and p * 3 // 2 <= max_tokens:
                grid.add(p * 3 // 2)
            p *= 2
    grid.add(max_tokens)
    if len(grid) < 2:
        grid.add(1 if max_tokens > 1 else 2)
    return sorted(grid)


def measure(
    step_fn: Callable[[int], Any],
    batch_sizes: Sequence[int],
    warmup: int = 3,
    iters: int = 10,
    sync: Callable[[], None] | None = None,
    **meta: Any,
) -> SPSTable:
    """Profile SPS(B): for each B, ``warmup`` untimed calls of ``step_fn(B)`` (one target
    forward of B tokens), then ``iters`` calls timed as one block between two ``sync()``
    calls (torch.cuda.synchronize on GPU; a per-call sync would add its own latency).
    ``meta`` fills SPSTable's metadata fields (model, dtype, device_name, ...)."""
    sync = sync or (lambda: None)
    sizes = sorted({int(b) for b in batch_sizes})
    rates = []
    for b in sizes:
        for _ in range(warmup):
            step_fn(b)
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            step_fn(b)
        sync()
        rates.append(iters / max(time.perf_counter() - t0, 1e-12))
    meta.setdefault("created", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return SPSTable(b=sizes, sps=rates, **meta)
