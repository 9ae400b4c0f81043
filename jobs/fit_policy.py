"""Fit the policy (MAH-DPO or a baseline): `python -m jobs.fit_policy --config jobs/configs/fit_policy.yaml [...]`."""

from __future__ import annotations

import json

from jobs.common import start_job
from pipeline.config import PolicyJobConfig
from pipeline.train.mahdpo import run_fit_policy


def main(argv: list[str] | None = None):
    cfg = start_job(PolicyJobConfig, "fit_policy.yaml", argv, "output_dir")
    results = run_fit_policy(cfg)
    for name, r in results.items():
        print(f"fit_policy[{name}]: {r.step} steps, exported to {r.export_dir}; held-out: "
              + json.dumps({k: round(v, 4) for k, v in r.metrics.items() if k.startswith("eval/")}))
    return results


if __name__ == "__main__":
    main()
