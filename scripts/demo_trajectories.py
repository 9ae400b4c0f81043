"""Write math demonstration trajectories and corrupted copies (pipeline.labeling.demos) as a trajectory shard.

    python scripts/demo_trajectories.py PROBLEMS.parquet SFT.parquet OUT_DIR [--n 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems")
    ap.add_argument("sft")
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    from pipeline.data import read_records, write_records
    from pipeline.labeling.demos import demo_trajectories

    rows = demo_trajectories(read_records([args.problems], "problem")[0].to_pylist(),
                             read_records([args.sft], "sft")[0].to_pylist(), args.n)
    path = write_records(rows, Path(args.out_dir) / "trajectories-00000.parquet", "trajectory")
    print(f"{len(rows)} trajectories -> {path}")


if __name__ == "__main__":
    main()
