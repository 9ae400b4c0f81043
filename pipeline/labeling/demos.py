"""Demonstration trajectories for the PRM data: the built-in SFT demonstrations of every family.

SmolLM2-size policies rarely solve the built-in math problems (~1%) or cover a topic's
aspects, so labels of their own samples are almost all negative and a PRM learns only
"everything is bad". The demonstrations mix styles on purpose (engaging / terse / slip /
rambling math, thorough / concise / rambling answers, socratic / leaking / careless tutors),
so their prefixes fall on both sides of every objective; math demonstrations also get a
copy whose first computation is wrong, the error carried to the answer. Labels still
come from jobs.label_steps (MC with the completer, or the judge), never from here.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections import defaultdict

from pipeline.objectives.splitters import split_blank_lines, split_sentences
from pipeline.tasks.tutoring import student

log = logging.getLogger(__name__)


def corrupt(completion: str, meta: dict, rng: random.Random) -> str | None:
    """The demonstration with its first computation wrong and the error carried: "5 x 8 = 43",
    then "43 - 8 = 35" (each later step right given what came before), so the copy differs from
    the demonstration from its first computation on (no shared prefix with the opposite outcome)
    and its answer is wrong. None when the text does not show the solution's steps verbatim."""
    steps = meta.get("steps") or []
    if not steps:
        return None
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "x": lambda a, b: a * b}
    old = [int(v) for _, v in steps]
    new: list[int] = []
    text = completion
    for i, (expr, _) in enumerate(steps):
        a, op, b = expr.split(" ")
        carried = [str(new[old.index(int(x))]) if int(x) in old[:i] else x for x in (a, b)]
        value = ops[op](int(carried[0]), int(carried[1])) + (rng.choice([-3, -2, -1, 1, 2, 3, 10]) if i == 0 else 0)
        new.append(value)
        sym = "\\times" if op == "x" else op
        shown = lambda x, y, v: f"{x} {sym} {y} = {v}"  # noqa: E731
        if shown(a, b, old[i]) not in text:
            return None
        text = text.replace(shown(a, b, old[i]), shown(*carried, value), 1)
    boxed = "\\boxed{" + str(old[-1]) + "}"
    return text.replace(boxed, "\\boxed{" + str(new[-1]) + "}") if boxed in text else None


def _row(pid: str, tag: str, prompt: list[dict], steps: list[str], turns: list[dict] | None = None) -> dict:
    return {"id": f"{pid}-{tag}", "problem_id": pid, "prompt": prompt, "steps": steps, "final": steps[-1],
            "outcome": None, "policy": f"demonstration/{tag}", "turns": turns}


def _dialogue(problem: dict, turns: list[dict]) -> list[dict]:
    """The demonstration dialogue after the prompt: the tutor turns recorded in the SFT data, each
    followed by the simulated student's reply (replayed, so it is what the rollout would record)."""
    meta = json.loads(problem["meta"])
    dialogue = list(problem["prompt"])
    for t in turns:
        dialogue.append({"role": "assistant", "content": t["completion"]})
        dialogue.append({"role": "user", "content": student(dialogue, meta)})
    return dialogue[len(problem["prompt"]):]


def demo_trajectories(problems: list[dict], demos: list[dict], n: int, seed: int = 0) -> list[dict]:
    """Trajectory rows from up to n demonstrations per task family (math: each with a corrupted copy)."""
    by_id = {p["id"]: p for p in problems}
    per_problem: dict[str, list[dict]] = defaultdict(list)
    for d in demos:  # "<pid>-demo" (one completion) or "<pid>-demo-<j>" (tutor turn j)
        pid = re.sub(r"-demo(-\d+)?$", "", d["id"])
        if pid in by_id:
            per_problem[pid].append(d)
    rng = random.Random(seed)
    rows, taken, skipped = [], defaultdict(int), defaultdict(int)
    for pid, ds in per_problem.items():
        p = by_id[pid]
        if taken[p["task"]] >= n:
            continue
        taken[p["task"]] += 1
        if p["task"] == "math_word":
            wrong = corrupt(ds[0]["completion"], json.loads(p["meta"]), rng)
            for tag, text in (("demo", ds[0]["completion"]), ("corrupt", wrong)):
                st = split_blank_lines(text) if text else []
                if len(st) > 1:
                    rows.append(_row(pid, tag, p["prompt"], st))
                else:  # one step has no prefix to label; a style without verbatim steps has no corrupt copy
                    skipped[f"math_word/{tag}: " + ("single step" if text else "no verbatim steps to corrupt")] += 1
        elif p["task"] == "tutoring":
            ds = sorted(ds, key=lambda d: int(d["id"].rsplit("-", 1)[1]))
            turns = _dialogue(p, ds)
            rows.append(_row(pid, "demo", p["prompt"], [m["content"] for m in turns if m["role"] == "assistant"], turns))
        else:
            rows.append(_row(pid, "demo", p["prompt"], split_sentences(ds[0]["completion"]) or [ds[0]["completion"]]))
    if skipped:
        log.info("demonstration trajectories: %d made, not made: %s", len(rows), dict(skipped))
    return rows
