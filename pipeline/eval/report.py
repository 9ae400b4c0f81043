"""Evaluation output: rows as Parquet, Markdown tables, PNG plots (Pareto front per task, per-objective bars)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.eval.pareto import hypervolume, pareto_front


def scores_by_point(rows: list[dict], task: str) -> dict[tuple, dict[str, float]]:
    """{(policy, weights, decoding): {objective: mean}} for one task."""
    out: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r["task"] == task:
            out.setdefault((r["policy"], r["weights"], r["decoding"]), {})[r["objective"]] = r["mean"]
    return out


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
        pts = scores_by_point(rows, task)
        objs = sorted({o for s in pts.values() for o in s})
        if len(objs) == 2:
            fig, ax = plt.subplots(figsize=(5, 4))
            for pol, dec in sorted({(k[0], k[2]) for k in pts}):
                xs = [(s[objs[0]], s[objs[1]], json.loads(k[1]) if k[1] else None) for k, s in pts.items()
                      if k[0] == pol and k[2] == dec]
                xs.sort(key=lambda x: x[0])
                style = "o-" if len(xs) > 1 else ("s" if dec == "plain" else "*")
                ax.plot([x[0] for x in xs], [x[1] for x in xs], style, label=f"{pol} ({dec})" if dec != "plain" else pol)
            ax.set_xlabel(objs[0])
            ax.set_ylabel(objs[1])
            ax.set_title(f"{task}: Pareto front (weight sweep)")
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


def table(rows: list[dict]) -> str:
    lines = ["| task | policy | decoding | weights | objective | mean | n |", "|---|---|---|---|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["task"], r["policy"], r["decoding"], r["weights"] or "", r["objective"])):
        lines.append(f"| {r['task']} | {r['policy']} | {r['decoding']} | {r['weights'] or '-'} | {r['objective']} | "
                     f"{r['mean']:.3f} | {r['n']} |")
    return "\n".join(lines)


def write(rows: list[dict], out_dir: str | Path) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "scores.parquet")
    fr = fronts(rows)
    pngs = plot(rows, out)
    md = ["# Evaluation", "", table(rows), "", "## Pareto fronts", "",
          "| task | policy | decoding | points | on the front | hypervolume |", "|---|---|---|---:|---:|---:|"]
    md += [f"| {f['task']} | {f['policy']} | {f['decoding']} | {f['points']} | {f['front']} | {f['hypervolume']:.4f} |"
           for f in fr]
    md += [""] + [f"![{p.stem}]({p.name})" for p in pngs]
    (out / "eval.md").write_text("\n".join(md) + "\n")
    return {"parquet": str(out / "scores.parquet"), "markdown": str(out / "eval.md"), "plots": [str(p) for p in pngs],
            "fronts": fr}
