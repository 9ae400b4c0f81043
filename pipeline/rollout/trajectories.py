"""Rollout: sample trajectories for task problems with any checkpoint, on engines
in a Ray Data actor pool, and write trajectory shards (resumable, one per
`shard_size` problems). Steps are split by the task's splitter; dialogue turns
are generated against the task's simulated user; `outcome` is the verifier's
verdict where the task has a verifiable objective."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import progress
from pipeline.config import RolloutJobConfig
from pipeline.data.hashing import stable_digest
from pipeline.data.io import read_records
from pipeline.data.records import InputError
from pipeline.data.shards import ShardReport, pending, write_by_shard
from pipeline.data.schemas import schema_for
from pipeline.models.registry import resolve_model
from pipeline.objectives import build_objectives
from pipeline.objectives.math_verifier import needs_reference
from pipeline.engines.episodes import run_episodes
from pipeline.engines.pool import map_with_engine
from pipeline.tasks import TASKS, get_task

log = logging.getLogger(__name__)
RESULT_SCHEMA = schema_for("trajectory").append(pa.field("_shard", pa.string())).append(
    pa.field("_input", pa.string())).append(pa.field("_error", pa.string()))


def family_parts(task_name: str, engine=None):
    """(task, objectives, splitter of its steps, simulated user, verifier objective or None)."""
    task = get_task(task_name)
    objs = build_objectives(task.objectives, engine=engine)
    splitters = {o.splitter for o in objs.values()}
    if len(splitters) != 1:
        raise ValueError(f"task {task_name}: its objectives split steps differently ({splitters})")
    users = [o.user for o in objs.values() if o.user is not None]
    verifier = next((o for o in objs.values() if o.kind == "verifiable"), None)
    return task, objs, next(iter(objs.values())), users[0] if users else None, verifier


def rollout_batch(engine, batch: pa.Table, *, n_samples: int, sampling: dict, policy: str,
                  progress_total: int = 0) -> pa.Table:
    rows = batch.to_pylist()
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    out = []
    for task_name, probs in by_task.items():
        if task_name not in TASKS:
            out += [{"_shard": p["_shard"], "_input": p["id"], "_error": f"problem {p['id']}: field 'task': unknown "
                     f"task {task_name!r}; built-in tasks: {', '.join(TASKS)}"} for p in probs]
            continue
        if any(needs_reference(o) for o in TASKS[task_name].objectives):
            # a verifiable problem without its reference fails alone, not every problem of its batch
            out += [{"_shard": p["_shard"], "_input": p["id"], "_error": f"problem {p['id']}: field 'reference': missing, "
                     f"and {task_name}'s verifier checks answers against it"} for p in probs if not (p["reference"] or "").strip()]
            if not (probs := [p for p in probs if (p["reference"] or "").strip()]):
                continue
        try:
            task, _, split_obj, user, verifier = family_parts(task_name, engine)
            eps = run_episodes(task, probs, engine, user=user, n=n_samples, **sampling)
            outcomes = verifier.score_batch(eps) if verifier else [None] * len(eps)
        except InputError as e:  # a declared input error: quarantined and counted; anything else stops the job
            out += [{"_shard": p["_shard"], "_input": p["id"], "_error": f"{type(e).__name__}: {e}"} for p in probs]
            continue
        shard_of = {p["id"]: p["_shard"] for p in probs}
        for e, z in zip(eps, outcomes):
            if task.multi_turn:
                steps, turns = split_obj.split(e["response"]), e["response"]
                final = steps[-1] if steps else ""
            else:
                steps, turns, final = split_obj.split(e["response"]), None, e["response"]
            out.append({"id": f"{e['problem_id']}-s{e['sample']}", "problem_id": e["problem_id"], "prompt": e["prompt"],
                        "steps": steps or [""], "final": final, "outcome": z, "policy": policy, "turns": turns,
                        "_shard": shard_of[e["problem_id"]], "_input": e["problem_id"], "_error": None})
    if progress_total:  # from the engine actor, per batch: the driver sees whole shards only at their end
        progress.advance("problems rolled out", batch.num_rows, progress_total)
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


def _plan(table: pa.Table, cfg: RolloutJobConfig, out: Path) -> None:
    """A resumed run must cut the same shards: same problems, same shard size, same samples."""
    ids = table.column("id").to_pylist()
    plan = {"n_problems": len(ids), "shard_size": cfg.shard_size, "n_samples": cfg.n_samples,
            "ids": stable_digest("\n".join(ids))}
    f = out / "_plan.json"
    if f.exists() and json.loads(f.read_text()) != plan:
        raise ValueError(f"{out} holds a rollout of other problems or settings ({f}); use a new out_dir")
    out.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps(plan))


def run_rollout(cfg: RolloutJobConfig) -> ShardReport:
    import ray
    from tqdm import tqdm

    if not cfg.problems:
        raise ValueError("problems is empty: give the problem shards to roll out")
    model_dir = resolve_model(cfg.model.name_or_path)
    out = Path(cfg.out_dir)
    table, _ = read_records(cfg.problems, "problem")
    _plan(table, cfg, out)
    shard_names = [f"trajectories-{i // cfg.shard_size:05d}" for i in range(table.num_rows)]
    table = table.append_column("_shard", pa.array(shard_names))
    out_paths = {s: out / f"{s}.parquet" for s in dict.fromkeys(shard_names)}
    todo, done = pending(out_paths)
    log.info("rollout: %d shards, %d already written, %d to do", len(out_paths), len(done), len(todo))
    if not todo:
        return ShardReport(shards_skipped=done)
    table = table.filter(pc.is_in(table.column("_shard"), pa.array(list(todo))))
    expected = dict(Counter(table.column("_shard").to_pylist()))
    sampling = cfg.sampling.model_dump()
    ds = map_with_engine(ray.data.from_arrow(table), cfg.engine, model_dir, rollout_batch, n_samples=cfg.n_samples,
                         sampling=sampling, policy=cfg.policy_name or model_dir, progress_total=sum(expected.values()))
    with tqdm(total=len(todo), desc="rollout shards", mininterval=5) as bar:
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        report = write_by_shard(batches, expected, {s: out_paths[s] for s in todo}, "trajectory", progress=bar)
    report.shards_skipped = done
    if report.failed_inputs:
        log.warning("rollout: %d problems failed to generate; see %s/_failed/", report.failed_inputs, out)
    return report
