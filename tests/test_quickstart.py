"""The README's main-job command runs on this machine: examples/quickstart.py."""

import os
import re
import subprocess
import sys

import pytest

from conftest import requires_vllm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@requires_vllm
@pytest.mark.engine
def test_quickstart_runs_and_is_lossless(smollm2_target):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "quickstart.py"),
         "--target", smollm2_target, "--max-tokens", "48"],
        capture_output=True, text=True, timeout=900,
        env=dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "identical texts: 4/4" in out, out
    assert re.search(r"τ = [0-9.]+", out), out
    # The committed drafter is accepted (a random one gives ~0). τ would not say so: the
    # default draft gate skips drafting where it does not pay (4 requests on 2 cores).
    rate, verified = re.search(r"acceptance rate: ([0-9.]+) of ([0-9]+)", out).groups()
    assert int(verified) >= 20 and float(rate) > 0.2, out
    for engine in ("without", "with"):
        assert re.search(rf"{engine} dspark: +[0-9.]+ tokens/s", out), out
