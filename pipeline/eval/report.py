"""Evaluation output: rows as Parquet, Markdown tables (mean [95% CI] per cell), PNG plots (Pareto front per
task with interval error bars, per-objective bars), the verdicts section and steering examples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.eval.findings import CLAIMS, findings
from pipeline.eval.pareto import hypervolume, pareto_front


def scores_by_point(rows: list[dict], task: str) -> dict[tuple, dict[str, float]]:
    """{(policy, weights, decoding): {objective: mean}} for one task."""
    out: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["task"] == task:
            out.setdefault((r["policy"], r["weights"], r["decoding"]), {})[r["objective"]] = r["mean"]
    return out


def cis_by_point(rows: list[dict], task: str) -> dict[tuple, dict[str, tuple[float, float]]]:
    """{(policy, weights, decoding): {objective: (ci_low, ci_high)}} for one task (rows that carry them)."""
    out: dict[tuple, dict[str, tuple[float, float]]] = {}
    for r in rows:
        if r["task"] == task and r.get("ci_low") is not None and r.get("ci_high") is not None:
            out.setdefault((r["policy"], r["weights"], r["decoding"]), {})[r["objective"]] = (r["ci_low"], r["ci_high"])
    return out


def _err(points: list[tuple[float, tuple[float, float] | None]]):
    """matplotlib's [[below], [above]] error bars from (mean, (lo, hi)); None when any point lacks its interval."""
    if any(ci is None or np.isnan(ci).any() for _, ci in points):
        return None
    return [[m - ci[0] for m, ci in points], [ci[1] - m for m, ci in points]]


def fronts(rows: list[dict]) -> list[dict]:
    """Per (task, policy, decoding) with at least one point: the front's hypervolume (reference: origin)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        pts = scores_by_point(rows, task)
        objs = sorted({o for s in pts.values() for o in s})
        for pol, dec in sorted({(k[0], k[2]) for k in pts}):
            mine = np.array([[s.get(o, np.nan) for o in objs] for k, s in pts.items() if k[0] == pol and k[2] == dec])
            mine = mine[~np.isnan(mine).any(axis=1)]
            out.append({"task": task, "policy": pol, "decoding": dec, "objectives": objs, "points": len(mine),
                        "front": len(pareto_front(mine)) if len(mine) else 0,
                        "hypervolume": hypervolume(mine) if len(mine) else float("nan")})
    return out


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for task in sorted({r["task"] for r in rows}):
        pts, cis = scores_by_point(rows, task), cis_by_point(rows, task)
        objs = sorted({o for s in pts.values() for o in s})
        if len(objs) == 2:
            fig, ax = plt.subplots(figsize=(5, 4))
            for pol, dec in sorted({(k[0], k[2]) for k in pts}):
                xs = [(s[objs[0]], s[objs[1]], cis.get(k, {})) for k, s in pts.items()
                      if k[0] == pol and k[2] == dec and objs[0] in s and objs[1] in s]
                xs.sort(key=lambda x: x[0])
                style = "o-" if len(xs) > 1 else ("s" if dec == "plain" else "*")
                # error bars: each point's 95% interval over problems on each axis
                ax.errorbar([x[0] for x in xs], [x[1] for x in xs], fmt=style, capsize=2, elinewidth=0.8,
                            xerr=_err([(x[0], x[2].get(objs[0])) for x in xs]),
                            yerr=_err([(x[1], x[2].get(objs[1])) for x in xs]),
                            label=f"{pol} ({dec})" if dec != "plain" else pol)
            ax.set_xlabel(objs[0])
            ax.set_ylabel(objs[1])
            ax.set_title(f"{task}: Pareto front (weight sweep, 95% CI)", fontsize=9)
            ax.legend(fontsize=7)
            fig.tight_layout()
            p = out_dir / f"pareto_{task}.png"
            fig.savefig(p, dpi=110)
            plt.close(fig)
            paths.append(p)
        # per-objective bars: each policy at its best point per objective (plain decoding)
        fig, ax = plt.subplots(figsize=(6, 3.5))
        pols = sorted({k[0] for k in pts})
        width = 0.8 / max(1, len(pols))
        for i, pol in enumerate(pols):
            vals = [max((s.get(o, np.nan) for k, s in pts.items() if k[0] == pol and k[2] == "plain"), default=np.nan)
                    for o in objs]
            ax.bar(np.arange(len(objs)) + i * width, vals, width, label=pol)
        ax.set_xticks(np.arange(len(objs)) + 0.4 - width / 2, objs)
        ax.set_title(f"{task}: best score per objective")
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"bars_{task}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _short(objective: str) -> str:
    return objective.rsplit("/", 1)[-1]


def weights_text(weights: str | None) -> str:
    """'thoroughness 0.25, concision 0.75' from a row's weights JSON; '-' for a policy without a sweep."""
    return ", ".join(f"{_short(k)} {v:g}" for k, v in json.loads(weights).items()) if weights else "-"


def cell(r: dict) -> str:
    """'0.512 [0.431, 0.594]': the mean and its 95% interval over problems (the mean alone when the row has none)."""
    lo, hi = r.get("ci_low"), r.get("ci_high")
    if lo is None or hi is None or np.isnan(lo) or np.isnan(hi):
        return f"{r['mean']:.3f}"
    return f"{r['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def table(rows: list[dict]) -> str:
    """One Markdown table per task family: a line per (policy, decoding, weights), a column per objective with
    mean [95% CI] over the held-out problems, and the number of scored problems (n; a range when objectives differ)."""
    out = []
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        objs = sorted({r["objective"] for r in mine})
        by: dict[tuple, dict[str, dict]] = {}
        for r in sorted(mine, key=lambda r: (r["policy"], r["decoding"], r["weights"] or "")):
            by.setdefault((r["policy"], r["decoding"], r["weights"]), {})[r["objective"]] = r
        lines = [f"### {task}", "", "| policy | decoding | weights | " + " | ".join(objs) + " | n |",
                 "|---|---|---|" + "---:|" * len(objs) + "---:|"]
        for (pol, dec, w), cells in by.items():
            ns = sorted({c["n"] for c in cells.values()})
            n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
            lines.append(f"| {pol} | {dec} | {weights_text(w)} | "
                         + " | ".join(cell(cells[o]) if o in cells else "-" for o in objs) + f" | {n} |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


MEANING = {
    "F1": ("MAH-DPO at equal weights beats SFT on the non-verifiable objectives without a significant loss "
           "elsewhere, as the paper reports",
           "this run does not show MAH-DPO at equal weights improving every non-verifiable objective over SFT "
           "without a significant loss elsewhere"),
    "F2": ("on the conflicting objectives one multi-head model reaches a point that single-head DPO on the "
           "pooled pairs does not: separate heads keep the objectives' preferences apart",
           "no point of MAH-DPO's sweep beats single-head DPO significantly on one conflicting objective "
           "without losing on the other"),
    "F3": ("the weights steer: moving weight toward an objective raises it, problem by problem",
           "moving weight toward an objective does not raise it significantly for every objective, so "
           "steering is not shown for all of them"),
    "F4": ("PRM-guided decoding adds math accuracy at inference time on top of the policy",
           "PRM-guided decoding does not raise math accuracy significantly over sampling without a choice"),
}


def _verdict(h: bool | None) -> str:
    return "holds" if h else "does not hold" if h is not None else "not measured"


def verdicts_section(found: dict[str, tuple[bool | None, str]]) -> str:
    """Markdown: a table finding | verdict | evidence (pipeline.eval.findings), then a short paragraph on
    what the verdicts mean, generated from them."""
    lines = ["| finding | verdict | evidence |", "|---|---|---|"]
    for k, (h, text) in found.items():
        claim = CLAIMS.get(k, "")
        lines.append(f"| **{k}** {claim} | **{_verdict(h)}** | {(text or '-').replace('|', '/')} |")
    groups = {v: [k for k, (h, _) in found.items() if _verdict(h) == v] for v in ("holds", "does not hold", "not measured")}
    said = [f"{v.capitalize()}: {', '.join(ks)}." for v, ks in groups.items() if ks]
    means = [f"{k}: {MEANING[k][0 if h else 1]}." for k, (h, _) in found.items() if h is not None and k in MEANING]
    para = " ".join(said + means + [
        "Each verdict rests on paired tests over the same held-out problems (exact sign test, p < 0.05, with "
        "95% bootstrap intervals of the difference); where a finding does not hold, its evidence shows the "
        "differences, their intervals and n, and the diagnosis section shows what in this run limits them."])
    return "\n".join(lines) + "\n\n" + para


def _load_responses(responses) -> list[dict]:
    if isinstance(responses, (str, Path)):
        return pq.read_table(responses).to_pylist()
    return list(responses)


def _clip(text: str, width: int) -> str:
    text = text.replace("```", "` ` `")  # a response must not close the fence it is shown in
    return text if len(text) <= width else text[:width].rstrip() + " [...]"


def _show(response: str, width: int) -> str:
    """A response as text: a dialogue (JSON messages) as 'role: content' lines."""
    from pipeline.eval.repetition import stored_messages

    msgs = stored_messages(response)
    if msgs is not None:
        response = "\n".join(f"{m.get('role', '?')}: {m['content']}" for m in msgs)
    return _clip(response, width)


def _corners(rs: list[dict]) -> dict[str, list[dict]]:
    """{weights JSON: rows} of the sweep's ends: the weight vectors that put everything on one objective."""
    out: dict[str, list[dict]] = {}
    for r in rs:
        w = json.loads(r["weights"]) if r["weights"] else {}
        if len(w) > 1 and max(w.values()) >= 1 - 1e-9:
            out.setdefault(r["weights"], []).append(r)
    return out


def steering_examples(responses, k: int = 3, mah: str = "MAH-DPO", sft: str = "sft", width: int = 400) -> str:
    """Markdown: for k prompts, SFT's response and MAH-DPO's at each end of its sweep (plain decoding), with
    each response's scores. The prompts are those whose scores move most between the sweep's ends (summed
    over objectives), taken in turn from each task; ties by problem id. `responses`: responses.parquet's
    rows or its path."""
    rs = [r for r in _load_responses(responses) if r["decoding"] == "plain"]
    picks: dict[str, list[tuple]] = {}
    for task in sorted({r["task"] for r in rs}):
        ends = _corners([r for r in rs if r["task"] == task and r["policy"] == mah])
        base = {r["problem_id"]: r for r in rs if r["task"] == task and r["policy"] == sft}
        if len(ends) < 2 or not base:
            continue
        at = {w: {r["problem_id"]: r for r in v} for w, v in sorted(ends.items())}
        ranked = []
        for pid in sorted(base):
            if not all(pid in m for m in at.values()):
                continue
            sc = [json.loads(m[pid]["scores"]) for m in at.values()]
            # unscored (None) counts as 0 here: the ranking only picks which prompts to show
            spread = sum(max(s.get(o) or 0.0 for s in sc) - min(s.get(o) or 0.0 for s in sc) for o in sc[0])
            differ = len({m[pid]["response"] for m in at.values()}) > 1
            ranked.append((-spread, not differ, pid))
        picks[task] = [(task, pid, base[pid], {w: m[pid] for w, m in at.items()}) for *_, pid in sorted(ranked)]
    chosen = []
    while len(chosen) < k and any(picks.values()):  # round robin over tasks, best first
        for task in list(picks):
            if picks[task] and len(chosen) < k:
                chosen.append(picks[task].pop(0))
    if not chosen:
        return f"No steering examples: the responses hold no {sft} and {mah} sweep ends on the same problems."
    md = []
    for i, (task, pid, b, ends) in enumerate(chosen, 1):
        prompt = json.loads(b["prompt"])
        last = prompt[-1]["content"] if isinstance(prompt, list) and prompt else str(prompt)
        md += [f"#### Example {i}: {task}, problem `{pid}`", "", f"Prompt: {_clip(last, width).replace(chr(10), ' ')}", ""]
        for name, r in [(sft, b)] + [(f"{mah}, all weight on {_end(w)}", r) for w, r in ends.items()]:
            scores = ", ".join(f"{_short(o)} {v:.3f}" if v is not None else f"{_short(o)} -"
                               for o, v in json.loads(r["scores"]).items())
            md += [f"**{name}** (scores: {scores})", "", "```text", _show(r["response"], width), "```", ""]
    return "\n".join(md).rstrip() + "\n"


def repetition_section(responses, base: str = "sft") -> str:
    """Markdown: seq-rep-4 per evaluated point (pipeline.eval.repetition) and a line naming the points whose
    share of looping responses exceeds the base policy's by 0.2 or more (a degenerate policy)."""
    from pipeline.eval.repetition import LOOPING, degenerate, repetition_table

    t = repetition_table(_load_responses(responses))
    if not t:
        return "No responses to measure."
    bad = degenerate(t, base)
    head = (f"**Degenerate:** {len(bad)} of {len(t)} evaluated points loop far more than {base} (looping share >= "
            f"{base}'s + 0.2 on the same task): " + "; ".join(
                f"{r['policy']} ({weights_text(r['weights'])}, {r['decoding']}) on {r['task']}: {r['looping']:.2f}"
                for r in bad[:8]) + ("; ..." if len(bad) > 8 else "") + "." if bad else
            f"No evaluated point loops far more than {base} (looping share >= {base}'s + 0.2).")
    lines = [head, "", f"seq-rep-4: the share of a response's word 4-grams that repeat an earlier one (a dialogue: "
             f"its assistant turns); looping: responses at >= {LOOPING}.", "",
             "| policy | weights | decoding | task | n | mean seq-rep-4 | looping |", "|---|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['policy']} | {weights_text(r['weights'])} | {r['decoding']} | {r['task']} | {r['n']} | "
              f"{r['mean']:.3f} | {r['looping']:.2f} |" for r in t]
    return "\n".join(lines)


def _end(weights: str) -> str:
    """The objective a sweep end puts all its weight on."""
    w = json.loads(weights)
    return _short(max(w, key=w.get))


def write(rows: list[dict], out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "scores.parquet")
    fr = fronts(rows)
    pngs = plot(rows, out)
    md = ["# Evaluation", "", "## Verdicts", "", verdicts_section(findings(rows)), "", "## Scores", "",
          "Each cell: mean [95% percentile-bootstrap interval over the held-out problems]; n: problems scored.", "",
          table(rows), "", "## Pareto fronts", "",
          "| task | policy | decoding | points | on the front | hypervolume |", "|---|---|---|---:|---:|---:|"]
    md += [f"| {f['task']} | {f['policy']} | {f['decoding']} | {f['points']} | {f['front']} | {f['hypervolume']:.4f} |"
           for f in fr]
    md += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    responses = out / "responses.parquet"  # written by evaluate() into the same folder
    if responses.exists():
        md += ["", "## Steering examples", "", steering_examples(str(responses)),
               "", "## Repetition", "", repetition_section(str(responses))]
    (out / "eval.md").write_text("\n".join(md) + "\n")
    return {"parquet": str(out / "scores.parquet"), "markdown": str(out / "eval.md"), "plots": [str(p) for p in pngs],
            "fronts": fr, "responses": str(responses) if responses.exists() else None}
