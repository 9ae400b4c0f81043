"""Held-out PRM metrics per objective, from all step predictions and labels.

    soft     mse, and mse_mean_baseline (predicting the mean label) to beat; auroc of the output
             against the label thresholded at 0.5 (is a good step ranked above a bad one);
    hard     step_accuracy (sigmoid(output) >= 0.5) and majority_baseline (always the commoner
             label) to beat; auroc; mse of sigmoid(output) (the Brier score) and mse_mean_baseline;
    outcome  pairwise_accuracy over responses to the same prompt with different outcomes.
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks); NaN when one class is absent.
    Our own because no library in the environment has one (scikit-learn, torchmetrics and scipy are
    not installed, and not worth a dependency for 15 lines); checked against a pairwise count in tests."""
    pos, neg = labels == 1, labels == 0
    if not pos.any() or not neg.any():
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n_pos, n_neg = pos.sum(), neg.sum()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def auroc_se(a: float, n_pos: int, n_neg: int) -> float:
    """Standard error of an AUROC (Hanley and McNeil, 1982)."""
    if not n_pos or not n_neg or a != a:
        return float("nan")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return float(np.sqrt((a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)))


def objective_metrics(kind: str, preds: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None) -> dict:
    keep = ~np.isnan(labels)
    p, y = preds[keep].astype(np.float64), labels[keep].astype(np.float64)
    if len(y) == 0:
        return {}
    if kind == "soft":
        a = auroc(p, (y >= 0.5).astype(np.float64))
        return {"mse": float(np.mean((p - y) ** 2)), "mse_mean_baseline": float(np.mean((y - y.mean()) ** 2)),
                "auroc": a, "auroc_se": auroc_se(a, int((y >= 0.5).sum()), int((y < 0.5).sum())), "n": len(y)}
    if kind == "hard":
        prob = 1 / (1 + np.exp(-p))
        a = auroc(p, y)
        return {"step_accuracy": float(np.mean((p >= 0) == (y >= 0.5))),
                "majority_baseline": float(max(y.mean(), 1 - y.mean())), "auroc": a,
                "auroc_se": auroc_se(a, int((y >= 0.5).sum()), int((y < 0.5).sum())),
                "mse": float(np.mean((prob - y) ** 2)), "mse_mean_baseline": float(np.mean((y - y.mean()) ** 2)),
                "n": len(y)}
    g = groups[keep]
    wins = total = 0
    for a in range(len(y)):
        for b in range(len(y)):
            if g[a] == g[b] and y[a] > y[b]:
                total += 1
                wins += p[a] > p[b]
    return {"pairwise_accuracy": wins / total if total else float("nan"), "n": total}


def versus_baselines(metrics: dict[str, float]) -> list[dict]:
    """Per objective, from the held-out metrics among `metrics` ('eval/<objective>/<metric>'): n,
    AUROC, MSE, the mean baseline's MSE, and whether the PRM beats both trivial baselines (AUROC
    above 0.5 and MSE below predicting the mean); None where undefined."""
    per: dict[str, dict] = {}
    for k, v in metrics.items():
        name, _, metric = k.removeprefix("eval/").rpartition("/")
        if k.startswith("eval/") and name:
            per.setdefault(name, {})[metric] = v
    out = []
    for name, m in sorted(per.items()):
        a, mse, base = m.get("auroc"), m.get("mse"), m.get("mse_mean_baseline")
        known = a is not None and mse is not None and base is not None and not np.isnan(a)
        out.append({"objective": name, "n": int(m.get("n", 0)), "auroc": a, "auroc_se": m.get("auroc_se"), "mse": mse,
                    "mse_mean_baseline": base, "beats_baselines": bool(a > 0.5 and mse < base) if known else None})
    return out


def baseline_table(metrics: dict[str, float]) -> str:
    """versus_baselines as a Markdown table."""
    def f(x):
        return "-" if x is None else f"{x:.3f}"

    lines = ["| objective | steps | AUROC (+- SE) | MSE | MSE of the mean | beats both |", "|---|---:|---:|---:|---:|---|"]
    for r in versus_baselines(metrics):
        se = f" +- {r['auroc_se']:.2f}" if r["auroc_se"] is not None and r["auroc_se"] == r["auroc_se"] else ""
        lines.append(f"| {r['objective']} | {r['n']} | {f(r['auroc'])}{se} | {f(r['mse'])} | {f(r['mse_mean_baseline'])} | "
                     f"{ {True: 'yes', False: 'no', None: 'undefined'}[r['beats_baselines']]} |")
    return "\n".join(lines)
