"""The paper's findings, checked in miniature on evaluation rows (pipeline.eval.evaluate).

F1  the MAH-DPO ensemble (equal weights over a task's objectives) improves every objective over SFT;
F2  on conflicting objectives it beats single-head DPO on the pooled pairs;
F3  moving weight toward an objective moves that objective's score up, monotonically along the sweep;
F4  PRM-guided decoding raises verifiable accuracy (K candidates vs K = 1 on the same problems).
Rows name objectives by id (`assistant/concision`); F2 and F4 name them within their task (`concision`).
Each returns (holds: bool | None, text with the numbers); None when the rows lack what it needs.
A finding holds on the means; the text adds each difference's noise (2 standard errors of the
difference), so a reader sees when "holds" or "does not hold" is within it.
"""

from __future__ import annotations

import json
import math

CONFLICTING = {"assistant": ("thoroughness", "concision")}


def _is(row_objective: str, objective: str) -> bool:
    """A row's objective id is `objective`, or (within its task) has that name: `math_word/accuracy` is `accuracy`."""
    return row_objective == objective or row_objective.rsplit("/", 1)[-1] == objective


def _label(task: str, objective: str) -> str:
    """`task/name` for the text, whether the row's id holds the family (`math_word/accuracy`) or is shared."""
    return objective if objective.startswith(f"{task}/") else f"{task}/{objective}"


def _row(rows, policy, task, objective, weights=None, decoding="plain"):
    for r in rows:
        if (r["policy"] == policy and r["task"] == task and _is(r["objective"], objective) and r["decoding"] == decoding
                and (weights is None or (r["weights"] and json.loads(r["weights"]) == weights))):
            return r
    return None


def _score(rows, policy, task, objective, weights=None, decoding="plain"):
    r = _row(rows, policy, task, objective, weights, decoding)
    return None if r is None else r["mean"]


def _noise(*rs) -> str:
    """', 2 SE 0.123' for the difference of two rows' means (independent samples); '' when unknown."""
    se = [r.get("se") for r in rs if r is not None]
    if len(se) != len(rs) or any(x is None or math.isnan(x) for x in se):
        return ""
    return f", noise 2 SE = {2 * math.sqrt(sum(x * x for x in se)):.3f}"


def _equal(rows, policy, task):
    """The equal-weight point of a policy's sweep on a task ({o: 0.5, ...})."""
    ws = [json.loads(r["weights"]) for r in rows if r["policy"] == policy and r["task"] == task and r["weights"]
          and r["decoding"] == "plain"]
    for w in ws:
        vals = list(w.values())
        if max(vals) - min(vals) < 1e-6:
            return w
    return None


def f1(rows, mah="MAH-DPO", sft="sft"):
    lines, holds = [], True
    for task in sorted({r["task"] for r in rows}):
        w = _equal(rows, mah, task)
        if w is None:
            continue
        for o in w:
            ra, rb = _row(rows, mah, task, o, w), _row(rows, sft, task, o)
            if ra is None or rb is None:
                continue
            a, b = ra["mean"], rb["mean"]
            holds &= a > b
            lines.append(f"{_label(task, o)}: MAH-DPO {a:.3f} vs SFT {b:.3f} ({'up' if a > b else 'not up'}{_noise(ra, rb)})")
    return (holds if lines else None), "; ".join(lines)


def f2(rows, mah="MAH-DPO", single="single-head DPO"):
    lines, holds = [], True
    for task, objs in CONFLICTING.items():
        w = _equal(rows, mah, task)
        if w is None:
            continue
        ra = [_row(rows, mah, task, o, w) for o in objs]
        rb = [_row(rows, single, task, o) for o in objs]
        if None in ra or None in rb:
            continue
        a, b = [r["mean"] for r in ra], [r["mean"] for r in rb]
        better = sum(a) > sum(b) and all(x >= y for x, y in zip(a, b))
        holds &= better
        lines.append(f"{task} ({objs[0]} vs {objs[1]}): MAH-DPO {a[0]:.3f}/{a[1]:.3f} vs single-head "
                     f"{b[0]:.3f}/{b[1]:.3f} ({'better on both' if better else 'not better on both'}"
                     f"{_noise(ra[0], rb[0])} and{_noise(ra[1], rb[1])[1:]})")
    return (holds if lines else None), "; ".join(lines)


def f3(rows, mah="MAH-DPO"):
    lines, holds = [], True
    for task in sorted({r["task"] for r in rows}):
        pts = {}
        for r in rows:
            if r["policy"] == mah and r["task"] == task and r["weights"] and r["decoding"] == "plain":
                pts.setdefault(r["weights"], {})[r["objective"]] = r
        if len(pts) < 3:
            continue
        for o in next(iter(pts.values())):
            seq = sorted(((json.loads(w).get(o, 0.0), s[o]) for w, s in pts.items() if o in s), key=lambda x: x[0])
            vals = [r["mean"] for _, r in seq]
            ups = sum(b >= a for a, b in zip(vals, vals[1:]))
            mono = ups == len(vals) - 1
            rises = vals[-1] > vals[0]
            holds &= mono and rises
            lines.append(f"{_label(task, o)}: " + " -> ".join(f"{v:.3f}" for v in vals)
                         + f" ({'monotone up' if mono and rises else f'{ups}/{len(vals) - 1} steps up'}"
                         f"{_noise(seq[0][1], seq[-1][1])})")
    return (holds if lines else None), "; ".join(lines)


def f4(rows, mah="MAH-DPO", task="math_word", objective="accuracy"):
    guided = [r for r in rows if r["policy"] == mah and r["task"] == task and _is(r["objective"], objective)
              and r["decoding"].startswith("guided") and r["decoding"] != "guided(K=1)"]
    if not guided:
        return None, ""
    g = guided[0]
    base = _row(rows, mah, task, objective, json.loads(g["weights"]), "guided(K=1)")  # same problems, no choice
    if base is None:
        return None, ""
    return g["mean"] > base["mean"], (f"{task}/{objective} at equal weights, {g['n']} problems: {g['decoding']} "
                                      f"{g['mean']:.3f} vs K=1 {base['mean']:.3f}{_noise(g, base)}")


def findings(rows: list[dict]) -> dict[str, tuple[bool | None, str]]:
    return {"F1": f1(rows), "F2": f2(rows), "F3": f3(rows), "F4": f4(rows)}
