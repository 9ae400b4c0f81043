"""Sample trajectories: `python -m jobs.rollout --config jobs/configs/rollout.yaml [--model.name_or_path DIR ...]`."""

from __future__ import annotations

from jobs.common import start_job
from pipeline.config import RolloutJobConfig
from pipeline.rollout.trajectories import run_rollout


def main(argv: list[str] | None = None):
    cfg = start_job(RolloutJobConfig, "rollout.yaml", argv, "out_dir")
    r = run_rollout(cfg)
    print(f"rollout: {len(r.shards_written)} shards written ({r.rows} trajectories), {len(r.shards_skipped)} already "
          f"done, {r.failed_inputs} problems failed -> {cfg.out_dir}")
    return r


if __name__ == "__main__":
    main()
