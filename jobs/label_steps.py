"""Step labels per objective: `python -m jobs.label_steps --config jobs/configs/label_steps.yaml [...]`."""

from __future__ import annotations

import json
from pathlib import Path

from jobs.common import parse_job_args, setup_logging
from pipeline.config import LabelJobConfig, dump_config
from pipeline.labeling.job import run_labeling, summarize
from pipeline.runtime import init_ray


def main(argv: list[str] | None = None):
    setup_logging()
    cfg = parse_job_args(LabelJobConfig, "label_steps.yaml", argv)
    dump_config(cfg, Path(cfg.out_dir) / "_config.yaml")
    init_ray(cfg.ray)
    r = run_labeling(cfg)
    print(f"label_steps: {len(r.shards_written)} shards written ({r.rows} rows), {len(r.shards_skipped)} already done, "
          f"{r.failed_inputs} trajectories failed, {r.extra.get('_unparseable', 0)} judge outputs unparseable")
    print(json.dumps(summarize(cfg.out_dir), indent=1))
    return r


if __name__ == "__main__":
    main()
