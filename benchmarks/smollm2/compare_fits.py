#!/usr/bin/env python3
"""Both temperature fits of `vllm-dspark calibrate` on saved outcomes, side by side:
the paper's sequential STS (ECE of the cumulative product, left to right) and the
per-position maximum-likelihood fit (`--fit nll`), each fitted on all but the last
``--holdout`` fraction of the prompts and evaluated on the rest (as calibrate does).

    python benchmarks/smollm2/compare_fits.py OUTCOMES.npz [--holdout 0.25] [--out fits.json]

OUTCOMES.npz is what `calibrate --save-outcomes` writes (z, s, mask, prompt).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from vllm_dspark.calibrate.collect import Outcomes
from vllm_dspark.calibrate.sts import FITS, evaluate


def compare(path: str, holdout: float) -> dict:
    d = np.load(path)
    fit, held = Outcomes(z=d["z"], s=d["s"], mask=d["mask"], prompt=d["prompt"]).split(holdout)
    out = {"outcomes": path, "holdout": holdout, "fit_blocks": int(fit.mask[:, 0].sum()),
           "held_out_blocks": int(held.mask[:, 0].sum())}
    for name, fit_fn in FITS.items():
        temps, rep = fit_fn(fit.z, fit.s, fit.mask)
        ho = evaluate(held.z, held.s, held.mask, temps)
        out[name] = dict(
            temperatures=[round(t, 4) for t in temps],
            mean_ece_in_sample=[rep["mean_ece_before"], rep["mean_ece_after"]],
            mean_ece_held_out=[ho["mean_ece_before"], ho["mean_ece_after"]],
            held_out=[{k: p[k] for k in ("position", "ece_before", "ece_after",
                                         "auroc_before", "auroc_after")}
                      for p in ho["positions"]])
        print(f"{name:4s} T = {out[name]['temperatures']}  mean ECE in-sample "
              f"{100 * rep['mean_ece_before']:.2f} -> {100 * rep['mean_ece_after']:.2f} %, "
              f"held out {100 * ho['mean_ece_before']:.2f} -> {100 * ho['mean_ece_after']:.2f} %")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outcomes")
    ap.add_argument("--holdout", type=float, default=0.25)
    ap.add_argument("--out")
    args = ap.parse_args()
    res = compare(args.outcomes, args.holdout)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
