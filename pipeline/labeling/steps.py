"""Step labels for a batch of trajectories of one task, one objective at a time.

    mc (verifiable)          k continuations from every step prefix, the verifier on each:
                             r_t = successes / k; r_n = z (the trajectory's own outcome);
                             target_t = r_t + gamma^(n-t) * z, divided by 1 + gamma^(n-t)
                             when normalised (so targets stay in [0, 1]); optional hard label
                             (any success / strict majority).
    judge_mc (judged)        k continuations from every prefix, the judge on each; hard label =
                             strict majority of positive verdicts (the last step: the judge on
                             the full response).
    judge_prefix             the paper's Case B (rollouts too costly): the judge rates each prefix
                             itself, no continuations; hard label = score >= threshold. A dialogue's
                             prefix runs up to a policy turn and the simulated user's reply to it;
                             a single-turn response's prefix is its first t steps.
    dialogue_prefix          the same, by its older name (the default for dialogue objectives).
    outcome                  one score for the whole response on the last step, every other
                             step unlabelled (null): the data of a Bradley-Terry outcome model.

Continuations of all prefixes of the batch go to the engine together (prefix caching
shares the prompt); each prefix has its own seed, so labels do not depend on batching.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import MCConfig
from pipeline.data.hashing import stable_seed

DEFAULT_METHOD = {"verifiable": "mc", "judged": "judge_mc", "dialogue": "dialogue_prefix"}


@dataclass
class Labelled:
    labels: list[float | None]
    label_kind: str
    rollouts_per_step: int
    unparseable: int = 0


def _decided(succ: int, fail: int, k: int, rule: str) -> bool:
    if rule == "any":
        return succ > 0
    return succ > k / 2 or fail >= k - k // 2  # strict majority: settled either way


def mc_votes(engine, objective, trajs: list[dict], mc: MCConfig, sampling: dict, rule: str | None) -> tuple[dict, int]:
    """{(traj index, t): (successes, samples)} for every prefix t < n (steps 1..t kept),
    and the number of judge outputs that could not be parsed (not counted as votes)."""
    prefixes = []
    for i, tr in enumerate(trajs):
        head = engine.render(tr["prompt"]) if hasattr(engine, "render") else ""
        for t in range(1, len(tr["steps"])):
            body = objective.joiner.join(tr["steps"][:t]) + objective.joiner
            prefixes.append((i, t, head + body, body))
    votes = {(i, t): [0, 0] for i, t, _, _ in prefixes}
    remaining = {(i, t): mc.k for i, t, _, _ in prefixes}
    step = mc.round_size or mc.k
    unparseable, rnd = 0, 0
    while True:
        active = [p for p in prefixes if remaining[(p[0], p[1])] > 0]
        if not active:
            break
        n = min(step, mc.k)
        outs = engine.complete([p[2] for p in active], n=n,
                               seeds=[stable_seed(sampling.get("seed", 0), trajs[i]["id"], t, rnd) for i, t, _, _ in active],
                               **{k: v for k, v in sampling.items() if k != "seed"})
        items, keys = [], []
        for (i, t, _, body), conts in zip(active, outs):
            for c in conts[: remaining[(i, t)]]:
                tr = trajs[i]
                items.append({"prompt": tr["prompt"], "response": body + c, "reference": tr["reference"], "meta": tr["meta"]})
                keys.append((i, t))
        for key, s in zip(keys, objective.score_batch(items)):
            if s is None:
                unparseable += 1
            else:
                votes[key][0] += s >= objective.threshold
                votes[key][1] += 1
        for i, t, _, _ in active:
            remaining[(i, t)] = max(0, remaining[(i, t)] - n)
            s, total = votes[(i, t)]
            if rule and mc.early_stop and _decided(s, total - s, mc.k, rule):
                remaining[(i, t)] = 0
        rnd += 1
    return {k: tuple(v) for k, v in votes.items()}, unparseable


def _full_scores(objective, trajs, which: list[bool] | None = None) -> list[float | None]:
    """The objective's score of each whole response (None where `which` says skip)."""
    idx = [i for i in range(len(trajs)) if which is None or which[i]]
    scores = objective.score_batch([{"prompt": trajs[i]["prompt"], "response": objective.joiner.join(trajs[i]["steps"]),
                                     "reference": trajs[i]["reference"], "meta": trajs[i]["meta"]} for i in idx]) if idx else []
    out: list[float | None] = [None] * len(trajs)
    for i, v in zip(idx, scores):
        out[i] = v
    return out


def label_mc(engine, objective, trajs, mc: MCConfig, sampling) -> list[Labelled]:
    rule = None if mc.hard_label == "none" else mc.hard_label
    votes, bad = mc_votes(engine, objective, trajs, mc, sampling, rule)
    # z: the rollout's recorded outcome; the verifier runs only where none was recorded.
    finals = _full_scores(objective, trajs, [tr["outcome"] is None for tr in trajs])
    out = []
    for i, (tr, zf) in enumerate(zip(trajs, finals)):
        z = tr["outcome"] if tr["outcome"] is not None else zf
        n = len(tr["steps"])
        labels = []
        for t in range(1, n + 1):
            s, total = votes.get((i, t), (None, None)) if t < n else (z, 1)
            if s is None or total == 0 or z is None:
                labels.append(None)  # nothing usable sampled: masked, never read as 0
                continue
            r = s / total
            if rule:
                labels.append(float(r > 0 if rule == "any" else r > 0.5))
                continue
            w = mc.gamma ** (n - t)
            labels.append((r + w * z) / (1 + w) if mc.normalize else r + w * z)
        out.append(Labelled(labels, "hard" if rule else "soft", mc.k, bad if i == 0 else 0))
    return out


def label_judge_mc(engine, objective, trajs, mc: MCConfig, sampling) -> list[Labelled]:
    votes, bad = mc_votes(engine, objective, trajs, mc, sampling, "majority")
    finals = _full_scores(objective, trajs)
    out = []
    for i, (tr, zf) in enumerate(zip(trajs, finals)):
        n = len(tr["steps"])
        labels = []
        for t in range(1, n + 1):
            if t == n:
                labels.append(None if zf is None else float(zf >= objective.threshold))
            else:
                s, total = votes[(i, t)]
                labels.append(float(s / total > 0.5) if total else None)
        out.append(Labelled(labels, "hard", mc.k, (bad if i == 0 else 0) + (zf is None)))
    return out


def label_prefix(objective, trajs) -> list[Labelled]:
    items, owners = [], []
    for i, tr in enumerate(trajs):
        if tr["turns"]:  # dialogue: up to each policy turn and the user's reply to it
            turns = tr["turns"]
            for j in (j for j, m in enumerate(turns) if m["role"] == "assistant"):
                cut = j + 2 if j + 1 < len(turns) and turns[j + 1]["role"] == "user" else j + 1
                items.append({"prompt": tr["prompt"], "response": turns[:cut], "reference": tr["reference"], "meta": tr["meta"]})
                owners.append(i)
        else:
            for t in range(1, len(tr["steps"]) + 1):
                items.append({"prompt": tr["prompt"], "response": objective.joiner.join(tr["steps"][:t]),
                              "reference": tr["reference"], "meta": tr["meta"]})
                owners.append(i)
    scores = objective.score_batch(items) if items else []
    per: dict[int, list] = {i: [] for i in range(len(trajs))}
    for i, s in zip(owners, scores):
        per[i].append(None if s is None else float(s >= objective.threshold))
    out = []
    for i, tr in enumerate(trajs):
        labels = per[i][: len(tr["steps"])] + [None] * (len(tr["steps"]) - len(per[i]))
        out.append(Labelled(labels, "hard", 0, sum(x is None for x in per[i])))
    return out


def label_outcome(objective, trajs) -> list[Labelled]:
    items = [{"prompt": tr["prompt"], "response": tr["turns"] if tr["turns"] else objective.joiner.join(tr["steps"]),
              "reference": tr["reference"], "meta": tr["meta"]} for tr in trajs]
    out = []
    for tr, s in zip(trajs, objective.score_batch(items)):
        out.append(Labelled([None] * (len(tr["steps"]) - 1) + [None if s is None else float(s)], "soft", 0, int(s is None)))
    return out


def label_objective(method: str, engine, objective, trajs, mc: MCConfig, sampling: dict) -> list[Labelled]:
    if method == "mc":
        return label_mc(engine, objective, trajs, mc, sampling)
    if method == "judge_mc":
        return label_judge_mc(engine, objective, trajs, mc, sampling)
    if method in ("judge_prefix", "dialogue_prefix"):
        return label_prefix(objective, trajs)
    if method == "outcome":
        return label_outcome(objective, trajs)
    raise ValueError(f"unknown labelling method {method!r}")
