"""Latency of one scheduling decision: 256 requests × γ = 7, median of 1000 calls.

    python benchmarks/scheduler_latency.py --out benchmarks/results/scheduler_latency.json

The scheduler runs every decode step on the critical path (Algorithm 1) or beside it
(§5.2), so its cost must stay far below a target step. Times ``causal_schedule`` and
``async_schedule`` on CPU and, when available, CUDA (synchronised after each call, so
the CUDA number includes launch latency), and on CUDA the Triton kernels
(``schedule/triton_prefix.py``): plainly launched, and as the engine runs them:
one CUDA-graph replay with the confidences copied in and the lengths copied to the host
(a host list, needed before vLLM schedules the drafts; ``decide`` synchronises its
stream itself, so those rows add no device-wide synchronisation). Confidences are uniform in
(0.3, 1); the SPS curve is flat to 384 tokens and drops to 2/3 past it, so the causal
path stops part way (128 of 1792 candidates); ``async_schedule`` walks the whole path
(no early stop).
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from vllm_dspark.schedule import SPSTable, async_schedule, causal_schedule  # noqa: E402


def time_calls(fn, n, sync):
    for _ in range(20):
        fn()
    sync()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def time_triton(cn, co, table, calls, sync, want):
    """The Triton kernel: per plain launch, and per CUDA-graph replay (GraphedDecider,
    the engine's path); ``*_to_host`` includes copying the lengths to a host list."""
    from vllm_dspark.schedule import triton_prefix as tp

    r, gamma = cn.shape
    dense = tp.dense_sps_for(table, r * (gamma + 1), cn.device)
    got, _ = tp.prefix_lengths(cn, dense, tp.CAUSAL)
    assert got.tolist() == want.lengths.tolist(), "kernel disagrees with causal_schedule"
    row = {
        "triton_launch_causal": time_calls(lambda: tp.prefix_lengths(cn, dense, tp.CAUSAL),
                                           calls, sync),
        "triton_launch_causal_to_host": time_calls(
            lambda: tp.prefix_lengths(cn, dense, tp.CAUSAL)[0].tolist(), calls, sync),
        "triton_version": __import__("triton").__version__,
    }
    k = int(tp.prefix_lengths(co, dense, tp.CAPACITY)[1][0])
    causal = tp.GraphedDecider(table, gamma, r, cn.device, tp.CAUSAL)
    capacity = tp.GraphedDecider(table, gamma, r, cn.device, tp.CAPACITY)
    topk = tp.GraphedDecider(table, gamma, r, cn.device, tp.TOPK)
    assert causal.decide(cn) == want.lengths.tolist(), "graphed kernels disagree"
    assert sum(topk.decide(cn, budget=k)) == min(k, r * gamma)
    # decide() returns host lists after synchronising its stream, as the engine calls
    # it: no extra device-wide synchronisation (~9 µs idle) is added to these rows.
    no_sync = lambda: None  # noqa: E731
    row["graphed_causal_to_host"] = time_calls(lambda: causal.decide(cn), calls, no_sync)
    row["graphed_topk_to_host"] = time_calls(lambda: topk.decide(cn, budget=k), calls, no_sync)
    # §5.2 on the critical path: K from the old confidences, then the current top-K
    row["graphed_async_to_host"] = time_calls(
        lambda: topk.decide(cn, budget=sum(capacity.decide(co))), calls, no_sync)
    graph = causal._graph(r)[0]
    row["graph_replay_only"] = time_calls(graph.replay, calls, sync)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--gamma", type=int, default=7)
    ap.add_argument("--calls", type=int, default=1000)
    args = ap.parse_args()

    sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048]
    table = SPSTable(b=sizes, sps=[60.0] * 10 + [40.0, 35.0, 30.0, 22.0, 17.0])
    gen = torch.Generator().manual_seed(0)
    shape = (args.requests, args.gamma)
    c_now = 0.3 + 0.7 * torch.rand(shape, generator=gen)
    c_old = 0.3 + 0.7 * torch.rand(shape, generator=gen)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = {"requests": args.requests, "gamma": args.gamma, "calls": args.calls,
               "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
               "cpu_threads": torch.get_num_threads(), "median_us": {}}
    for dev in devices:
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        cn, co = c_now.to(dev), c_old.to(dev)
        s = causal_schedule(cn, table)
        row = {
            "causal_schedule": time_calls(lambda cn=cn: causal_schedule(cn, table), args.calls,
                                          sync),
            "async_schedule": time_calls(lambda cn=cn, co=co: async_schedule(cn, co, table),
                                         args.calls, sync),
            "causal_admitted": int(s.admitted), "causal_batch": int(s.batch),
        }
        if dev == "cuda":
            row["device_name"] = torch.cuda.get_device_name()
            row.update(time_triton(cn, co, table, args.calls, sync, s))
        results["median_us"][dev] = row
        print({k: v for k, v in row.items() if "triton" in k})
        print(f"{dev}: causal_schedule {row['causal_schedule']:.1f} µs, "
              f"async_schedule {row['async_schedule']:.1f} µs "
              f"(admitted {row['causal_admitted']} of {args.requests * args.gamma})")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
