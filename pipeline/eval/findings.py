"""The paper's findings, checked in miniature on evaluation rows (pipeline.eval.evaluate).

F1  the MAH-DPO ensemble (equal weights over a task's objectives) improves every objective over SFT;
F2  on conflicting objectives it beats single-head DPO on the pooled pairs;
F3  moving weight toward an objective moves that objective's score up, monotonically along the sweep;
F4  PRM-guided decoding raises verifiable accuracy.
Each returns (holds: bool | None, text with the numbers); None when the rows lack what it needs.
"""

from __future__ import annotations

import json

CONFLICTING = {"assistant": ("thoroughness", "concision")}


def _score(rows, policy, task, objective, weights=None, decoding="plain"):
    for r in rows:
        if (r["policy"] == policy and r["task"] == task and r["objective"] == objective and r["decoding"] == decoding
                and (weights is None or (r["weights"] and json.loads(r["weights"]) == weights))):
            return r["mean"]
    return None


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
            a, b = _score(rows, mah, task, o, w), _score(rows, sft, task, o)
            if a is None or b is None:
                continue
            holds &= a > b
            lines.append(f"{task}/{o}: MAH-DPO {a:.3f} vs SFT {b:.3f} ({'up' if a > b else 'not up'})")
    return (holds if lines else None), "; ".join(lines)


def f2(rows, mah="MAH-DPO", single="single-head DPO"):
    lines, holds = [], True
    for task, objs in CONFLICTING.items():
        w = _equal(rows, mah, task)
        if w is None:
            continue
        a = [_score(rows, mah, task, o, w) for o in objs]
        b = [_score(rows, single, task, o) for o in objs]
        if None in a or None in b:
            continue
        better = sum(a) > sum(b) and all(x >= y for x, y in zip(a, b))
        holds &= better
        lines.append(f"{task} ({objs[0]} vs {objs[1]}): MAH-DPO {a[0]:.3f}/{a[1]:.3f} vs single-head "
                     f"{b[0]:.3f}/{b[1]:.3f} ({'better on both' if better else 'not better on both'})")
    return (holds if lines else None), "; ".join(lines)


def f3(rows, mah="MAH-DPO"):
    lines, holds = [], True
    for task in sorted({r["task"] for r in rows}):
        pts = {}
        for r in rows:
            if r["policy"] == mah and r["task"] == task and r["weights"] and r["decoding"] == "plain":
                pts.setdefault(r["weights"], {})[r["objective"]] = r["mean"]
        if len(pts) < 3:
            continue
        for o in next(iter(pts.values())):
            seq = sorted((json.loads(w).get(o, 0.0), s[o]) for w, s in pts.items() if o in s)
            ups = sum(b[1] >= a[1] for a, b in zip(seq, seq[1:]))
            mono = ups == len(seq) - 1
            rises = seq[-1][1] > seq[0][1]
            holds &= mono and rises
            lines.append(f"{task}/{o}: " + " -> ".join(f"{s:.3f}" for _, s in seq)
                         + f" ({'monotone up' if mono and rises else f'{ups}/{len(seq) - 1} steps up'})")
    return (holds if lines else None), "; ".join(lines)


def f4(rows, mah="MAH-DPO", task="math_word", objective="accuracy"):
    guided = [r for r in rows if r["policy"] == mah and r["task"] == task and r["objective"] == objective
              and r["decoding"].startswith("guided")]
    if not guided:
        return None, ""
    g = guided[0]
    plain = _score(rows, mah, task, objective, json.loads(g["weights"]))
    if plain is None:
        return None, ""
    return g["mean"] > plain, (f"{task}/{objective} at equal weights: {g['decoding']} {g['mean']:.3f} "
                               f"(n={g['n']}) vs plain {plain:.3f}")


def findings(rows: list[dict]) -> dict[str, tuple[bool | None, str]]:
    return {"F1": f1(rows), "F2": f2(rows), "F3": f3(rows), "F4": f4(rows)}
