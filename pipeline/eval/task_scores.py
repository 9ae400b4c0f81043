"""Score a policy on the held-out split of built-in task families, per objective."""

from __future__ import annotations

import math

from pipeline.objectives import build_objectives
from pipeline.engines.episodes import run_episodes
from pipeline.tasks import get_task


def std_error(xs: list[float]) -> float:
    """Standard error of the mean (sample std / sqrt(n)); NaN below two values."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def score_task(task_name: str, problems: list[dict], engine, *, judge_engine=None, extra_objectives=(),
               **sampling) -> dict:
    """{objective: {mean, n, se, unscored, positive_rate}} plus the episodes, for one family.
    `extra_objectives` (ObjectiveSpecs from config) are scored beside the family's own."""
    task = get_task(task_name)
    objectives = build_objectives([*task.objectives, *extra_objectives], engine=judge_engine or engine)
    users = {o.user.target if hasattr(o.user, "target") else id(o.user): o.user for o in objectives.values() if o.user}
    if len(users) > 1:
        raise ValueError(f"task {task_name}: its dialogue objectives name different simulated users")
    episodes = run_episodes(task, problems, engine, user=next(iter(users.values()), None), **sampling)
    summary = {}
    for name, obj in objectives.items():
        scores = obj.score_batch(episodes)
        for e, s in zip(episodes, scores):
            e.setdefault("scores", {})[name] = s
        ok = [s for s in scores if s is not None and not math.isnan(s)]
        summary[name] = {"mean": sum(ok) / len(ok) if ok else float("nan"), "n": len(ok), "se": std_error(ok),
                         "unscored": len(scores) - len(ok),
                         "positive_rate": sum(s >= obj.threshold for s in ok) / len(ok) if ok else float("nan"),
                         **({"judge": obj.scorer.stats.as_dict()} if hasattr(obj.scorer, "stats") else {})}
    return {"objectives": summary, "episodes": episodes}
