"""Supervised fine-tuning: `python -m jobs.sft --config jobs/configs/sft.yaml [--train.lr 1e-5 ...]`."""

from __future__ import annotations

from jobs.common import start_job
from pipeline.config import SFTJobConfig
from pipeline.train.sft import run_sft


def main(argv: list[str] | None = None) -> None:
    cfg = start_job(SFTJobConfig, "sft.yaml", argv, "output_dir")
    result = run_sft(cfg)
    print(f"sft: {result.step} steps, loss {result.metrics.get('loss', float('nan')):.4f}, model in {result.export_dir}")


if __name__ == "__main__":
    main()
