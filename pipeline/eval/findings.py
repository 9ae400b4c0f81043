"""The paper's findings, checked on evaluation rows (pipeline.eval.evaluate) with paired tests.

Every comparison pairs two rows of one task problem by problem (`problem_ids` / `scores`; problems
scored on both sides only) and reports the means, the mean difference with its 95% paired-bootstrap
interval, the exact sign test's counts (up / down / tied) and p (pipeline.eval.stats). A change is
*significant* when the sign test's p < ALPHA (0.05); its direction is the majority of the untied pairs.
A verdict never comes from comparing means alone.

F1  MAH-DPO at equal weights vs SFT: every non-verifiable objective (kind judged or dialogue) is
    significantly up (two-sided p < 0.05, more up than down), and no objective, verifiable ones included,
    is significantly down. (Paper: engagement up, math accuracy held.)
F2  For each conflicting pair (CONFLICTING, or `conflicting=`), MAH-DPO's sweep dominates single-head DPO
    (trained on the pooled pairs): some sweep point has, on both objectives, a mean difference >= 0 and no
    significant drop, and on at least one a significant rise at p < 0.05 / (number of sweep points)
    (Bonferroni: the rule picks the best of the points).
F3  Moving weight toward an objective raises it: per objective, along the MAH-DPO sweep, the per-problem
    least-squares slopes of score on that objective's weight are positive by a one-sided sign test,
    p < 0.05 (stats.trend). The issue asks for >= 5 sweep points; fewer (>= 3) are tested and flagged.
F4  PRM-guided decoding (K candidates) raises math accuracy over the same step-by-step sampling without
    a choice (K = 1), same policy, weights and problems: one-sided sign test p < 0.05 (the paper fixes the
    direction in advance). The text also pairs guided(K) with plain decoding where both exist.
Rows name objectives by id (`assistant/concision`); CONFLICTING and F4 name them within their task.
Each returns (holds: bool | None, text); None when the rows lack what it needs (no such rows, or rows
without per-problem scores).
"""

from __future__ import annotations

import json

from pipeline.eval.stats import min_p, paired, trend

ALPHA = 0.05
CONFLICTING = {"assistant": ("thoroughness", "concision")}
CLAIMS = {
    "F1": "MAH-DPO at equal weights improves every non-verifiable objective over SFT; no objective drops",
    "F2": "on conflicting objectives MAH-DPO's sweep dominates single-head DPO on the pooled pairs",
    "F3": "moving weight toward an objective raises it along the sweep (trend test)",
    "F4": "PRM-guided decoding raises math accuracy over sampling from the same policy at the same weights",
}


def _is(row_objective: str, objective: str) -> bool:
    """A row's objective id is `objective`, or (within its task) has that name: `math_word/accuracy` is `accuracy`."""
    return row_objective == objective or row_objective.rsplit("/", 1)[-1] == objective


def _label(task: str, objective: str) -> str:
    """`task/name` for the text, whether the row's id holds the family (`math_word/accuracy`) or is shared."""
    return objective if objective.startswith(f"{task}/") else f"{task}/{objective}"


def objective_kind(task: str, objective: str) -> str:
    """verifiable | judged | dialogue from the task's objective specs; 'unknown' for an objective no
    built-in task declares (treated as non-verifiable: it must improve)."""
    from pipeline.tasks import TASKS

    fam = TASKS.get(task)
    for spec in (fam.objectives if fam else []):
        if spec["name"] == objective.rsplit("/", 1)[-1]:
            return spec["kind"]
    return "unknown"


def _row(rows, policy, task, objective, weights=None, decoding="plain"):
    for r in rows:
        if (r["policy"] == policy and r["task"] == task and _is(r["objective"], objective) and r["decoding"] == decoding
                and (weights is None or (r["weights"] and json.loads(r["weights"]) == weights))):
            return r
    return None


class NoScores(ValueError):
    """A row without per-problem scores: the finding cannot be tested."""


def aligned(*rows) -> list[list]:
    """The rows' per-problem scores over the problems every row has, in the first row's order."""
    for r in rows:
        if not r.get("problem_ids") or r.get("scores") is None:
            raise NoScores(f"row {r['policy']}/{r['task']}/{r['objective']}/{r['decoding']} has no per-problem scores")
    maps = [dict(zip(r["problem_ids"], r["scores"])) for r in rows]
    common = [i for i in rows[0]["problem_ids"] if all(i in m for m in maps[1:])]
    return [[m[i] for i in common] for m in maps]


def compare(ra: dict, rb: dict) -> dict:
    """stats.paired of two rows over their common problems, plus `up` / `down` (significant at ALPHA)."""
    a, b = aligned(ra, rb)
    s = paired(a, b)
    s["up"] = s["p"] < ALPHA and s["wins"] > s["losses"]
    s["down"] = s["p"] < ALPHA and s["losses"] > s["wins"]
    return s


def fmt(s: dict, name_a: str, name_b: str) -> str:
    """'A 0.500 vs B 0.400, diff +0.100 [95% CI +0.050, +0.150], 30 up / 10 down / 24 tied, sign p = 0.002, n = 64'."""
    return (f"{name_a} {s['mean_a']:.3f} vs {name_b} {s['mean_b']:.3f}, diff {s['diff']:+.3f} "
            f"[95% CI {s['ci_low']:+.3f}, {s['ci_high']:+.3f}], {s['wins']} up / {s['losses']} down / {s['ties']} tied, "
            f"sign p = {s['p']:.3g}, n = {s['n']}")


def _equal(rows, policy, task):
    """The equal-weight point of a policy's sweep on a task ({o: 0.5, ...})."""
    ws = [json.loads(r["weights"]) for r in rows if r["policy"] == policy and r["task"] == task and r["weights"]
          and r["decoding"] == "plain"]
    for w in ws:
        vals = list(w.values())
        if max(vals) - min(vals) < 1e-6:
            return w
    return None


def _sweep(rows, policy, task) -> dict[str, dict[str, dict]]:
    """{weights JSON: {objective id: row}} of a policy's plain sweep on a task."""
    pts: dict[str, dict[str, dict]] = {}
    for r in rows:
        if r["policy"] == policy and r["task"] == task and r["weights"] and r["decoding"] == "plain":
            pts.setdefault(r["weights"], {})[r["objective"]] = r
    return pts


def _guard(fn):
    """A finding whose rows carry no per-problem scores is not measured (None), saying why."""
    def wrapped(rows, *a, **kw):
        try:
            return fn(rows, *a, **kw)
        except NoScores as e:
            return None, f"not testable: {e} (rows from an evaluation before per-problem scores were kept)"
    wrapped.__doc__, wrapped.__name__ = fn.__doc__, fn.__name__
    return wrapped


@_guard
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
            s, kind = compare(ra, rb), objective_kind(task, o)
            need_up = kind != "verifiable"
            ok = (s["up"] if need_up else True) and not s["down"]
            holds &= ok
            verdict = ("up" if s["up"] else "down" if s["down"] else "no significant change")
            lines.append(f"{_label(task, o)} ({kind}; {'must rise' if need_up else 'must not drop'}): "
                         f"{fmt(s, 'MAH-DPO', 'SFT')} -> {verdict}{'' if ok else ' (fails)'}")
    return (holds if lines else None), "; ".join(lines)


def _weights_label(w: dict) -> str:
    return "(" + ", ".join(f"{k.rsplit('/', 1)[-1]} {v:g}" for k, v in w.items()) + ")"


@_guard
def f2(rows, mah="MAH-DPO", single="single-head DPO", conflicting=None):
    lines, holds = [], True
    for task, objs in (conflicting or CONFLICTING).items():
        pts = _sweep(rows, mah, task)
        rb = [_row(rows, single, task, o) for o in objs]
        if not pts or None in rb:
            continue
        alpha = ALPHA / len(pts)
        best, parts = [], []
        for wj, by in sorted(pts.items()):
            ra = [next((r for oid, r in by.items() if _is(oid, o)), None) for o in objs]
            if None in ra:
                continue
            ss = [compare(a, b) for a, b in zip(ra, rb)]
            ok = (all(s["diff"] >= 0 and not s["down"] for s in ss)
                  and any(s["p"] < alpha and s["wins"] > s["losses"] for s in ss))
            best += [wj] if ok else []
            parts.append(f"{_weights_label(json.loads(wj))}: " + ", ".join(
                f"{o} {s['mean_a']:.3f} vs {s['mean_b']:.3f} ({s['diff']:+.3f} [{s['ci_low']:+.3f}, {s['ci_high']:+.3f}], "
                f"p = {s['p']:.3g})" for o, s in zip(objs, ss)) + (" dominates" if ok else ""))
        if not parts:
            continue
        holds &= bool(best)
        lines.append(f"{task} ({objs[0]} vs {objs[1]}), MAH-DPO sweep point vs single-head DPO, paired, "
                     f"significance at p < {alpha:.3g} (0.05 / {len(pts)} points): " + "; ".join(parts)
                     + (f" -> dominated by {', '.join(_weights_label(json.loads(b)) for b in best)}" if best
                        else " -> no point dominates"))
    return (holds if lines else None), "; ".join(lines)


@_guard
def f3(rows, mah="MAH-DPO"):
    lines, holds = [], True
    for task in sorted({r["task"] for r in rows}):
        pts = _sweep(rows, mah, task)
        if len(pts) < 3:
            continue
        for o in next(iter(pts.values())):
            seq = [(json.loads(w).get(o, 0.0), by[o]) for w, by in pts.items() if o in by]
            scores = aligned(*[r for _, r in seq])
            t = trend([(w, s) for (w, _), s in zip(seq, scores)])
            ok = t["p"] < ALPHA and t["mean_slope"] > 0
            holds &= ok
            few = "" if len(seq) >= 5 else f"; only {len(seq)} sweep points (the issue asks for >= 5)"
            lines.append(f"{_label(task, o)}: " + " -> ".join(f"{m:.3f}" for _, m in t["means"])
                         + f" as its weight goes {t['means'][0][0]:g} -> {t['means'][-1][0]:g}; per-problem slope "
                         f"{t['mean_slope']:+.3f} [95% CI {t['ci_low']:+.3f}, {t['ci_high']:+.3f}], {t['ups']} up / "
                         f"{t['downs']} down / {t['flat']} flat, one-sided sign p = {t['p']:.3g}, n = {t['n']}"
                         f" -> {'rises' if ok else 'no significant rise'}{few}")
    return (holds if lines else None), "; ".join(lines)


@_guard
def f4(rows, mah="MAH-DPO", task="math_word", objective="accuracy"):
    guided = [r for r in rows if r["policy"] == mah and r["task"] == task and _is(r["objective"], objective)
              and r["decoding"].startswith("guided") and r["decoding"] != "guided(K=1)"]
    if not guided:
        return None, ""
    g = guided[0]
    w = json.loads(g["weights"])
    base = _row(rows, mah, task, objective, w, "guided(K=1)")  # same problems, no choice
    if base is None:
        return None, ""
    s = compare(g, base)
    ok = s["p_greater"] < ALPHA
    untied = s["wins"] + s["losses"]
    text = (f"{_label(task, objective)} at equal weights: {fmt(s, g['decoding'], 'K=1')}; one-sided p = "
            f"{s['p_greater']:.3g} -> {'raised' if ok else 'not significantly raised'}")
    if not ok:
        text += (f" ({untied} untied pairs: the smallest one-sided p they could give is {min_p(untied, two_sided=False):.3g}; "
                 f"{s['n']} problems guided)")
    plain = _row(rows, mah, task, objective, w, "plain")
    if plain is not None:
        text += f"; vs plain decoding at the same weights on the same problems: {fmt(compare(g, plain), g['decoding'], 'plain')}"
    return ok, text


def findings(rows: list[dict], conflicting: dict | None = None) -> dict[str, tuple[bool | None, str]]:
    return {"F1": f1(rows), "F2": f2(rows, conflicting=conflicting), "F3": f3(rows), "F4": f4(rows)}
