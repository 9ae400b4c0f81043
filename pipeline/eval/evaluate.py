"""Per-objective evaluation of policies, weight vectors and decoding modes on held-out built-in tasks.

Every policy is turned into one ordinary checkpoint per weight vector
(`MultiHeadPolicy.export_merged`: the merged head equals the logit mix), so one vLLM
engine serves them all, swapping weights in place (`reload_weights`, no restart):
  hf       a Hugging Face causal LM (base, SFT): one head, weight [1];
  multihead a MAH-DPO or single-head DPO checkpoint, for each weight vector of the sweep;
  soup     per-objective single-head DPO models, parameters averaged with the weights.
Guided decoding (the PRM picks each step among K candidates) runs on `guided_problems` problems per
task: by default as a batched step search on the same engine, the policy merged at equal weights
(pipeline.decoding.guided_search); with `backend: transformers`, in process on the multi-head policy,
one problem at a time (pipeline.decoding.guided, the reference).

Rows: {policy, weights (JSON, over the task's objective ids), decoding, task, objective (its id:
`<family>/<name>`, or the bare name when shared), mean, n, se, ci_low, ci_high (95% percentile bootstrap
over problems), problem_ids, scores (per problem, aligned with problem_ids; None = unscored)}: two rows of
one task can be paired problem by problem (pipeline.eval.stats). A task's weights name only its own ids.
The responses go to `<work_dir>/responses.parquet`, one row per (policy, weights, decoding, task,
problem_id): prompt (JSON), response (the final text; a dialogue's messages after the prompt as JSON),
scores (JSON {objective id: score}).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from pipeline import progress
from pipeline.eval.task_scores import problem_id, summarise

RESPONSE_COLUMNS = ("policy", "weights", "decoding", "task", "problem_id", "prompt", "response", "scores")

log = logging.getLogger(__name__)


def sweep(objectives: list[str], points: int) -> list[dict[str, float]]:
    """Weight vectors over two objectives from all on the first to all on the second (`points` of them);
    for more objectives: the corners and the centre."""
    if len(objectives) == 2:
        return [{objectives[0]: round(1 - t, 4), objectives[1]: round(t, 4)} for t in np.linspace(0, 1, points)]
    corners = [{o: float(o == p) for o in objectives} for p in objectives]
    return corners + [{o: 1 / len(objectives) for o in objectives}]


def task_objectives(task_name: str, shared=()) -> dict[str, str]:
    """{name: id} of a family's objectives: the ids are what heads, PRM outputs and weights are keyed by."""
    from pipeline.tasks import get_task

    return get_task(task_name).objective_ids(shared)


def materialise(policy: dict, weights: dict[str, float], out_dir: Path, dtype: str | None = None) -> Path:
    """An ordinary single-head checkpoint of `policy` at `weights` (its objectives; others weigh 0), saved
    in `dtype` (the engine's: "auto" resolves as the engine does)."""
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy, load_checked
    from pipeline.models.soup import merge_soup

    kind = policy["kind"]
    if kind == "hf":
        from pipeline.models.registry import resolve_model

        path = resolve_model(policy["path"])
        m = MultiHeadPolicy(load_checked(path), ["all"], noise_std=0.0)
        w = {"all": 1.0}
    elif kind == "multihead":
        path = policy["path"]
        m = MultiHeadPolicy.load(path)
        w = {o: weights.get(o, 0.0) for o in m.objectives}
        if sum(w.values()) <= 0:  # a head trained on other objectives only: equal weights
            if weights and len(m.objectives) > 1:  # several heads, none of them this task's: say so
                log.warning("%s: heads %s hold none of %s (shared_objectives differs from the policy's?); "
                            "equal weights used", path, m.objectives, sorted(weights))
            w = {o: 1.0 for o in m.objectives}
    else:  # soup: {objective: dir}
        dirs = policy["paths"]
        ws = [weights.get(o, 0.0) for o in dirs]
        if sum(ws) <= 0:
            ws = [1.0] * len(dirs)
        m = merge_soup(list(dirs.values()), ws)
        path = next(iter(dirs.values()))
        w = [1.0]
    return m.export_merged(w, out_dir, load_tokenizer(path), dtype=dtype)


def score_row(policy: str, weights: dict | None, decoding: str, task: str, objective: str, summary: dict) -> dict:
    """One evaluation row from an objective's summary (pipeline.eval.task_scores.summarise)."""
    keep = ("mean", "n", "se", "ci_low", "ci_high", "problem_ids", "scores")
    return {"policy": policy, "weights": json.dumps(weights) if weights else None, "decoding": decoding, "task": task,
            "objective": objective, **{k: summary[k] for k in keep}}


def response_rows(policy: str, weights: dict | None, decoding: str, task: str, episodes: list[dict],
                  ids: dict[str, str]) -> list[dict]:
    """One responses.parquet row per episode; `episodes[i]["scores"]` is keyed by objective name, stored by id."""
    return [{"policy": policy, "weights": json.dumps(weights) if weights else None, "decoding": decoding, "task": task,
             "problem_id": str(e["problem_id"]), "prompt": json.dumps(e["prompt"]),
             "response": e["response"] if isinstance(e["response"], str) else json.dumps(e["response"]),
             "scores": json.dumps({ids[k]: v for k, v in e.get("scores", {}).items()})} for e in episodes]


def write_responses(responses: list[dict], path: Path) -> Path:
    """responses.parquet (all columns strings, weights nullable); an empty evaluation writes an empty table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.string()) for c in RESPONSE_COLUMNS])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(responses, schema=schema), path)
    return path


def evaluate(policies: list[dict], problems: list[dict], *, engine_cfg, work_dir: str, points: int = 3,
             temperature: float = 0.0, top_k: int = -1, guided: dict | None = None, shared=()) -> list[dict]:
    """Rows of per-objective scores (see the module doc); writes `<work_dir>/responses.parquet`.
    `policies`: [{name, kind, path | paths, sweep: bool}]."""
    from pipeline.eval.task_scores import score_task
    from pipeline.engines.pool import make_engine

    by_task: dict[str, list[dict]] = {}
    for p in problems:
        by_task.setdefault(p["task"], []).append(p)
    work = Path(work_dir)
    plan = []  # (policy, task, weights)
    for pol in policies:
        for task in by_task:
            if pol.get("tasks") and task not in pol["tasks"]:
                continue
            ws = sweep(list(task_objectives(task, shared).values()), points) if pol.get("sweep") else [None]
            plan += [(pol, task, w) for w in ws]
    rows, responses, engine = [], [], None
    slot = {"n": 0}

    def engine_at(pol: dict, w: dict):
        """The one engine, serving `pol` at weights `w` (created on first use, then weights swapped in place)."""
        nonlocal engine
        ckpt = materialise(pol, w, work / "merged" / f"m{slot['n'] % 2}", dtype=getattr(engine_cfg, "dtype", None))
        slot["n"] += 1
        if engine is None:
            import os

            os.environ.update(engine_cfg.env)
            engine = make_engine(engine_cfg, str(ckpt))
        else:
            engine.reload_weights(str(ckpt))
        return engine

    for i, (pol, task, w) in enumerate(plan):
        engine_at(pol, w or {})
        res = score_task(task, by_task[task], engine, temperature=temperature, top_k=top_k, seed=0)
        ids = task_objectives(task, shared)
        rows += [score_row(pol["name"], w, "plain", task, ids[obj], s) for obj, s in res["objectives"].items()]
        responses += response_rows(pol["name"], w, "plain", task, res["episodes"], ids)
        log.info("eval %s %s %s: %s", pol["name"], task, w or "", {o: round(s["mean"], 3) for o, s in res["objectives"].items()})
        progress.report("eval points", i + 1, len(plan))  # (policy, task, weights) points
    if guided:
        g_rows, g_responses = evaluate_guided(policies, by_task, **guided, shared=shared, engine_at=engine_at)
        rows += g_rows
        responses += g_responses
    if engine is not None and hasattr(engine, "shutdown"):
        engine.shutdown()
    write_responses(responses, work / "responses.parquet")
    return rows


def evaluate_guided(policies: list[dict], by_task: dict[str, list[dict]], *, prm: str, tasks: list[str],
                    n_problems: int, candidates: int = 4, max_steps: int = 6, max_step_tokens: int = 64,
                    temperature: float = 0.7, policy_names: list[str] | None = None, dtype: str = "float32",
                    backend: str = "engine", engine_at=None, shared=()) -> tuple[list[dict], list[dict]]:
    """PRM-guided decoding on multi-head policies at equal weights over each task's objectives.
    backend `engine`: the batched step search (pipeline.decoding.guided_search) on the evaluation's engine,
    all problems at once, the policy merged at those weights (`engine_at(policy, weights)` loads it);
    `transformers`: guided_generate in process, one problem at a time (the reference).
    -> (rows, response rows), as evaluate()'s."""
    from pipeline.decoding.guided import guided_generate
    from pipeline.decoding.guided_search import guided_search
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy
    from pipeline.models.prm import VectorPRM
    from pipeline.objectives import build_objectives
    from pipeline.tasks import get_task

    import torch

    from pipeline.models.precision import resolve_dtype

    if backend == "engine" and engine_at is None:
        raise ValueError("guided backend 'engine' needs the evaluation's engine (engine_at); evaluate() passes it")
    prm_model, prm_tok = VectorPRM.load(prm, dtype=getattr(torch, resolve_dtype(dtype)))
    prm_model.eval()
    rows, responses = [], []
    for pol in policies:
        if pol["kind"] != "multihead" or (policy_names and pol["name"] not in policy_names):
            continue
        policy = MultiHeadPolicy.load(pol["path"], dtype=dtype).eval()  # its heads (and, in process, the model)
        tok = load_tokenizer(pol["path"])
        for task_name in tasks:
            task = get_task(task_name)
            if task.multi_turn:
                continue  # guided dialogues need the simulated user in the loop: not evaluated here
            ids = task_objectives(task_name, shared)
            objs = list(ids.values())
            w = [1.0 if o in objs else 0.0 for o in policy.objectives]
            prm_w = [1.0 if o in objs else 0.0 for o in prm_model.objectives]
            if not any(w) and len(w) == 1:  # one head trained on other (or pooled) objectives: that head
                w = [1.0]
            elif not any(w):  # no head of this task's: shared_objectives differs from the policy's training run
                raise ValueError(f"guided eval of {pol['name']} on {task_name}: its heads {policy.objectives} hold none "
                                 f"of the task's objectives {objs}; use the shared_objectives it was trained with")
            if not any(prm_w):  # guidance by no objective: K candidates picked blindly
                raise ValueError(f"guided eval of {task_name}: the PRM {prm} scores {prm_model.objectives}, "
                                 f"none of the task's objectives {objs}")
            probs = by_task.get(task_name, [])[:n_problems]
            boundary = "blank_lines" if task_name == "math_word" else "sentences"
            engine = engine_at(pol, dict(zip(policy.objectives, w))) if backend == "engine" else None
            # K = 1 is the same step-by-step sampling without a choice: the baseline on the same problems
            for k in sorted({1, candidates}):
                items = []
                if engine is not None:
                    found = guided_search(engine, prm_model, prm_tok, [p["prompt"] for p in probs], prm_weights=prm_w,
                                          candidates=k, max_steps=max_steps, max_step_tokens=max_step_tokens,
                                          max_new_tokens=task.max_tokens, boundary=boundary, temperature=temperature,
                                          seeds=list(range(len(probs))))
                else:
                    found = [guided_generate(policy, tok, prm_model, prm_tok, p["prompt"], weights=w, prm_weights=prm_w,
                                             candidates=k, max_steps=max_steps, max_step_tokens=max_step_tokens,
                                             max_new_tokens=task.max_tokens, boundary=boundary,
                                             temperature=temperature, seed=i) for i, p in enumerate(probs)]
                for p, r in zip(probs, found):
                    meta = json.loads(p["meta"]) if isinstance(p["meta"], str) else p["meta"]
                    items.append({"problem_id": problem_id(p), "prompt": p["prompt"],
                                  "response": tok.decode(r.token_ids, skip_special_tokens=True),
                                  "reference": p["reference"], "meta": meta, "scores": {}})
                eq, dec = {o: 1.0 / len(objs) for o in objs}, f"guided(K={k})"
                for name, obj in build_objectives(task.objectives).items():
                    scores = obj.score_batch(items)
                    for it, s in zip(items, scores):
                        it["scores"][name] = s
                    summary = summarise([it["problem_id"] for it in items], scores)
                    rows.append(score_row(pol["name"], eq, dec, task_name, ids[name], summary))
                responses += response_rows(pol["name"], eq, dec, task_name, items, ids)
    return rows, responses
