"""Score a policy on the held-out split of built-in task families, per objective."""

from __future__ import annotations

import json
import math

from pipeline.data.hashing import stable_digest
from pipeline.engines.episodes import run_episodes
from pipeline.eval.stats import mean_ci
from pipeline.objectives import build_objectives
from pipeline.tasks import get_task


def std_error(xs: list[float]) -> float:
    """Standard error of the mean (sample std / sqrt(n)); NaN below two values."""
    n = len(xs)
    if n < 2:
        return float("nan")
    m = sum(xs) / n
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def problem_id(problem: dict) -> str:
    """The id two evaluation rows are paired by: the problem's `id`, else a stable digest of its prompt."""
    if problem.get("id") not in (None, ""):
        return str(problem["id"])
    return stable_digest(json.dumps(problem["prompt"], sort_keys=True))


def per_problem(ids: list[str], scores: list[float | None]) -> tuple[list[str], list[float | None]]:
    """Scores of episodes (one or more samples per problem) as one score per problem, in first-seen order:
    the mean of the problem's scored samples, None when none is scored."""
    by: dict[str, list[float]] = {}
    for i, s in zip(ids, scores):
        got = by.setdefault(str(i), [])
        if s is not None and not math.isnan(s):
            got.append(float(s))
    return list(by), [sum(v) / len(v) if v else None for v in by.values()]


def summarise(ids: list[str], scores: list[float | None], threshold: float | None = None) -> dict:
    """{mean, n, se, ci_low, ci_high (95% percentile bootstrap over problems, pipeline.eval.stats),
    unscored, problem_ids, scores, positive_rate (when a threshold is given)} of one objective."""
    pids, per = per_problem(ids, scores)
    ok = [s for s in per if s is not None]
    ci = mean_ci(ok)
    out = {"mean": ci["mean"], "n": len(ok), "se": std_error(ok), "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
           "unscored": len(per) - len(ok), "problem_ids": pids, "scores": per}
    if threshold is not None:
        out["positive_rate"] = sum(s >= threshold for s in ok) / len(ok) if ok else float("nan")
    return out


def score_task(task_name: str, problems: list[dict], engine, *, judge_engine=None, extra_objectives=(),
               **sampling) -> dict:
    """{objective: summarise(...) (+ judge stats)} plus the episodes, for one family: per objective the mean,
    its 95% interval and the per-problem scores keyed by problem id, so two policies' rows can be paired.
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
        summary[name] = {**summarise([e["problem_id"] for e in episodes], scores, obj.threshold),
                         **({"judge": obj.scorer.stats.as_dict()} if hasattr(obj.scorer, "stats") else {})}
    return {"objectives": summary, "episodes": episodes}
