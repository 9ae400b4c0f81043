"""Supervised fine-tuning: `python -m jobs.sft --config jobs/configs/sft.yaml [--train.lr 1e-5 ...]`."""

from __future__ import annotations

from pathlib import Path

from jobs.common import parse_job_args, setup_logging
from pipeline.config import SFTJobConfig, dump_config
from pipeline.runtime import init_ray
from pipeline.train.sft import run_sft


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_job_args(SFTJobConfig, "sft.yaml", argv)
    dump_config(cfg, Path(cfg.output_dir) / "config.yaml")
    init_ray(cfg.ray)
    result = run_sft(cfg)
    print(f"sft: {result.step} steps, loss {result.metrics.get('loss', float('nan')):.4f}, model in {result.export_dir}")


if __name__ == "__main__":
    main()
