#!/usr/bin/env python3
"""What scale buys: τ at γ = 7 (T = 0 and T = 1) per dataset against training
sequences seen and the drafter's architecture, as a markdown table for
benchmarks/README.md.

    python benchmarks/smollm2/scale_table.py EVAL.json[=TRAINING] ... [--out table.md]
        [--readme benchmarks/README.md --marker smollm2-scale] [--labels A B ...]

Each EVAL.json is what ``vllm-dspark eval`` wrote; every one must be the paper's
protocol (chain drafting, fixed γ, no scheduler) at the same γ (``--gamma``, 7) and
hold T = 0 and T = 1. The drafter's recipe comes from its ``training.json`` (what
``vllm-dspark train`` writes: sequences seen, layers, Markov rank and head): ``=PATH``
after the eval file (the training.json, or the drafter directory holding it), else
``training_<tag>.json`` beside ``eval_<tag>.json``, else ``<draft>/training.json`` where
the eval's draft directory exists on this machine.

Rows are grouped by architecture (layers, head, rank), each group by sequences seen;
a cell is ``τ(T=0) / τ(T=1)``, the last column the mean over the datasets. With
``--readme`` the table replaces what lies between ``<!-- scale-table:MARKER -->`` and
``<!-- /scale-table:MARKER -->`` in that file.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

PROTOCOL = "chain drafting, fixed gamma, no scheduler"
TEMPS = ("T=0", "T=1")


class TableError(ValueError):
    pass


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TableError(f"cannot read {path}: {e}") from e


def _tag(eval_path: str) -> str:
    stem = os.path.basename(eval_path)
    stem = stem[: -len(".json")] if stem.endswith(".json") else stem
    return stem[len("eval_"):] if stem.startswith("eval_") else stem


def find_training(eval_path: str, result: dict, explicit: str | None) -> str:
    """The training.json of the drafter an eval measured (module doc: the search order)."""
    tried = []
    if explicit:
        path = os.path.join(explicit, "training.json") if os.path.isdir(explicit) else explicit
        if os.path.isfile(path):
            return path
        raise TableError(f"{eval_path}: no training.json at {explicit!r}")
    beside = os.path.join(os.path.dirname(eval_path), f"training_{_tag(eval_path)}.json")
    tried.append(beside)
    if os.path.isfile(beside):
        return beside
    draft = result.get("draft")
    if draft:
        path = os.path.join(draft, "training.json")
        tried.append(path)
        if os.path.isfile(path):
            return path
    raise TableError(f"{eval_path}: cannot find the drafter's training.json (tried "
                     f"{', '.join(tried)}); pass it as {eval_path}=PATH")


def recipe(training: dict) -> dict:
    """Architecture and scale of one drafter from its training.json (older reports lack
    sequences_seen and draft_config: they follow from step × batch and the config)."""
    cfg = training.get("config") or {}
    dc = training.get("draft_config") or {}
    rank = int(dc.get("markov_rank", cfg.get("markov_rank", 0)) or 0)
    head = dc.get("markov_head_type", cfg.get("markov_head_type", "vanilla"))
    seen = training.get("sequences_seen")
    if seen is None:
        seen = int(training.get("step", 0)) * int(cfg.get("batch_size", 0))
    train_rows = training.get("train_rows")
    epochs = training.get("epochs_seen")
    if epochs is None and train_rows:
        epochs = seen / train_rows
    return {
        "layers": int(dc.get("num_hidden_layers", cfg.get("num_layers", 0))),
        "head": head if rank > 0 else "none",
        "rank": rank,
        "anchors": cfg.get("anchors"),
        "batch": cfg.get("batch_size"),
        "sequences_seen": int(seen),
        "epochs": epochs,
        "train_rows": train_rows,
        "minutes": (training.get("seconds") or 0) / 60,
        "finished": training.get("finished"),
    }


def read_row(spec: str, gamma: int, label: str | None = None) -> dict:
    eval_path, _, explicit = spec.partition("=")
    result = _load(eval_path)
    if PROTOCOL not in str(result.get("protocol", "")):
        raise TableError(f"{eval_path}: not the fixed-γ chain protocol "
                         f"({result.get('protocol')!r}); measure with `vllm-dspark eval`")
    if int(result.get("gamma", -1)) != gamma:
        raise TableError(f"{eval_path}: measured at γ = {result.get('gamma')}, the table is "
                         f"for γ = {gamma} (--gamma)")
    taus = {}
    for name, by_t in (result.get("results") or {}).items():
        taus[name] = {t: (by_t.get(t) or {}).get("tau") for t in TEMPS}
    if not taus:
        raise TableError(f"{eval_path}: no results")
    training_path = find_training(eval_path, result, explicit or None)
    return dict(recipe(_load(training_path)), label=label or _tag(eval_path), taus=taus,
                implementation=result.get("implementation", "vllm-dspark"),
                num_prompts=result.get("num_prompts"), max_tokens=result.get("max_tokens"),
                machine=(result.get("machine") or {}).get("gpu")
                or (result.get("machine") or {}).get("cpu"),
                eval=eval_path, training=training_path)


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _seen(n: int) -> str:
    return f"{n / 1000:.0f} k" if n >= 10_000 else f"{n / 1000:.1f} k" if n >= 1000 else str(n)


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def table(rows: list[dict], datasets: list[str] | None = None) -> str:
    if not rows:
        raise TableError("no eval files given")
    datasets = datasets or [d for d in rows[0]["taus"]]
    for r in rows:
        lacking = [d for d in datasets if d not in r["taus"]]
        if lacking:
            raise TableError(f"{r['eval']}: no results for {', '.join(lacking)}")
        for d in datasets:
            if all(r["taus"][d][t] is None for t in TEMPS):
                raise TableError(f"{r['eval']}: {d} has neither T=0 nor T=1")
    rows = sorted(rows, key=lambda r: (r["layers"], r["head"] != "none", r["head"], r["rank"],
                                       r["implementation"], r["sequences_seen"], r["label"]))
    head = (["drafter", "layers", "head", "rank", "anchors × batch", "sequences seen",
             "epochs"] + datasets + ["mean"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = r["label"]
        if r["implementation"] == "upstream" and "upstream" not in label:
            label += " (upstream vLLM)"
        if r["finished"] is False:
            label += " (unfinished)"
        cells = [label, str(r["layers"]), r["head"], str(r["rank"]) if r["rank"] else "0",
                 f"{r['anchors']} × {r['batch']}", _seen(r["sequences_seen"]),
                 "–" if r["epochs"] is None else f"{r['epochs']:.1f}"]
        for d in datasets:
            cells.append(" / ".join(_fmt(r["taus"][d][t]) for t in TEMPS))
        cells.append(" / ".join(_fmt(_mean([r["taus"][d][t] for d in datasets]))
                                for t in TEMPS))
        lines.append("| " + " | ".join(cells) + " |")
    prompts = sorted({str(r["num_prompts"]) for r in rows})
    tokens = sorted({str(r["max_tokens"]) for r in rows})
    machines = sorted({str(r["machine"]) for r in rows if r["machine"]})
    note = (f"τ (bonus token included) at γ = {rows[0].get('gamma', 7)}, chain drafting, "
            f"fixed γ, no scheduler; cell = T=0 / T=1; {'/'.join(prompts)} prompts per "
            f"set, ≤ {'/'.join(tokens)} new tokens"
            + (f"; {', '.join(machines)}" if machines else "") + ". Head none = "
            "`--markov-rank 0` (DFlash-like). Sequences seen = steps × batch.")
    return note + "\n\n" + "\n".join(lines) + "\n"


def replace_block(text: str, marker: str, block: str) -> str:
    begin, end = f"<!-- scale-table:{marker} -->", f"<!-- /scale-table:{marker} -->"
    pat = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pat.search(text):
        raise TableError(f"no {begin} ... {end} block in the file; add the two markers "
                         "where the table goes")
    return pat.sub(lambda _: begin + "\n" + block + end, text, count=1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("evals", nargs="+", metavar="EVAL.json[=TRAINING]")
    p.add_argument("--gamma", type=int, default=7)
    p.add_argument("--datasets", nargs="+", default=None,
                   help="columns, in order (default: the first eval's datasets)")
    p.add_argument("--labels", nargs="+", default=None, help="one per eval file")
    p.add_argument("--out", help="write the table here (default: stdout)")
    p.add_argument("--readme", help="replace the marked block of this markdown file")
    p.add_argument("--marker", default="smollm2-scale")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.evals):
        p.error("--labels needs one label per eval file")
    try:
        rows = [dict(read_row(spec, args.gamma, (args.labels or [None] * len(args.evals))[i]),
                     gamma=args.gamma)
                for i, spec in enumerate(args.evals)]
        text = table(rows, args.datasets)
        if args.readme:
            with open(args.readme) as f:
                doc = f.read()
            doc = replace_block(doc, args.marker, text)
            with open(args.readme, "w") as f:
                f.write(doc)
    except TableError as e:
        print(f"scale_table: {e}", file=sys.stderr)
        return 2
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if not args.readme and not args.out:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
