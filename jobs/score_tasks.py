"""Score a policy on every objective of the held-out built-in tasks:
`python -m jobs.score_tasks [--model.name_or_path DIR] [--n_eval 48]`.

Writes <out_dir>/scores.json, scores.md and episodes.jsonl. Generation runs in
process on the transformers engine (a measurement, not a batch job).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from jobs.common import start_job
from pipeline.config import ScoreTasksConfig
from pipeline.eval.task_scores import score_task
from pipeline.models.registry import resolve_model
from pipeline.engines.hf_engine import TransformersEngine
from pipeline.tasks import splits


def main(argv: list[str] | None = None) -> dict:
    cfg = start_job(ScoreTasksConfig, None, argv, "out_dir", with_ray=False)
    out = Path(cfg.out_dir)
    engine = TransformersEngine(resolve_model(cfg.model.name_or_path), cfg.model.dtype, batch_size=cfg.batch_size)
    results, lines = {}, ["| task | objective | mean | positive rate | n |", "|---|---|---:|---:|---:|"]
    with open(out / "episodes.jsonl", "w") as f:
        for task in cfg.tasks:
            problems = splits(task, 1, cfg.n_eval, cfg.seed)["eval"][0]
            t0 = time.time()
            r = score_task(task, problems, engine, extra_objectives=cfg.objectives.get(task, []),
                           temperature=cfg.temperature, seed=cfg.seed)
            results[task] = {**r["objectives"], "seconds": round(time.time() - t0, 1)}
            for e in r["episodes"]:
                f.write(json.dumps(e, default=str) + "\n")
            for name, s in r["objectives"].items():
                lines.append(f"| {task} | {name} | {s['mean']:.3f} | {s['positive_rate']:.3f} | {s['n']} |")
            print(f"score_tasks: {task}: " + ", ".join(f"{k}={v['mean']:.3f}" for k, v in r["objectives"].items())
                  + f" ({time.time() - t0:.0f} s)", flush=True)
    (out / "scores.json").write_text(json.dumps(results, indent=1))
    (out / "scores.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
