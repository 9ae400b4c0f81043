"""Evaluate policies on the held-out built-in tasks: `python -m jobs.eval --config jobs/configs/eval.yaml [...]`."""

from __future__ import annotations

from jobs.common import start_job
from pipeline.config import EvalJobConfig
from pipeline.eval.job import run_eval


def main(argv: list[str] | None = None):
    cfg = start_job(EvalJobConfig, "eval.yaml", argv, "out_dir", with_ray=False)
    out = run_eval(cfg)
    print(f"eval: {len(out['rows'])} scores; report {out['markdown']}; plots {out['plots']}")
    return out


if __name__ == "__main__":
    main()
