"""Math trajectories from the built-in demonstrations, each with a corrupted copy.

SmolLM2-size policies rarely solve the built-in math problems (~1%), so MC labels of
their own samples are almost all 0 and a PRM cannot learn what a good step is from
them. Demonstrations and copies whose last computation is wrong (and the answer with
it) give MC labelling prefixes on both sides. Labels still come from jobs.label_steps
(MC with the completer), never from here.
"""

from __future__ import annotations

import random
import re

from pipeline.objectives.splitters import split_blank_lines


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



def demo_trajectories(problems: list[dict], demos: list[dict], n: int, seed: int = 0) -> list[dict]:
    """Trajectory rows: up to n math demonstrations and their corrupted copies."""
    by_id = {p["id"]: p for p in problems}
    demos = [d for d in demos if d["id"].removesuffix("-demo") in by_id and d["id"].startswith("math_word")][:n]
    rng = random.Random(seed)
    rows = []
    for d in demos:
        pid = d["id"].removesuffix("-demo")
        steps = split_blank_lines(d["completion"])
        for tag, st in (("demo", steps), ("corrupt", corrupt(steps, rng))):
            if st and len(st) > 1:
                rows.append({"id": f"{pid}-{tag}", "problem_id": pid, "prompt": by_id[pid]["prompt"], "steps": st,
                             "final": st[-1], "outcome": None, "policy": f"demonstration/{tag}", "turns": None})
    return rows
