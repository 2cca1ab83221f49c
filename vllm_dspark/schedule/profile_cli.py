"""``vllm-dspark profile``: measure the SPS(B) table on demand and write it as JSON.

    vllm-dspark profile --target DIR --draft DIR --out sps.json [--dtype ...]

Starts the engine once with ``VLLM_DSPARK_SPS=profile`` in a child process (the
same warm-up-then-measure path the engine uses at start-up, see
``vllm_dspark.engine.sps_profile.profile_sps``) with a private cache
directory, and copies the measured table to ``--out``; pass that file as
``VLLM_DSPARK_SPS`` to skip profiling at start-up.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = """
import sys
from vllm import LLM
target, draft, gamma, dtype, eager, mml, seqs = sys.argv[1:8]
if __name__ == "__main__":
    LLM(target, dtype=dtype, enforce_eager=eager == "1", max_model_len=int(mml),
        max_num_seqs=int(seqs), speculative_config={"method": "dspark", "model": draft,
        **({"num_speculative_tokens": int(gamma)} if gamma != "0" else {})})
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from vllm_dspark.cli import add_dtype_argument

    p.add_argument("--target", required=True, help="target model directory (HF format)")
    p.add_argument("--draft", required=True, help="the DSpark draft (sets γ and the runner)")
    p.add_argument("--out", required=True, help="where to write the SPS table (JSON)")
    p.add_argument("--gamma", type=int, default=0, help="γ (default: 0 = the draft's block_size)")
    add_dtype_argument(p, "vLLM dtype, as you will serve; auto = the model's on GPU, float32 "
                       "on CPU")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="largest batch served; the table covers up to max_num_seqs·(γ+1)")
    p.add_argument("--max-model-len", type=int, default=2048, help="vLLM max_model_len")
    p.add_argument("--enforce-eager", action="store_true",
                   help="profile without CUDA graphs / torch.compile, as you will serve")


def run(args: argparse.Namespace) -> int:
    from vllm_dspark.config import DSparkConfig
    from vllm_dspark.launch import engine_dtype, engine_env

    DSparkConfig.from_dir(args.draft)  # a clear error before any engine starts
    dtype = engine_dtype(args.dtype)
    with tempfile.TemporaryDirectory(prefix="vllm-dspark-profile-") as cache:
        env = engine_env(dict(os.environ, VLLM_DSPARK_CACHE=cache, VLLM_DSPARK_SPS="profile",
                              VLLM_DSPARK_SCHEDULER="causal"), v1=True)  # a V1 feature
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        child = os.path.join(cache, "profile_child.py")  # spawned workers re-import it
        with open(child, "w") as f:
            f.write(CHILD)
        subprocess.run([sys.executable, child, args.target, args.draft,
                        str(args.gamma), dtype, "1" if args.enforce_eager else "0",
                        str(args.max_model_len), str(args.max_num_seqs)],
                       check=True, env=env)
        found = glob.glob(os.path.join(cache, "sps", "*.json"))
        if len(found) != 1:
            raise SystemExit("error: the engine wrote no SPS table; see its log above.")
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        shutil.copyfile(found[0], args.out)
    from vllm_dspark.schedule.sps import SPSTable

    table = SPSTable.load(args.out)
    print(f"SPS(B) at {len(table.b)} sizes ({table.b[0]}..{table.b[-1]} tokens) -> {args.out}")
    for b, s in zip(table.b, table.sps):
        print(f"  B={b:6d}  {s:9.1f} steps/s")
    return 0
