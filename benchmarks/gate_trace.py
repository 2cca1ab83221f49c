#!/usr/bin/env python3
"""What the draft gate measured and chose in each cell of a GPU sweep (issue 15).

    python benchmarks/gate_trace.py benchmarks/results/gpu_sweep_X.json [--config ours]
        [--trace X_gate_ours.jsonl] [--out summary.json]

``gpu_sweep.py`` runs gated engines with ``VLLM_DSPARK_GATE_TRACE`` and writes the trace
beside its JSON (``<out>_gate_<config>.jsonl``): one line per timed sample
(``{"r", "drafted", "tokens", "s", "wall"}``: a clean step of one choice at r
requests) and per change of the draft count (``{"r", "k", "wall"}``). Each sweep run
of that configuration carries its wall-clock span (``raw[config][i]["wall"]``), so the
trace lines fall into cells (concurrency, temperature). Per cell this prints:

- the gate's own rates: Σ tokens / Σ seconds of its drafted and of its skipped
  samples, with their counts (what the gate followed);
- the share of the cell's wall time spent with K = 0 (skipping), and the changes of K;
- beside them, the sweep's tok/s of ``plain``, ``ours-skip`` (never drafts) and
  ``ours-nogate`` (always drafts) in that cell, where the sweep ran them.

If the gate's skipped rate sits below its drafted rate where ``plain`` beats
``ours-nogate``, skipped steps timed slower than the gate's choice of drafting: their
cost (``ours-skip`` against ``plain``) or a bias of the sample (a skipped step's
neighbours), not slow learning (``tests/schedule/test_scheduler_gate.py`` turns the
gate within 12 steps on measured costs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def read_trace(path: str) -> list[dict]:
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not a JSON line ({e}); a gate trace is what "
                                 "VLLM_DSPARK_GATE_TRACE writes") from e
            if "wall" not in rec:
                raise SystemExit(f"{path}:{n}: no wall-clock time; this trace predates "
                                 "wall times (rerun the sweep)")
            records.append(rec)
    return sorted(records, key=lambda r: r["wall"])


def skipped_share(changes: list[dict], start: float, end: float) -> float | None:
    """Share of [start, end] spent with K = 0, from the changes of K (the K in force at
    ``start`` is the last change before it). None when no change precedes ``end``."""
    before = [c for c in changes if c["wall"] <= start]
    k = before[-1]["k"] if before else None
    t, skipped = start, 0.0
    for c in changes:
        if c["wall"] <= start:
            continue
        if c["wall"] >= end:
            break
        if k == 0:
            skipped += c["wall"] - t
        t, k = c["wall"], c["k"]
    if k is None:
        return None
    if k == 0:
        skipped += end - t
    return skipped / (end - start) if end > start else None


def summarize(sweep: dict, config: str, records: list[dict]) -> list[dict]:
    runs = sweep.get("raw", {}).get(config)
    if not runs:
        raise SystemExit(f"the sweep has no runs of {config!r}; its configurations: "
                         f"{sorted(k for k, v in sweep.get('raw', {}).items() if v)}")
    if any("wall" not in r for r in runs):
        raise SystemExit(f"the sweep's runs of {config!r} carry no wall-clock spans "
                         "(a sweep from before 2026-12-07 evening): rerun it")
    samples = [r for r in records if "drafted" in r]
    changes = [r for r in records if "k" in r]
    by_cell: dict[tuple, dict] = {}
    for run in runs:
        start, end = run["wall"]
        cell = by_cell.setdefault((run["concurrency"], run["temperature"]), dict(
            tokens={True: 0, False: 0}, seconds={True: 0.0, False: 0.0},
            samples={True: 0, False: 0}, changes=0, span=0.0, skipped=0.0, known=0.0))
        for s in samples:
            if start <= s["wall"] <= end:
                d = bool(s["drafted"])
                cell["tokens"][d] += s["tokens"]
                cell["seconds"][d] += s["s"]
                cell["samples"][d] += 1
        cell["changes"] += sum(start <= c["wall"] <= end for c in changes)
        share = skipped_share(changes, start, end)
        cell["span"] += end - start
        if share is not None:
            cell["skipped"] += share * (end - start)
            cell["known"] += end - start
    tok_s = {(r["config"], r["concurrency"], r["temperature"]): r["tok_s"]
             for r in sweep.get("rows", [])}
    out = []
    for (c, t), cell in sorted(by_cell.items()):
        rate = {d: (cell["tokens"][d] / cell["seconds"][d] if cell["seconds"][d] else None)
                for d in (True, False)}
        out.append(dict(
            concurrency=c, temperature=t,
            gate_drafted_tok_s=rate[True], gate_drafted_samples=cell["samples"][True],
            gate_skipped_tok_s=rate[False], gate_skipped_samples=cell["samples"][False],
            skipped_time_share=cell["skipped"] / cell["known"] if cell["known"] else None,
            k_changes=cell["changes"],
            **{f"sweep_{n.replace('-', '_')}_tok_s": tok_s.get((n, c, t))
               for n in ("plain", "ours-skip", "ours-nogate", config)}))
    return out


def _fmt(x, digits=0):
    return "-" if x is None else f"{x:.{digits}f}"


def table(rows: list[dict], config: str) -> str:
    head = ("| C | T | gate: drafted tok/s (n) | gate: skipped tok/s (n) | K = 0 share | "
            f"K changes | plain | ours-skip | ours-nogate | {config} |")
    lines = [head, "|" + "---|" * 10]
    key = f"sweep_{config.replace('-', '_')}_tok_s"
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['temperature']:g} | "
            f"{_fmt(r['gate_drafted_tok_s'])} ({r['gate_drafted_samples']}) | "
            f"{_fmt(r['gate_skipped_tok_s'])} ({r['gate_skipped_samples']}) | "
            f"{_fmt(r['skipped_time_share'], 2)} | {r['k_changes']} | "
            f"{_fmt(r['sweep_plain_tok_s'])} | {_fmt(r['sweep_ours_skip_tok_s'])} | "
            f"{_fmt(r['sweep_ours_nogate_tok_s'])} | {_fmt(r.get(key))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", help="a gpu_sweep.py JSON")
    ap.add_argument("--config", default="ours", help="the gated configuration (ours)")
    ap.add_argument("--trace", help="its gate trace (default: <sweep>_gate_<config>.jsonl)")
    ap.add_argument("--out", help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    trace = args.trace or os.path.splitext(args.sweep)[0] + f"_gate_{args.config}.jsonl"
    if not os.path.isfile(trace):
        raise SystemExit(f"no gate trace at {trace}: pass --trace (gpu_sweep.py writes "
                         f"<out>_gate_<config>.jsonl for gated configurations)")
    with open(args.sweep) as f:
        sweep = json.load(f)
    rows = summarize(sweep, args.config, read_trace(trace))
    print(table(rows, args.config))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(sweep=args.sweep, trace=trace, config=args.config, rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
