"""Preference pairs per objective: `python -m jobs.build_pairs --config jobs/configs/build_pairs.yaml [...]`."""

from __future__ import annotations

import json

from jobs.common import start_job
from pipeline.config import PairsJobConfig
from pipeline.rollout.pairs import run_build_pairs


def main(argv: list[str] | None = None):
    cfg = start_job(PairsJobConfig, "build_pairs.yaml", argv, "out_dir")
    summary = run_build_pairs(cfg)
    print("build_pairs: " + json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
