"""Math trajectories from the built-in demonstrations, each with a corrupted copy (one step's
result changed), for PRM data where the policy alone rarely succeeds (SmolLM2: ~1% on math).

    python scripts/demo_trajectories.py PROBLEMS.parquet SFT.parquet OUT_DIR [--n 64]

Labels come later from jobs.label_steps (MC with the same completer), never from here.
"""

from __future__ import annotations

import argparse
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def corrupt(steps: list[str], rng: random.Random) -> list[str] | None:
    """Change the result of the last computation ("= 40" -> "= 43") and the boxed answer with it,
    so the copy is wrong from that step on and its outcome is wrong."""
    idx = [i for i, s in enumerate(steps) if re.search(r"= \$?(\d+)", s)]
    if not idx:
        return None
    i = idx[-1]
    m = list(re.finditer(r"= \$?(\d+)", steps[i]))[-1]
    right, wrong = m.group(1), str(int(m.group(1)) + rng.choice([-3, -2, -1, 1, 2, 3, 10]))
    out = list(steps)
    out[i] = steps[i][: m.start(1)] + wrong + steps[i][m.end(1):]
    out = out[: i + 1] + [s.replace("{" + right + "}", "{" + wrong + "}") for s in out[i + 1:]]
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("problems")
    ap.add_argument("sft")
    ap.add_argument("out_dir")
    ap.add_argument("--n", type=int, default=64)
    args = ap.parse_args()
    from pipeline.data import read_records, write_records
    from pipeline.objectives.splitters import split_blank_lines

    problems = {p["id"]: p for p in read_records([args.problems], "problem")[0].to_pylist()}
    demos = [d for d in read_records([args.sft], "sft")[0].to_pylist()
             if d["id"].removesuffix("-demo") in problems and d["id"].startswith("math_word")][: args.n]
    rng = random.Random(0)
    rows = []
    for d in demos:
        pid = d["id"].removesuffix("-demo")
        steps = split_blank_lines(d["completion"])
        variants = [("demo", steps), ("corrupt", corrupt(steps, rng))]
        for tag, st in variants:
            if st and len(st) > 1:
                rows.append({"id": f"{pid}-{tag}", "problem_id": pid, "prompt": problems[pid]["prompt"], "steps": st,
                             "final": st[-1], "outcome": None, "policy": f"demonstration/{tag}", "turns": None})
    path = write_records(rows, Path(args.out_dir) / "trajectories-00000.parquet", "trajectory")
    print(f"{len(rows)} trajectories -> {path}")


if __name__ == "__main__":
    main()
