"""Small statistics for the evaluation, pure numpy: confidence intervals over problems and paired tests.

Every interval is a 95% percentile bootstrap over problems with a fixed seed (2000 resamples), so a
report is reproducible to the digit. Paired tests use the exact sign test (binomial, ties dropped):
it needs no distributional assumption, works for 0/1 accuracy (where it is McNemar's exact test) and
for judge scores alike, and its p-value is computed with math.comb, not approximated.
"""

from __future__ import annotations

import math

import numpy as np

RESAMPLES = 2000
SEED = 0
LEVEL = 0.95


def _finite(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _boot_ci(xs: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of xs; (nan, nan) when empty, (x, x) for one value."""
    if len(xs) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = xs[rng.integers(0, len(xs), size=(resamples, len(xs)))].mean(axis=1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def mean_ci(xs, **kw) -> dict:
    """{mean, ci_low, ci_high, n} of the scored values of xs (None / NaN are unscored and not counted in n)."""
    v = np.array([float(x) for x in xs if _finite(x)], dtype=float)
    lo, hi = _boot_ci(v, **kw)
    return {"mean": float(v.mean()) if len(v) else float("nan"), "ci_low": lo, "ci_high": hi, "n": int(len(v))}


def sign_test(wins: int, losses: int) -> dict:
    """Exact sign test on `wins` positive and `losses` negative differences (ties already dropped):
    two-sided p, and one-sided p for "positive" (P[X >= wins]) and "negative" (P[X <= wins]), X ~ Bin(n, 1/2)."""
    n = wins + losses
    if n == 0:
        return {"p": 1.0, "p_greater": 1.0, "p_less": 1.0}
    pmf = [math.comb(n, i) / 2 ** n for i in range(n + 1)]
    p_greater = min(1.0, sum(pmf[wins:]))
    p_less = min(1.0, sum(pmf[: wins + 1]))
    return {"p": min(1.0, 2 * min(p_greater, p_less)), "p_greater": p_greater, "p_less": p_less}


def min_p(n_untied: int, two_sided: bool = True) -> float:
    """The smallest sign-test p reachable with n untied pairs (all one way): what n pairs can show at best."""
    return min(1.0, (2 if two_sided else 1) * 0.5 ** n_untied)


def paired(a, b, **kw) -> dict:
    """a vs b over the same problems (aligned lists; a pair with None / NaN on either side is left out and
    counted in `dropped`). -> {n, dropped, mean_a, mean_b, diff (mean of a - b), ci_low, ci_high (bootstrap
    over pairs), wins (a > b), losses, ties, p (two-sided sign test), p_greater, p_less (one-sided)}."""
    if len(a) != len(b):
        raise ValueError(f"paired: the score lists are not aligned ({len(a)} vs {len(b)} problems)")
    keep = [(float(x), float(y)) for x, y in zip(a, b) if _finite(x) and _finite(y)]
    x = np.array([k[0] for k in keep], dtype=float)
    y = np.array([k[1] for k in keep], dtype=float)
    d = x - y
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    lo, hi = _boot_ci(d, **kw)
    return {"n": len(keep), "dropped": len(a) - len(keep),
            "mean_a": float(x.mean()) if len(x) else float("nan"), "mean_b": float(y.mean()) if len(y) else float("nan"),
            "diff": float(d.mean()) if len(d) else float("nan"), "ci_low": lo, "ci_high": hi,
            "wins": wins, "losses": losses, "ties": len(keep) - wins - losses, **sign_test(wins, losses)}


def slopes(points) -> tuple[np.ndarray, int]:
    """Per problem, the least-squares slope of score on weight over the points where it is scored (at least
    two distinct weights). points: [(weight, aligned scores)]. -> (slopes, problems left out)."""
    if not points:
        return np.zeros(0), 0
    n = len(points[0][1])
    if any(len(s) != n for _, s in points):
        raise ValueError(f"trend: the sweep points' score lists are not aligned ({[len(s) for _, s in points]})")
    out, left_out = [], 0
    for i in range(n):
        xy = [(float(w), float(s[i])) for w, s in points if _finite(s[i])]
        w = np.array([p[0] for p in xy])
        if len(set(w.tolist())) < 2:
            left_out += 1
            continue
        y = np.array([p[1] for p in xy])
        wc = w - w.mean()
        out.append(float((wc * (y - y.mean())).sum() / (wc * wc).sum()))
    return np.array(out, dtype=float), left_out


def trend(points, **kw) -> dict:
    """Does the score rise with the weight? Per-problem slopes (slopes()), then a one-sided sign test that
    slopes are positive (p; flat slopes are ties) and a bootstrap interval of the mean slope.
    -> {n, dropped, mean_slope, ci_low, ci_high, ups, downs, flat, p, means (per point, in weight order)}."""
    pts = sorted(points, key=lambda p: p[0])
    s, dropped = slopes(pts)
    ups, downs = int((s > 0).sum()), int((s < 0).sum())
    lo, hi = _boot_ci(s, **kw)
    return {"n": int(len(s)), "dropped": dropped, "mean_slope": float(s.mean()) if len(s) else float("nan"),
            "ci_low": lo, "ci_high": hi, "ups": ups, "downs": downs, "flat": int(len(s)) - ups - downs,
            "p": sign_test(ups, downs)["p_greater"],
            "means": [(float(w), mean_ci(sc)["mean"]) for w, sc in pts]}
