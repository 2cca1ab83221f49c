"""Test helpers shared across folders: the chi-square goodness-of-fit test of sampled
transitions, running a test file's kernel tests in a Triton-interpreter child, and
loading a benchmark script (not a package) as a module."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import torch


def chi_square_p_value(pairs: torch.Tensor, probs: torch.Tensor, min_df: int = 20) -> float:
    """pairs [N, 2] (prev, next) against probs [V, V] (rows = next-token distributions):
    rows with fewer than 20 observations are skipped, cells with expected count < 5 are
    pooled per row; asserts the test has more than ``min_df`` degrees of freedom."""
    v = probs.shape[0]
    counts = torch.zeros(v, v, dtype=torch.float64)
    counts.index_put_((pairs[:, 0], pairs[:, 1]), torch.ones(len(pairs), dtype=torch.float64),
                      accumulate=True)
    stat, df = 0.0, 0
    for row in range(v):
        n = counts[row].sum()
        if n < 20:
            continue
        exp = n * probs[row].double()
        big = exp >= 5
        obs_cells, exp_cells = [counts[row][big]], [exp[big]]
        if (~big).any():
            obs_cells.append(counts[row][~big].sum()[None])
            exp_cells.append(exp[~big].sum()[None])
        o, e = torch.cat(obs_cells), torch.cat(exp_cells)
        keep = e > 0
        stat += float(((o[keep] - e[keep]) ** 2 / e[keep]).sum())
        df += int(keep.sum()) - 1
    assert df > min_df, df
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def run_in_triton_interpreter(test_file: str, select: str, summary: str,
                              one_thread: bool = False) -> None:
    """Run ``pytest -k select`` on ``test_file`` in a child with TRITON_INTERPRET=1 and
    assert its closing line matches the regex ``summary`` (e.g. all passed, none skipped)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    if one_thread:  # tiny tensors: no oversubscription on a shared 2-core box
        env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-k", select, test_file],
                       env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    last = r.stdout.strip().splitlines()[-1]
    assert re.match(summary, last), last


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks",
                        name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
