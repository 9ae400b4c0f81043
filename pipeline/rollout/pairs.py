"""Preference pairs per objective: N candidates per prompt, scored, best against worst.

    candidates  the rollout engine samples n_candidates responses per problem (one
                assistant turn; for dialogue tasks, the tutor's next turn), split
                into steps by the task's splitter;
    scores      the vectorized PRM scores every step of every candidate in one pass
                per candidate, as rewards on its common [0, 1] scale (VectorPRM.rewards:
                each objective's kind through its own link, so margins and MODPO's
                cross-objective margins compare like with like); per objective, step
                rewards become a response score (`last`, `mean` or `min`); objectives in `score_with_objective` use
                the task's own verifier or judge instead;
    pairs       per problem and objective: the best candidate against the worst,
                kept when the score margin reaches `min_margin`.
Existing per-objective preference data (TRL formats) joins as it is. Then the
SFT model's log-probs are added (pipeline.models.ref_logps) unless disabled.

Output: `<out_dir>/pairs-00000.parquet` (preference schema), `_ref_logps.json`, `_summary.json`;
`_candidates.parquet` keeps the scored candidates, so a rerun skips generation.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import progress
from pipeline.data.hashing import stable_seed

log = logging.getLogger(__name__)

CANDIDATE_SCHEMA = pa.schema([
    pa.field("problem_id", pa.string()), pa.field("task", pa.string()), pa.field("prompt", pa.string()),
    pa.field("candidate", pa.int32()), pa.field("response", pa.string()), pa.field("steps", pa.list_(pa.string())),
    # dialogue families whose objectives a judge pairs: the messages after the prompt (JSON), the candidate
    # turn continued by the same policy and the simulated user to the episode's end; else null
    pa.field("dialogue", pa.string()),
])


def candidates_batch(engine, batch: pa.Table, *, n: int, sampling: dict, continue_tasks: tuple = ()) -> pa.Table:
    """One row per (problem, candidate); prompts stay JSON so dialogues of any shape fit one column.
    Candidates of the dialogue families in `continue_tasks` are also played out (`continue_dialogues`)."""
    from pipeline.rollout.trajectories import family_parts

    rows = batch.to_pylist()
    out = []
    by_task = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    for task_name, probs in by_task.items():
        task, _, split_obj, user, _ = family_parts(task_name)
        kw = {**sampling, "max_tokens": sampling.get("max_tokens") or task.max_tokens}
        seed = kw.pop("seed", 0)
        outs = engine.generate([p["prompt"] for p in probs], n=n, seeds=[stable_seed(seed, p["id"], "pairs") for p in probs], **kw)
        rows_t = [{"problem_id": p["id"], "task": task_name, "prompt": json.dumps(p["prompt"]), "candidate": k,
                   "response": t, "steps": [t] if task.multi_turn else (split_obj.split(t) or [t]), "dialogue": None}
                  for p, samples in zip(probs, outs) for k, t in enumerate(s.strip() for s in samples)]
        if task.multi_turn and task_name in continue_tasks:
            by_id = {p["id"]: p for p in probs}
            for c, d in zip(rows_t, continue_dialogues(task, user, engine, [by_id[c["problem_id"]] for c in rows_t],
                                                       [c["response"] for c in rows_t], sampling=kw, seed=seed,
                                                       keys=[f"{c['problem_id']}#c{c['candidate']}" for c in rows_t])):
                c["dialogue"] = json.dumps(d)
        out += rows_t
    return pa.Table.from_pylist(out, schema=CANDIDATE_SCHEMA)


def continue_dialogues(task, user, engine, problems: list[dict], turns: list[str], *, sampling: dict, seed: int,
                       keys: list[str]) -> list[list[dict]]:
    """Each candidate tutor turn played out to the episode's end: the simulated user replies, then the same
    policy and the user take turns (the family's `done`, at most `max_turns` policy turns in all). -> the
    messages after the prompt, starting with the candidate. A dialogue judge scores these: one Monte Carlo
    sample of the turn's value under the policy, as MC step labelling values a step by its continuations
    (a turn alone cannot be judged: the judges read the student's replies). `keys` name the candidates
    for their seeds, so a dialogue does not depend on its batch."""
    from pipeline.engines.episodes import run_episodes

    metas = [json.loads(p["meta"]) if isinstance(p["meta"], str) else p["meta"] for p in problems]
    dialogues = [list(p["prompt"]) + [{"role": "assistant", "content": t}] for p, t in zip(problems, turns)]
    for d, reply in zip(dialogues, user.reply_batch(dialogues, metas)):
        d.append({"role": "user", "content": reply})
    # run_episodes skips the dialogues already done and plays the rest for the turns left
    eps = run_episodes(task, [{**p, "id": k, "prompt": d} for p, k, d in zip(problems, keys, dialogues)], engine,
                       user=user, seed=seed, max_turns=task.max_turns - 1,
                       **{k: v for k, v in sampling.items() if k in ("temperature", "top_p", "top_k", "max_tokens")})
    return [d[len(p["prompt"]):] + e["response"] for d, p, e in zip(dialogues, problems, eps)]


def aggregate(step_scores: list[float], how: str) -> float:
    x = np.asarray([s for s in step_scores if s == s], dtype=np.float64)  # NaN: a step cut by truncation
    if len(x) == 0:
        return float("nan")
    return float({"last": x[-1], "mean": x.mean(), "min": x.min()}[how])


def prm_response_scores(cands: list[dict], j: int, how: str, source) -> list[float]:
    """Response scores of PRM objective j from the candidates' `step_rewards` (PRMScorer: the common
    [0, 1] scale). A reward outside it means the candidates were scored in raw PRM units (a file
    cached by an older PRMScorer): refused, since its margins would mix logits with values."""
    for c in cands:
        if any(not 0.0 <= s[j] <= 1.0 for s in c["step_rewards"] if s[j] == s[j]):
            raise ValueError(f"{source}: candidate {c['problem_id']}/{c['candidate']} has step rewards "
                             f"{[s[j] for s in c['step_rewards']]} outside [0, 1] (raw PRM outputs from an older "
                             "PRMScorer); delete the file to score the candidates again")
    return [aggregate([s[j] for s in c["step_rewards"]], how) for c in cands]


def select_pairs(cands: list[dict], scores: dict[str, list[float]], objectives_of_task: dict[str, list[str]],
                 min_margin: float) -> tuple[list[dict], dict]:
    """Best vs worst per (problem, objective) with margin >= min_margin; also counts of what was skipped."""
    groups = defaultdict(list)
    for i, c in enumerate(cands):
        groups[c["problem_id"]].append(i)
    pairs, skipped = [], defaultdict(int)
    for pid, idx in groups.items():
        task = cands[idx[0]]["task"]
        for o in objectives_of_task[task]:
            sc = [(scores[o][i], i) for i in idx if scores[o][i] == scores[o][i]]
            if len(sc) < 2:
                skipped[f"{o}/unscored"] += 1
                continue
            (hi, b), (lo, w) = max(sc), min(sc)
            if hi - lo < min_margin or cands[b]["response"] == cands[w]["response"]:
                skipped[f"{o}/margin"] += 1
                continue
            both = [{"objective": o2, "chosen": scores[o2][b], "rejected": scores[o2][w]}
                    for o2 in objectives_of_task[task] if scores[o2][b] == scores[o2][b] and scores[o2][w] == scores[o2][w]]
            pairs.append({"id": f"{pid}-{o}", "prompt": json.loads(cands[b]["prompt"]), "chosen": cands[b]["response"],
                          "rejected": cands[w]["response"], "objective": o, "chosen_score": hi, "rejected_score": lo,
                          "scores": both, "ref_chosen_logp": None, "ref_rejected_logp": None})
    return pairs, dict(skipped)


def prm_pairs_vs_judge(cands: list[dict], prm_scores: dict[str, list[float]], judged: dict[str, list[float]],
                       objectives_of_task: dict[str, list[str]], min_margin: float) -> dict[str, dict[str, int]]:
    """For objectives paired by their verifier / judge: the pairs the PRM would have chosen from the same
    candidates, as that verifier / judge sees them (agree / tie / disagree), so the PRM's pair quality is
    measured even where it does not pick the training pairs. Keyed by objective id."""
    only = {t: [o for o in os_ if o in judged and o in prm_scores] for t, os_ in objectives_of_task.items()}
    would, _ = select_pairs(cands, prm_scores, only, min_margin)
    index = {(c["problem_id"], c["response"]): i for i, c in enumerate(cands)}
    out: dict[str, dict[str, int]] = {}
    for p in would:
        o, pid = p["objective"], p["id"][: -len(p["objective"]) - 1]
        c, r = judged[o][index[(pid, p["chosen"])]], judged[o][index[(pid, p["rejected"])]]
        verdict = "unscored" if c != c or r != r else "agree" if c > r else "tie" if c == r else "disagree"
        got = out.setdefault(o, {})
        got[verdict] = got.get(verdict, 0) + 1
    return dict(sorted(out.items()))


def score_with_objectives(cands: list[dict], problems: dict[str, dict], names: list[str],
                          shared=()) -> dict[str, list[float]]:
    """Scores from the tasks' own verifiers / judges (for objectives in score_with_objective), by objective id.
    A dialogue candidate is judged on its played-out `dialogue` where it has one, else on its turn alone."""
    from pipeline.tasks import get_task
    from pipeline.objectives import build_objectives

    out = {n: [float("nan")] * len(cands) for n in names}
    by_task = defaultdict(list)
    for i, c in enumerate(cands):
        by_task[c["task"]].append(i)
    for task_name, idx in by_task.items():
        task = get_task(task_name)
        objs = build_objectives(task.objectives)
        for name, n in task.objective_ids(shared).items():
            if n not in out:
                continue
            items = []
            for i in idx:
                p = problems[cands[i]["problem_id"]]
                meta = json.loads(p["meta"]) if isinstance(p["meta"], str) else p["meta"]
                resp = ((json.loads(cands[i]["dialogue"]) if cands[i].get("dialogue") else
                         [{"role": "assistant", "content": cands[i]["response"]}]) if task.multi_turn else cands[i]["response"])
                items.append({"prompt": p["prompt"], "response": resp, "reference": p["reference"], "meta": meta})
            for i, s in zip(idx, objs[name].score_batch(items)):
                out[n][i] = float("nan") if s is None else float(s)
    return out


def pair_agreement(pairs: list[dict], problems: dict[str, dict], shared=(),
                   dialogues: dict[tuple[str, str], str] | None = None) -> dict[str, dict[str, int]]:
    """Per task/objective, how the task's own verifier or judge sees the pairs the PRM chose:
    chosen scored higher (agree), equal (tie), lower (disagree), or not scorable. A check of
    the PRM's pairs against the ground truth they stand in for. `dialogues` ((problem id, turn) -> the
    played-out dialogue's JSON, from build_pairs' candidates) lets a dialogue judge see the student's replies."""
    from collections import Counter

    items, tasks = [], []
    for p in pairs:
        if not p["id"].endswith(f"-{p['objective']}"):
            raise ValueError(f"pair {p['id']!r}: not '<problem id>-<objective id>' (objective {p['objective']!r})")
        pid = p["id"][: -len(p["objective"]) - 1]  # cut by length: objective ids hold '/' and '-'
        task = problems[pid]["task"]
        tasks.append(task)
        items += [{"problem_id": pid, "task": task, "response": p[k], "dialogue": (dialogues or {}).get((pid, p[k]))}
                  for k in ("chosen", "rejected")]
    scores = score_with_objectives(items, problems, sorted({p["objective"] for p in pairs}), shared) if pairs else {}
    out: dict[str, Counter] = defaultdict(Counter)
    for k, (p, task) in enumerate(zip(pairs, tasks)):
        c, r = scores[p["objective"]][2 * k], scores[p["objective"]][2 * k + 1]
        verdict = "unscored" if c != c or r != r else "agree" if c > r else "tie" if c == r else "disagree"
        out[f"{task}/{p['objective'].rsplit('/', 1)[-1]}"][verdict] += 1  # the family's own name
    return {k: dict(v) for k, v in sorted(out.items())}


def run_build_pairs(cfg) -> dict:
    import ray

    from pipeline.data.io import read_records, write_records
    from pipeline.models.prm import PRMScorer
    from pipeline.models.registry import resolve_model
    from pipeline.engines.pool import map_with_engine
    from pipeline.objectives import resolve_keys, resolve_objective
    from pipeline.tasks import check_shared, get_task
    from pipeline.models.ref_logps import RefLogps, write_meta

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(cfg.model.name_or_path)
    summary: dict = {}
    pairs: list[dict] = []
    if cfg.problems:
        problems_t, _ = read_records(cfg.problems, "problem")
        problems = {p["id"]: p for p in problems_t.to_pylist()}
        cand_file = out / "_candidates.parquet"
        shared = check_shared(cfg.shared_objectives)
        objectives_of_task = {t: list(get_task(t).objective_ids(shared).values())
                              for t in set(problems_t.column("task").to_pylist())}
        names = sorted({o for os_ in objectives_of_task.values() for o in os_})
        by_verifier = [resolve_objective(n, names, "score_with_objective entry") for n in cfg.score_with_objective]
        # dialogue families with a judge-paired objective: their candidate turns are played out to be judged
        continue_tasks = tuple(sorted(t for t, os_ in objectives_of_task.items()
                                      if get_task(t).multi_turn and set(os_) & set(by_verifier)))
        if cand_file.exists():
            cands_t = pq.read_table(cand_file)
            log.info("build_pairs: %d candidates from %s (delete it to sample again)", cands_t.num_rows, cand_file)
            if continue_tasks and ("dialogue" not in cands_t.column_names or any(
                    c["task"] in continue_tasks and not c["dialogue"] for c in cands_t.select(["task", "dialogue"]).to_pylist())):
                raise ValueError(f"{cand_file}: candidates of {list(continue_tasks)} were not played out as dialogues, "
                                 f"which score_with_objective {cfg.score_with_objective} needs; delete the file to sample again")
        else:
            ds = map_with_engine(ray.data.from_arrow(problems_t), cfg.engine, model_dir, candidates_batch,
                                 n=cfg.n_candidates, sampling=cfg.sampling.model_dump(), continue_tasks=continue_tasks)
            cands_t = pa.concat_tables(list(progress.tracked(ds.iter_batches(batch_size=None, batch_format="pyarrow"),
                                                             "candidates", problems_t.num_rows * cfg.n_candidates)))
            if cfg.prm:
                cands_t = pa.concat_tables(list(progress.tracked(ray.data.from_arrow(cands_t).map_batches(
                    PRMScorer, fn_constructor_kwargs={"prm_dir": str(Path(cfg.prm).resolve())}, batch_format="pyarrow", batch_size=16,
                    concurrency=1, num_cpus=cfg.ref_num_cpus, num_gpus=cfg.ref_num_gpus or None).iter_batches(batch_size=None, batch_format="pyarrow"),
                    "candidates scored", cands_t.num_rows)))
            tmp = cand_file.with_suffix(".tmp")
            pq.write_table(cands_t, tmp)
            tmp.replace(cand_file)
        cands = cands_t.to_pylist()
        how_of = resolve_keys(cfg.aggregate_per_objective, names, "aggregate_per_objective key")
        scores = {}
        prm_scores: dict[str, list[float]] = {}  # every objective the PRM scores, also those paired by a judge
        prm_objs: list[str] = []
        if cfg.prm:
            prm_objs = json.loads((Path(cfg.prm) / "prm_config.json").read_text())["objectives"]
        missing = [n for n in names if n not in prm_objs and n not in by_verifier]
        if missing:
            raise ValueError(f"objective(s) {missing} have no scorer: the PRM ({cfg.prm}) has {prm_objs}; "
                             "add them to score_with_objective or train the PRM on them")
        for n in names:
            if n in prm_objs:
                prm_scores[n] = prm_response_scores(cands, prm_objs.index(n), how_of.get(n, cfg.aggregate), cand_file)
            if n not in by_verifier:
                scores[n] = prm_scores[n]
        judged = score_with_objectives(cands, problems, by_verifier, shared)
        scores.update(judged)
        made, skipped = select_pairs(cands, scores, objectives_of_task, cfg.min_margin)
        pairs += made
        summary.update({"candidates": len(cands), "pairs_from_candidates": len(made), "skipped": skipped})
        if judged and prm_scores:
            summary["prm_pairs_vs_judge"] = prm_pairs_vs_judge(cands, prm_scores, judged, objectives_of_task, cfg.min_margin)
    for objective, data in cfg.preferences.items():
        t, _ = read_records(data.paths, "preference", defaults={"objective": objective, **data.defaults},
                            skip_bad_rows=data.skip_bad_rows, quarantine_dir=data.quarantine_dir, split=data.split)
        pairs += t.to_pylist()
        summary[f"pairs_from_data/{objective}"] = t.num_rows
    if not pairs:
        raise ValueError("no pairs: give problems (with a prm) or preferences, and check min_margin")
    table = pa.Table.from_pylist(pairs)
    if cfg.ref_logps:
        table = pa.concat_tables(list(progress.tracked(ray.data.from_arrow(table).map_batches(
            RefLogps, fn_constructor_kwargs={"model_dir": model_dir, "max_length": cfg.dpo.max_length,
                                             "max_prompt_length": cfg.dpo.max_prompt_length, "dtype": cfg.dpo.ref_dtype,
                                             "micro_batch_size": cfg.ref_batch_size},
            batch_format="pyarrow", batch_size=64, concurrency=1, num_cpus=cfg.ref_num_cpus,
            num_gpus=cfg.ref_num_gpus or None).iter_batches(batch_size=None, batch_format="pyarrow"),
            "reference log-probs", table.num_rows)))
    path = write_records(table, out / "pairs-00000.parquet", "preference")
    if cfg.ref_logps:
        write_meta(out, model_dir, cfg.dpo.max_length, cfg.dpo.max_prompt_length, cfg.dpo.ref_dtype)
        # pairs whose prompt cannot fit whole turns (refused by the tokenisation: no reference log-probs);
        # jobs.fit_policy refuses them again and writes the count beside its model
        refused = table.column("ref_chosen_logp").null_count
        summary["refused_too_long"] = refused
        if refused:
            log.warning("build_pairs: %d of %d pairs refused as too long for dpo.max_length / max_prompt_length",
                        refused, table.num_rows)
    per_obj = defaultdict(int)
    for p in pairs:
        per_obj[p["objective"]] += 1
    summary.update({"pairs": len(pairs), "per_objective": dict(per_obj), "path": str(path)})
    (out / "_summary.json").write_text(json.dumps(summary, indent=1))
    return summary
