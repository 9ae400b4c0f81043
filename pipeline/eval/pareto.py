"""Pareto fronts and hypervolume of per-objective scores (higher is better on every axis)."""

from __future__ import annotations

import numpy as np


def pareto_front(points: np.ndarray) -> np.ndarray:
    """Indices of the non-dominated rows of points [n, d] (a row is dominated when another is >= on
    every objective and > on one)."""
    p = np.asarray(points, dtype=float)
    keep = []
    for i in range(len(p)):
        dominated = np.any(np.all(p >= p[i], axis=1) & np.any(p > p[i], axis=1))
        if not dominated:
            keep.append(i)
    return np.array(keep, dtype=int)


def hypervolume(points: np.ndarray, reference: np.ndarray | None = None) -> float:
    """Volume dominated by the points and bounded below by `reference` (default: the origin).
    Exact: inclusion-exclusion over a grid of the points' coordinates (fine for the few points of a sweep)."""
    p = np.asarray(points, dtype=float)
    if p.size == 0:
        return 0.0
    ref = np.zeros(p.shape[1]) if reference is None else np.asarray(reference, dtype=float)
    p = p[np.all(p > ref, axis=1)]
    if len(p) == 0:
        return 0.0
    p = p[pareto_front(p)]
    # Sweep the grid cells spanned by the sorted coordinates; a cell counts when some point dominates its upper corner.
    axes = [np.unique(np.concatenate([[ref[j]], p[:, j]])) for j in range(p.shape[1])]
    total = 0.0
    for idx in np.ndindex(*[len(a) - 1 for a in axes]):
        upper = np.array([axes[j][i + 1] for j, i in enumerate(idx)])
        if np.any(np.all(p >= upper, axis=1)):
            total += float(np.prod([axes[j][i + 1] - axes[j][i] for j, i in enumerate(idx)]))
    return total
