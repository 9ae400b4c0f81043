"""Built-in tasks, generated deterministically from a seed: the main job's embedded default.

One family per domain of the paper:
- math_word (math): accuracy (verifiable) + engagement (judged);
- assistant (open-ended prompts): thoroughness + concision (judged, in tension);
- tutoring (multi-turn, simulated student): accuracy + engagement (dialogue).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.data.io import write_records
from pipeline.objectives.registry import objective_id
from pipeline.tasks import assistant, math_word, tutoring


@dataclass(frozen=True)
class TaskFamily:
    name: str
    objectives: list[dict]  # ObjectiveSpec dicts (pipeline.objectives.registry)
    generate: Callable  # (n, seed, split, exclude) -> (problem records, SFT records)
    multi_turn: bool = False
    max_turns: int = 1  # policy turns per episode (multi-turn families)
    max_tokens: int = 256  # per policy turn
    done: Callable | None = None  # (dialogue, meta) -> True when a multi-turn episode is over

    @property
    def objective_names(self) -> list[str]:
        return [o["name"] for o in self.objectives]

    def objective_ids(self, shared=()) -> dict[str, str]:
        """{name: id} of the family's objectives (pipeline.objectives.registry.objective_id)."""
        return {n: objective_id(self.name, n, shared) for n in self.objective_names}


TASKS: dict[str, TaskFamily] = {
    "math_word": TaskFamily("math_word", math_word.OBJECTIVES, math_word.generate, max_tokens=320),
    "assistant": TaskFamily("assistant", assistant.OBJECTIVES, assistant.generate, max_tokens=160),
    "tutoring": TaskFamily("tutoring", tutoring.OBJECTIVES, tutoring.generate, multi_turn=True,
                           max_turns=tutoring.MAX_TURNS, max_tokens=96, done=tutoring.done),
}


def get_task(name: str) -> TaskFamily:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    return TASKS[name]


def check_shared(shared, extra: dict[str, list] | None = None) -> list[str]:
    """`shared_objectives` from a config, checked: each must be an objective name of some family
    (built-in, or an extra objective {task: [spec]}), so a typo is an error, not a silent split."""
    known = {n for t in TASKS.values() for n in t.objective_names}
    known |= {(o["name"] if isinstance(o, dict) else o.name) for specs in (extra or {}).values() for o in specs}
    if unknown := sorted(set(shared) - known):
        raise ValueError(f"shared_objectives: {unknown} is no task's objective; the tasks have {sorted(known)}")
    return list(shared)


def objective_ids(shared=(), tasks=None) -> dict[tuple[str, str], str]:
    """{(family, name): id} over the built-in families (or `tasks`)."""
    return {(t, n): i for t in (tasks or TASKS) for n, i in get_task(t).objective_ids(shared).items()}


def splits(task: str, n_train: int, n_eval: int, seed: int) -> dict[str, tuple[list[dict], list[dict]]]:
    """Train and held-out splits of one family, with no prompt in both."""
    fam = get_task(task)
    train = fam.generate(n_train, seed, "train")
    seen = {p["prompt"][-1]["content"] for p in train[0]}
    return {"train": train, "eval": fam.generate(n_eval, seed, "eval", exclude=seen)}


def write_builtin(out_dir: str | Path, n_train: int, n_eval: int, seed: int,
                  tasks: list[str] | None = None) -> dict[str, str]:
    """Write problems and SFT demonstrations of every family as Parquet; returns the paths.
    `problems_<split>` / `sft_<split>` hold all families together (column `task` tells them apart)."""
    out = Path(out_dir)
    rows: dict[str, list[dict]] = {}
    for task in tasks or list(TASKS):
        for split, (problems, sft) in splits(task, n_train, n_eval, seed).items():
            rows.setdefault(f"problems_{split}", []).extend(problems)
            rows.setdefault(f"sft_{split}", []).extend(sft)
    return {name: write_records(r, out / f"{name}.parquet", "problem" if name.startswith("problems") else "sft")
            for name, r in rows.items()}
