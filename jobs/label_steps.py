"""Step labels per objective: `python -m jobs.label_steps --config jobs/configs/label_steps.yaml [...]`."""

from __future__ import annotations

import json
from jobs.common import start_job
from pipeline.config import LabelJobConfig
from pipeline.labeling.job import run_labeling, summarize


def main(argv: list[str] | None = None):
    cfg = start_job(LabelJobConfig, "label_steps.yaml", argv, "out_dir")
    r = run_labeling(cfg)
    print(f"label_steps: {len(r.shards_written)} shards written ({r.rows} rows), {len(r.shards_skipped)} already done, "
          f"{r.failed_inputs} trajectories failed, {r.extra.get('_unparseable', 0)} judge outputs unparseable")
    print(json.dumps(summarize(cfg.out_dir), indent=1))
    return r


if __name__ == "__main__":
    main()
