"""Fit the vectorized PRM: `python -m jobs.fit_prm --config jobs/configs/fit_prm.yaml [...]`."""

from __future__ import annotations

import json

from jobs.common import start_job
from pipeline.config import PRMJobConfig
from pipeline.train.prm import run_fit_prm


def main(argv: list[str] | None = None):
    cfg = start_job(PRMJobConfig, "fit_prm.yaml", argv, "output_dir")
    r = run_fit_prm(cfg)
    held_out = {k: v for k, v in r.metrics.items() if k.startswith(("eval/", "probe/"))}  # probe/: the head's start
    print(f"fit_prm: {r.step} steps; held-out: " + json.dumps(held_out))
    return r


if __name__ == "__main__":
    main()
