"""Sample trajectories: `python -m jobs.rollout --config jobs/configs/rollout.yaml [--model.name_or_path DIR ...]`."""

from __future__ import annotations

from pathlib import Path

from jobs.common import parse_job_args, setup_logging
from pipeline.config import RolloutJobConfig, dump_config
from pipeline.rollout.trajectories import run_rollout
from pipeline.runtime import init_ray


def main(argv: list[str] | None = None):
    setup_logging()
    cfg = parse_job_args(RolloutJobConfig, "rollout.yaml", argv)
    dump_config(cfg, Path(cfg.out_dir) / "config.yaml")
    init_ray(cfg.ray)
    r = run_rollout(cfg)
    print(f"rollout: {len(r.shards_written)} shards written ({r.rows} trajectories), {len(r.shards_skipped)} already "
          f"done, {r.failed_inputs} problems failed -> {cfg.out_dir}")
    return r


if __name__ == "__main__":
    main()
