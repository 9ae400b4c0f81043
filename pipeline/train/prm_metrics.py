"""Held-out PRM metrics per objective, from all step predictions and labels.

    soft     mse, and mse_mean_baseline (predicting the mean label) to beat; auroc of the output
             against the label thresholded at 0.5 (is a good step ranked above a bad one);
    hard     step_accuracy (sigmoid(output) >= 0.5), auroc;
    outcome  pairwise_accuracy over responses to the same prompt with different outcomes.
"""

from __future__ import annotations

import numpy as np


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks); NaN when one class is absent."""
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


def objective_metrics(kind: str, preds: np.ndarray, labels: np.ndarray, groups: np.ndarray | None = None) -> dict:
    keep = ~np.isnan(labels)
    p, y = preds[keep].astype(np.float64), labels[keep].astype(np.float64)
    if len(y) == 0:
        return {}
    if kind == "soft":
        return {"mse": float(np.mean((p - y) ** 2)), "mse_mean_baseline": float(np.mean((y - y.mean()) ** 2)),
                "auroc": auroc(p, (y >= 0.5).astype(np.float64)), "n": len(y)}
    if kind == "hard":
        return {"step_accuracy": float(np.mean((p >= 0) == (y >= 0.5))), "auroc": auroc(p, y), "n": len(y)}
    g = groups[keep]
    wins = total = 0
    for a in range(len(y)):
        for b in range(len(y)):
            if g[a] == g[b] and y[a] > y[b]:
                total += 1
                wins += p[a] > p[b]
    return {"pairwise_accuracy": wins / total if total else float("nan"), "n": total}
