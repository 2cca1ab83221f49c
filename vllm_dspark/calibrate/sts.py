"""Sequential Temperature Scaling (paper §3.2.1, "Post-hoc Calibration"), engine-free.

The confidence head's c_k = σ(z_k) estimates P(draft token k survives | tokens
< k survived) (eq. 7). The prefix scheduler (§3.2.2) needs the *joint*
survival probability of a prefix, which by the chain rule is ∏_{i≤k} c_i, and it
needs its absolute value (expected accepted length τ), not just its ranking.
Raw heads are overconfident (Fig. 6), so STS fits one temperature per position,
c_k = σ(z_k / T_k), left to right: T_k minimises the ECE of the cumulative product
∏_{i≤k} σ(z_i/T_i) against the cumulative survival outcome s_k, with T_0..T_{k-1}
frozen at their fitted values. Temperature scaling is monotone in z_k, so it
cannot change how a single position ranks drafts (its AUROC).

Data layout (numpy, 0-based positions k = 0..γ-1, i.e. the paper's k+1):

- ``z[n, k]``: confidence logits of block n (before any temperature);
- ``s[n, k]`` ∈ {0, 1}: 1 iff draft tokens 0..k of block n were all accepted;
- ``mask[n, k]``: position k of block n was verifiable (blocks near the end of a
  sequence are shorter). Masks are prefixes: a position after an invalid one is
  treated as invalid.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np

# Log-spaced search grid of the 1-D search (the paper only says "a simple 1D
# grid search"); a finer log grid between the best point's neighbours follows.
DEFAULT_GRID = np.geomspace(0.05, 20.0, 121)
REFINE_POINTS = 41
# Positions with fewer valid blocks keep T = 1 (sample_block's default for
# uncalibrated positions): an ECE over a handful of samples is noise.
MIN_COUNT = 20


def _as_arrays(z, s, mask):
    z = np.asarray(z, dtype=np.float64)
    s = np.asarray(s, dtype=np.float64)
    if z.shape != s.shape or z.ndim != 2:
        raise ValueError(f"z and s must both be [N, γ]; got {z.shape} and {s.shape}")
    m = np.ones(z.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    m = np.logical_and.accumulate(m, axis=1)  # prefix-shaped, see module docstring
    return z, s, m


def log_sigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def cumulative_survival(z, temperatures=None) -> np.ndarray:
    """[N, γ]: ∏_{i≤k} σ(z_i / T_i), computed in log space (long blocks underflow)."""
    z = np.asarray(z, dtype=np.float64)
    t = np.ones(z.shape[1]) if temperatures is None else np.asarray(temperatures, np.float64)
    return np.exp(np.cumsum(log_sigmoid(z / t[: z.shape[1]]), axis=1))


# ------------------------------------------------------------------ metrics
def _bin_index(prob: np.ndarray, n_bins: int) -> np.ndarray:
    return np.clip((prob * n_bins).astype(np.int64), 0, n_bins - 1)


def ece(prob, outcome, n_bins: int = 15) -> float:
    """Expected Calibration Error (Naeini et al., 2015): equal-width bins on [0, 1],
    Σ_b (n_b / N) · |mean prob_b − mean outcome_b|. nan for no samples."""
    p = np.asarray(prob, dtype=np.float64).ravel()
    o = np.asarray(outcome, dtype=np.float64).ravel()
    if p.size == 0:
        return float("nan")
    return float(_ece_batch(p[None], o, n_bins)[0])


def _ece_batch(p: np.ndarray, o: np.ndarray, n_bins: int) -> np.ndarray:
    """ECE of every row of p [G, N] against one outcome vector o [N] (the grid search)."""
    g, n = p.shape
    idx = (_bin_index(p, n_bins) + n_bins * np.arange(g)[:, None]).ravel()
    sp = np.bincount(idx, weights=p.ravel(), minlength=g * n_bins).reshape(g, n_bins)
    so = np.bincount(idx, weights=np.broadcast_to(o, p.shape).ravel(),
                     minlength=g * n_bins).reshape(g, n_bins)
    return np.abs(sp - so).sum(axis=1) / n  # Σ_b n_b/N · |Σp/n_b − Σo/n_b|


def auroc(score, outcome) -> float:
    """ROC-AUC by ranks (Mann-Whitney U, Hanley & McNeil 1982); ties share their
    average rank. nan when either class is absent."""
    x = np.asarray(score, dtype=np.float64).ravel()
    y = np.asarray(outcome).ravel() > 0.5
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of each tie group's last member
    avg_rank = ends - (counts - 1) / 2.0
    rank_sum = avg_rank[inv][y].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# ------------------------------------------------------------------ fitting
def _product_ece(grid: np.ndarray, prefix_log: np.ndarray, zk: np.ndarray, o: np.ndarray,
                 n_bins: int) -> np.ndarray:
    """ECE(exp(prefix_log + log σ(zk/T)), o) for every T of ``grid``."""
    return _ece_batch(np.exp(prefix_log[None] + log_sigmoid(zk[None] / grid[:, None])), o, n_bins)


def _minimise(loss, grid: np.ndarray, refine: bool) -> float:
    """argmin_T of ``loss`` (a grid of temperatures → one value per T) over ``grid``;
    with ``refine``, then over a finer log grid between the best point's neighbours,
    keeping the coarse point on ties (it is on the grid)."""
    errs = loss(grid)
    j = int(np.argmin(errs))
    t, err = float(grid[j]), float(errs[j])
    if refine:
        fine = np.geomspace(grid[max(j - 1, 0)], grid[min(j + 1, len(grid) - 1)], REFINE_POINTS)
        fine_errs = loss(fine)
        i = int(np.argmin(fine_errs))
        if fine_errs[i] < err:
            t = float(fine[i])
    return t


def _grid(grid) -> np.ndarray:
    grid = np.asarray(DEFAULT_GRID if grid is None else grid, dtype=np.float64)
    if np.any(grid <= 0):
        raise ValueError("temperature grid values must be > 0")
    return grid


def _at_edge(t: float, fitted: bool, grid: np.ndarray) -> bool:
    return bool(fitted and (t <= grid.min() * (1 + 1e-9) or t >= grid.max() * (1 - 1e-9)))


def _report(z, s, m, temps, fits, grid, n_bins, min_count) -> tuple[list[float], dict]:
    """The fit's report: ``evaluate`` on the fitting data plus each position's fit."""
    report = evaluate(z, s, m, temps, n_bins)
    for position, fit in zip(report["positions"], fits):
        position.update(fit)
    report.update(temperatures=temps, grid=[float(grid.min()), float(grid.max()), int(grid.size)],
                  min_count=min_count)
    return temps, report


def fit_sts(z, s, mask=None, grid=None, n_bins: int = 15, refine: bool = True,
            min_count: int = MIN_COUNT) -> tuple[list[float], dict]:
    """Fit per-position temperatures left to right (paper §3.2.1).

    Returns (temperatures [γ], report). The report has, per position k:
    ``n`` (valid blocks), ``survived`` (Σ s_k), ``empirical`` (mean s_k),
    ``mean_pred_before``/``after``, ``ece_before``/``after`` and
    ``auroc_before``/``after`` of the cumulative product against s_k
    (before = all temperatures 1), ``temperature`` and ``fitted`` (False where
    too few blocks left T at 1).
    """
    z, s, m = _as_arrays(z, s, mask)
    grid = _grid(grid)
    gamma = z.shape[1]
    temps: list[float] = []
    fits = []
    prefix = np.zeros(z.shape[0])  # Σ_{i<k} log σ(z_i/T_i), calibrated
    for k in range(gamma):
        rows = m[:, k]
        zk, o, pre = z[rows, k], s[rows, k], prefix[rows]
        fitted = int(rows.sum()) >= min_count
        t = 1.0
        if fitted:  # the ECE of the cumulative product, earlier temperatures frozen
            t = _minimise(partial(_product_ece, prefix_log=pre, zk=zk, o=o, n_bins=n_bins),
                          grid, refine)
        temps.append(t)
        prefix = prefix + log_sigmoid(z[:, k] / t)
        fits.append(dict(temperature=t, fitted=fitted, at_grid_edge=_at_edge(t, fitted, grid)))
    return _report(z, s, m, temps, fits, grid, n_bins, min_count)


def _nll(grid: np.ndarray, zk: np.ndarray, o: np.ndarray) -> np.ndarray:
    """Mean binary log loss of σ(zk/T) against o, for every T of ``grid``."""
    x = zk[None] / grid[:, None]
    return np.mean(-np.where(o[None] > 0, log_sigmoid(x), log_sigmoid(-x)), axis=1)


def fit_nll(z, s, mask=None, grid=None, refine: bool = True,
            min_count: int = MIN_COUNT, n_bins: int = 15) -> tuple[list[float], dict]:
    """Per-position temperatures by maximum likelihood (beyond the paper): T_k
    minimises the log loss of c_k = σ(z_k/T_k) against survival of token k on the
    blocks whose tokens < k all survived — c_k's own meaning (eq. 7). The likelihood
    of a block's outcome is the product of these conditional terms, so the positions
    separate and each fit is one convex 1-D problem (in 1/T); no position's fit
    trades away another's, unlike the sequential ECE search of ``fit_sts``, where a
    flattened c_1 (T at the grid's edge) lowers its own ECE and costs every later
    product its resolution (seen on the SmolLM2 drafter, benchmarks/README.md).
    Same grid, refinement, ``min_count`` rule and report as ``fit_sts``."""
    z, s, m = _as_arrays(z, s, mask)
    grid = _grid(grid)
    temps, fits = [], []
    for k in range(z.shape[1]):
        rows = m[:, k] & (s[:, k - 1] > 0) if k else m[:, k]  # alive before token k
        zk, o = z[rows, k], s[rows, k]
        fitted = int(rows.sum()) >= min_count
        t = 1.0
        if fitted:
            t = _minimise(partial(_nll, zk=zk, o=o), grid, refine)
        temps.append(t)
        fits.append(dict(temperature=t, fitted=fitted, conditional_n=int(rows.sum()),
                         at_grid_edge=_at_edge(t, fitted, grid)))
    return _report(z, s, m, temps, fits, grid, n_bins, min_count)


FITS = {"sts": fit_sts, "nll": fit_nll}


def evaluate(z, s, mask, temperatures, n_bins: int = 15) -> dict:
    """Calibration of the cumulative product before (all T = 1) and after
    ``temperatures``, per position: ``n`` (valid blocks), ``survived`` (Σ s_k),
    ``empirical`` (mean s_k), ``mean_pred_before``/``after``, ``ece_before``/``after``,
    ``auroc_before``/``after``; plus their mean ECEs. On the fitting data this is the
    in-sample report; on held-out blocks it says whether the fit generalises."""
    z, s, m = _as_arrays(z, s, mask)
    gamma = z.shape[1]
    before_all, after_all = cumulative_survival(z), cumulative_survival(z, temperatures)
    positions = []
    for k in range(gamma):
        rows = m[:, k]
        o, before, after = s[rows, k], before_all[rows, k], after_all[rows, k]
        positions.append(dict(
            position=k + 1, n=int(rows.sum()), survived=int(o.sum()),
            empirical=_mean(o), mean_pred_before=_mean(before), mean_pred_after=_mean(after),
            ece_before=ece(before, o, n_bins), ece_after=ece(after, o, n_bins),
            auroc_before=auroc(before, o), auroc_after=auroc(after, o),
        ))
    return dict(
        n_blocks=int(m[:, 0].sum()) if gamma else 0, n_bins=n_bins, positions=positions,
        mean_ece_before=_nanmean([p["ece_before"] for p in positions]),
        mean_ece_after=_nanmean([p["ece_after"] for p in positions]),
    )


def _mean(x: np.ndarray) -> float:
    return float(x.mean()) if x.size else float("nan")


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return float(sum(xs) / len(xs)) if xs else float("nan")


def format_table(report: dict) -> str:
    """The per-position table the CLI prints."""
    lines = [f"{'pos':>3} {'n':>7} {'surv':>6} {'T':>7} {'ECE before':>10} {'ECE after':>9} "
             f"{'AUROC before':>12} {'AUROC after':>11}"]
    for p in report["positions"]:
        t = f"{p['temperature']:.3f}" + ("" if p["fitted"] else "*") + (
            "!" if p["at_grid_edge"] else "")
        lines.append(f"{p['position']:>3} {p['n']:>7} {p['empirical']:>6.3f} {t:>7} "
                     f"{_pct(p['ece_before']):>10} {_pct(p['ece_after']):>9} "
                     f"{p['auroc_before']:>12.3f} {p['auroc_after']:>11.3f}")
    lines.append(f"mean ECE {_pct(report['mean_ece_before'])} -> "
                 f"{_pct(report['mean_ece_after'])}  (* = too few blocks, T left at 1; "
                 "! = T at the grid's edge: the raw scores carry little signal there)")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:.2f}%"


# ------------------------------------------------------------------ plot
def reliability_diagram(z, s, mask, temperatures, path: str, positions=None,
                        n_bins: int = 15) -> list[int]:
    """PNG like the paper's Fig. 6: per position, observed vs predicted cumulative
    survival, before and after STS, over a histogram of the bin counts.

    ``positions`` are 0-based; default: all when γ ≤ 4, else 4 spread evenly
    (γ = 7 gives the paper's positions 1, 3, 5, 7). Returns the positions drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z, s, m = _as_arrays(z, s, mask)
    gamma = z.shape[1]
    if positions is None:
        positions = (list(range(gamma)) if gamma <= 4
                     else sorted({round(i * (gamma - 1) / 3) for i in range(4)}))
    before, after = cumulative_survival(z), cumulative_survival(z, temperatures)
    fig, axes = plt.subplots(1, len(positions), figsize=(3.2 * len(positions), 3.4),
                             squeeze=False)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    for ax, k in zip(axes[0], positions):
        rows, o = m[:, k], s[m[:, k], k]
        hist = ax.twinx()
        hist.hist(after[rows, k], bins=edges, color="0.85", zorder=0)  # deployed scores
        hist.set_yticks([])
        ax.set_zorder(hist.get_zorder() + 1)
        ax.patch.set_visible(False)
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
        for pred, style, name in ((before[rows, k], "o-", "before"),
                                  (after[rows, k], "s-", "after")):
            xs, ys = _bin_curve(pred, o, n_bins)
            ax.plot(xs, ys, style, ms=3, label=f"{name} (ECE {_pct(ece(pred, o, n_bins))})")
        ax.set_title(f"Position {k + 1}  AUC {auroc(after[rows, k], o):.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("predicted survival ∏ c_i")
        ax.legend(fontsize=6, loc="upper left")
    axes[0][0].set_ylabel("observed survival")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return list(positions)


def _bin_curve(pred: np.ndarray, o: np.ndarray, n_bins: int):
    idx = _bin_index(pred, n_bins)
    cnt = np.bincount(idx, minlength=n_bins)
    keep = cnt > 0
    xs = np.bincount(idx, weights=pred, minlength=n_bins)[keep] / cnt[keep]
    ys = np.bincount(idx, weights=o, minlength=n_bins)[keep] / cnt[keep]
    return xs, ys
