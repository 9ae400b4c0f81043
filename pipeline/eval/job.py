"""jobs.eval: evaluate, then write Parquet, Markdown and plots."""

from __future__ import annotations

from pipeline.data.io import read_records
from pipeline.eval.evaluate import evaluate
from pipeline.eval.report import write


def run_eval(cfg) -> dict:
    if not cfg.problems or not cfg.policies:
        raise ValueError("give the held-out problems and at least one policy to evaluate")
    problems = read_records(cfg.problems, "problem")[0].to_pylist()
    if cfg.n_per_task:
        seen: dict[str, int] = {}
        kept = []
        for p in problems:
            seen[p["task"]] = seen.get(p["task"], 0) + 1
            if seen[p["task"]] <= cfg.n_per_task:
                kept.append(p)
        problems = kept
    policies = [p.model_dump() for p in cfg.policies]
    guided = cfg.guided.model_dump() if cfg.guided else None
    from pipeline.tasks import check_shared

    rows = evaluate(policies, problems, engine_cfg=cfg.engine, work_dir=cfg.out_dir, points=cfg.sweep_points,
                    temperature=cfg.temperature, top_k=cfg.top_k, guided=guided, shared=check_shared(cfg.shared_objectives))
    out = write(rows, cfg.out_dir)
    out["rows"] = rows
    return out
