"""The labelling stage: trajectory shards in, stepwise shards out (one per input
shard, written atomically; finished shards are skipped when the job runs again).
Trajectories stream through Ray Data to an actor pool of engines (the completer
model); every objective of the trajectory's task is labelled by its method."""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa

from pipeline import progress
from pipeline.config import LabelJobConfig, MCConfig
from pipeline.data.io import list_shards, read_records, write_records
from pipeline.data.records import InputError
from pipeline.data.shards import ShardReport, pending, write_by_shard
from pipeline.data.schemas import schema_for
from pipeline.data.stream import is_empty, read_dataset
from pipeline.labeling.steps import DEFAULT_METHOD, label_objective
from pipeline.models.registry import resolve_model
from pipeline.objectives import build_objectives, objective_id, resolve_keys
from pipeline.objectives.math_verifier import needs_reference
from pipeline.engines.pool import map_with_engine
from pipeline.tasks import TASKS, check_shared, get_task

log = logging.getLogger(__name__)
RESULT_SCHEMA = (schema_for("stepwise").append(pa.field("_shard", pa.string())).append(pa.field("_input", pa.string()))
                 .append(pa.field("_error", pa.string())).append(pa.field("_unparseable", pa.int32())))


def label_batch(engine, batch: pa.Table, *, problems: dict, objectives: dict, extra: dict, methods: dict,
                mc: dict, sampling: dict, shared: list[str] = (), progress_total: int = 0) -> pa.Table:
    """Rows carry the objective's id (`<family>/<name>`, or the bare name when shared); `methods` is keyed by id."""
    mc_cfg = MCConfig.model_validate(mc)
    by_task: dict[str, list[dict]] = defaultdict(list)
    out = []
    for tr in batch.to_pylist():
        p = problems.get(tr["problem_id"])
        if p is None:
            out.append({"_shard": tr["_shard"], "_input": tr["id"], "_error": f"problem {tr['problem_id']} not found"})
            continue
        if p["task"] not in TASKS:
            out.append({"_shard": tr["_shard"], "_input": tr["id"], "_error": f"problem {p['id']}: field 'task': "
                        f"unknown task {p['task']!r}; built-in tasks: {', '.join(TASKS)}"})
            continue
        if not (p["reference"] or "").strip() and (need := _reference_objective(p["task"], objectives, extra)):
            out.append({"_shard": tr["_shard"], "_input": tr["id"], "_error": f"problem {p['id']}: field 'reference': "
                        f"missing, and {p['task']}/{need} is verified against it"})
            continue
        by_task[p["task"]].append({**tr, "reference": p["reference"], "meta": json.loads(p["meta"])})
    for task_name, trajs in by_task.items():
        task = get_task(task_name)
        objs = build_objectives([*task.objectives, *extra.get(task_name, [])], engine=engine)
        names = objectives.get(task_name) or list(objs)
        try:
            results = {}
            for name in names:
                obj = objs[name]
                method = methods.get(objective_id(task_name, name, shared)) or DEFAULT_METHOD[obj.kind]
                smp = {**sampling, "max_tokens": mc_cfg.max_tokens or sampling.get("max_tokens") or task.max_tokens}
                results[name] = label_objective(method, engine, obj, trajs, mc_cfg, smp)
        except InputError as e:  # a declared input error: quarantined and counted; anything else stops the job
            out += [{"_shard": tr["_shard"], "_input": tr["id"], "_error": f"{type(e).__name__}: {e}"} for tr in trajs]
            continue
        for name, labelled in results.items():
            oid = objective_id(task_name, name, shared)
            for tr, lab in zip(trajs, labelled):
                out.append({"id": f"{tr['id']}/{oid}", "prompt": tr["prompt"], "completions": tr["steps"],
                            "objective": oid, "labels": lab.labels, "label_kind": lab.label_kind,
                            "rollouts_per_step": lab.rollouts_per_step, "_shard": tr["_shard"], "_input": tr["id"],
                            "_error": None, "_unparseable": lab.unparseable})
    if progress_total:  # from the engine actor, per batch: the driver sees whole shards only at their end
        progress.advance("trajectories labelled", batch.num_rows, progress_total)
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


def _reference_objective(task: str, objectives: dict, extra: dict) -> str | None:
    """The labelled objective verified against the problem's reference, if any: a problem without one
    fails alone, not every trajectory of its batch."""
    names = objectives.get(task)
    specs = [*TASKS[task].objectives, *extra.get(task, [])] if task in TASKS else []
    return next((s["name"] for s in specs if needs_reference(s) and (not names or s["name"] in names)), None)


def label_methods(cfg: LabelJobConfig) -> dict[str, str]:
    """`method` keyed by objective id. A bare name is accepted when it names one objective of the
    built-in and extra ones; `engagement` (math_word's and tutoring's) is ambiguous: an error, not both."""
    check_shared(cfg.shared_objectives, cfg.extra_objectives)
    ids = [objective_id(t, n, cfg.shared_objectives) for t, fam in TASKS.items()
           for n in [*fam.objective_names, *(o.name for o in cfg.extra_objectives.get(t, []))]]
    return resolve_keys(cfg.method, dict.fromkeys(ids), "method key")


def run_labeling(cfg: LabelJobConfig) -> ShardReport:
    from tqdm import tqdm

    if not cfg.trajectories or not cfg.problems:
        raise ValueError("trajectories and problems are both needed")
    for task, names in cfg.objectives.items():
        known = {o["name"] for o in get_task(task).objectives} | {o.name for o in cfg.extra_objectives.get(task, [])}
        if unknown := set(names) - known:
            raise ValueError(f"objectives.{task}: unknown objective(s) {sorted(unknown)}; {task} has {sorted(known)}")
    methods = label_methods(cfg)
    if cfg.mc.early_stop and cfg.mc.hard_label == "none":
        log.warning("mc.early_stop: soft MC values need all k continuations; it applies to judge_mc labels only")
    model_dir = resolve_model(cfg.model.name_or_path)
    out = Path(cfg.out_dir)
    shards = [f for p in cfg.trajectories for f in list_shards(p)]
    out_paths = {s: out / f"{Path(s).stem}.parquet" for s in shards}
    if len(set(out_paths.values())) != len(out_paths):
        raise ValueError("two trajectory shards share a file name; their label shards would collide")
    todo, done = pending(out_paths)
    log.info("label_steps: %d shards, %d already labelled, %d to do", len(shards), len(done), len(todo))
    for s in [s for s in todo if is_empty(s)]:  # e.g. a rollout shard whose every problem failed
        log.warning("label_steps: %s holds no trajectories: its label shard is written empty", s)
        write_records([], todo.pop(s), "stepwise")
    if not todo:
        return ShardReport(shards_skipped=[str(out_paths[s]) for s in done])
    table, _ = read_records(cfg.problems, "problem")
    problems = {r["id"]: r for r in table.select(["id", "task", "reference", "meta"]).to_pylist()}
    expected = {}
    parts = []
    for s in todo:
        ds = read_dataset(s, "trajectory")
        expected[s] = ds.count()
        parts.append(ds.map_batches(lambda b, s=s: b.append_column("_shard", pa.array([s] * b.num_rows)),
                                    batch_format="pyarrow"))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    ds = map_with_engine(ds, cfg.engine, model_dir, label_batch, problems=problems, objectives=cfg.objectives,
                         extra={t: [o.model_dump() for o in v] for t, v in cfg.extra_objectives.items()},
                         methods=methods, mc=cfg.mc.model_dump(), sampling=cfg.sampling.model_dump(),
                         shared=cfg.shared_objectives, progress_total=sum(expected.values()))
    with tqdm(total=len(todo), desc="label shards", mininterval=5) as bar:
        batches = ds.iter_batches(batch_size=None, batch_format="pyarrow")
        report = write_by_shard(batches, expected,
                                {s: out_paths[s] for s in todo}, "stepwise", counters=("_unparseable",), progress=bar)
    report.shards_skipped = [str(out_paths[s]) for s in done]
    if report.failed_inputs:
        log.warning("label_steps: %d trajectories failed; see %s/_failed/", report.failed_inputs, out)
    if report.extra.get("_unparseable"):
        log.warning("label_steps: %d judge outputs could not be parsed (left unlabelled)", report.extra["_unparseable"])
    return report


def summarize(out_dir: str) -> dict:
    """Label counts, means and label kinds per objective id, for reports and logs."""
    t, _ = read_records(out_dir, "stepwise")
    stats: dict = defaultdict(Counter)
    sums: dict = defaultdict(float)
    kinds: dict = defaultdict(set)
    for r in t.to_pylist():
        kinds[r["objective"]].add(r["label_kind"])
        for x in r["labels"]:
            stats[r["objective"]]["steps"] += 1
            if x is None:
                stats[r["objective"]]["unlabelled"] += 1
            else:
                sums[r["objective"]] += x
        stats[r["objective"]]["rows"] += 1
    return {o: {**c, "mean": sums[o] / max(1, c["steps"] - c["unlabelled"]), "label_kind": "+".join(sorted(kinds[o]))}
            for o, c in stats.items()}
