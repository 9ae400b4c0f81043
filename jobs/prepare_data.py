"""Public data sets into our records: `python -m jobs.prepare_data --config jobs/configs/gpu/data_ultrafeedback.yaml`.

    source: ultrafeedback  -> preference shards, one pair per (instruction, aspect)
    source: math           -> problem shards (+ SFT demonstrations from the reference solutions)
"""

from __future__ import annotations

import json
from pathlib import Path

from jobs.common import start_job
from pipeline.config import PrepareDataConfig
from pipeline.data import write_records
from pipeline.data.converters import math_problems, math_sft, ultrafeedback_pairs
from pipeline.data.io import load_raw_rows


def main(argv: list[str] | None = None) -> dict:
    cfg = start_job(PrepareDataConfig, None, argv, "out_dir", with_ray=False)
    rows = load_raw_rows(cfg.dataset, cfg.split)[: cfg.limit]
    out = Path(cfg.out_dir)
    if cfg.source == "ultrafeedback":
        pairs, skipped = ultrafeedback_pairs(rows, cfg.aspects, cfg.min_margin, source=cfg.dataset)
        summary = {"pairs": len(pairs), "skipped": skipped, "path": write_records(pairs, out / "pairs-00000.parquet", "preference")}
    else:
        summary = {"problems": write_records(math_problems(rows, cfg.split, cfg.dataset), out / f"problems_{cfg.split}.parquet", "problem"),
                   "sft": write_records(math_sft(rows, cfg.split), out / f"sft_{cfg.split}.parquet", "sft"), "rows": len(rows)}
    print("prepare_data: " + json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
