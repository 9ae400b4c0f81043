"""Episodes of a task family with a policy engine: one completion per prompt for
single-turn families; for dialogue families, policy and simulated user take turns
until the family says the episode is done or `max_turns` is reached."""

from __future__ import annotations

import json

from pipeline.data.hashing import stable_seed
from pipeline.tasks import TaskFamily


def run_episodes(task: TaskFamily, problems: list[dict], engine, *, user=None, n: int = 1, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = -1, seed: int | None = 0, max_tokens: int | None = None,
                 max_turns: int | None = None) -> list[dict]:
    """-> [{problem_id, task, sample, prompt, response, reference, meta}]; `response` is the text
    (single-turn) or the messages after the prompt (dialogue). `max_turns` (default: the family's) caps the
    policy turns, e.g. when the prompt already holds some."""
    sampling = {"max_tokens": max_tokens or task.max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
    metas = [json.loads(p["meta"]) if isinstance(p["meta"], str) else p["meta"] for p in problems]
    # One seed per request, so a problem's samples do not depend on the batch it landed in.
    seeds = lambda ids, turn: None if seed is None else [stable_seed(seed, i, turn) for i in ids]  # noqa: E731
    if not task.multi_turn:
        outs = engine.generate([p["prompt"] for p in problems], n=n, seeds=seeds([p["id"] for p in problems], 0), **sampling)
        return [{"problem_id": p["id"], "task": task.name, "sample": k, "prompt": p["prompt"], "response": text,
                 "reference": p["reference"], "meta": m}
                for p, m, samples in zip(problems, metas, outs) for k, text in enumerate(samples)]
    if user is None:
        raise ValueError(f"task {task.name} is multi-turn: pass the simulated user")
    eps = [{"problem_id": p["id"], "task": task.name, "sample": k, "prompt": p["prompt"], "dialogue": list(p["prompt"]),
            "reference": p["reference"], "meta": m} for p, m in zip(problems, metas) for k in range(n)]
    for turn in range(task.max_turns if max_turns is None else max_turns):
        active = [e for e in eps if not (task.done and task.done(e["dialogue"], e["meta"]))]
        if not active:
            break
        outs = engine.generate([e["dialogue"] for e in active], n=1,
                               seeds=seeds([f"{e['problem_id']}#{e['sample']}" for e in active], turn), **sampling)
        for e, samples in zip(active, outs):
            e["dialogue"].append({"role": "assistant", "content": samples[0].strip()})
        for e, reply in zip(active, user.reply_batch([e["dialogue"] for e in active], [e["meta"] for e in active])):
            e["dialogue"].append({"role": "user", "content": reply})
    for e in eps:
        e["response"] = e.pop("dialogue")[len(e["prompt"]):]
    return eps
