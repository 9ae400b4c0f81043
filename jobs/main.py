"""The main job: the whole pipeline on the built-in tasks, on local Ray (or a cluster).

    python -m jobs.main [--config jobs/configs/main.yaml] [--key value ...]
    python -m jobs.main --config jobs/configs/main_quick.yaml        # the quick profile

Stages: base_model (SmolLM2-135M-Instruct from its PyPI package), tasks (built-in
problems and demonstrations), sft, rollout, label_steps (+ math demonstration
trajectories), fit_prm, build_pairs, fit_policy (MAH-DPO, single-head DPO, DPO soup, MODPO),
eval (base, SFT, baselines, MAH-DPO along a weight sweep, PRM-guided decoding),
serve (one prompt, two weight vectors, through the endpoint). Each finished stage
leaves a marker in <run_dir>/stages/, so running the job again resumes after the
last one. The report (<run_dir>/report.md) has the time per stage, each stage's
result, the evaluation tables and plots, and the paper's findings checked in miniature.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

from jobs.common import parse_job_args, setup_logging
from pipeline.config import (DataConfig, EvalJobConfig, LabelJobConfig, MainJobConfig, MCConfig, ModelConfig,
                             PairsJobConfig, PolicyJobConfig, PRMJobConfig, RolloutJobConfig, ServeConfig,
                             SFTJobConfig, dump_config)
from pipeline.data import read_records, write_records
from pipeline.models.registry import resolve_model
from pipeline.progress import console_job, reported, say
from pipeline.runtime import init_ray
from pipeline.stages import StageRunner, write_report
from pipeline.tasks import TASKS, check_shared, objective_ids, write_builtin
from pipeline.train.harness import BEST, EVAL_METRICS, read_metrics
from pipeline.train.sft import run_sft


def sft_config(cfg: MainJobConfig, model_dir: str, sft_train: str) -> SFTJobConfig:
    run_dir = Path(cfg.run_dir)
    return SFTJobConfig(
        run_name="sft", output_dir=str(run_dir / "sft"),
        model=ModelConfig(name_or_path=model_dir, dtype=cfg.model.dtype),
        data=DataConfig(paths=[sft_train], eval_fraction=0.05),
        sft=cfg.sft, train=cfg.train.model_copy(update={"storage_path": str(run_dir / "ray")}), ray=cfg.ray,
    )


def subset(src: str, per_task: int, out: Path) -> str:
    """The first `per_task` problems of each task family, as a new shard."""
    rows, seen = [], {}
    for p in read_records([src], "problem")[0].to_pylist():
        seen[p["task"]] = seen.get(p["task"], 0) + 1
        if seen[p["task"]] <= per_task:
            rows.append(p)
    return write_records(rows, out, "problem")


def main(argv: list[str] | None = None) -> dict:
    setup_logging()
    cfg = parse_job_args(MainJobConfig, "main.yaml", argv)
    logs = Path(cfg.run_dir) / "logs"  # the console shows stages, warnings and progress; the rest goes here
    with console_job(logs / "main.log", logs / "progress.jsonl"):
        return run_main(cfg)


def run_main(cfg: MainJobConfig) -> dict:
    shared = check_shared(cfg.shared_objectives)  # a typo fails here, not after an hour of stages
    run = Path(cfg.run_dir)
    dump_config(cfg, run / "config.yaml")
    stages = StageRunner(run, expected=cfg.expected_seconds, plan=[  # the stages below, in order
        "base_model", "tasks", "sft", "rollout", "label_steps", "fit_prm", "build_pairs", 
        *(f"fit_policy_{m}" for m in ("mahdpo", *cfg.baselines)), "eval", *(["serve"] if cfg.serve_check else [])])
    sz = cfg.sizes
    storage = str((run / "ray").resolve())

    # Each stage's fingerprint: the settings it reads and the stages whose results it reads (a change
    # redoes the stage and every later one; its old outputs, Ray Train checkpoints included, go to previous/)
    def sizes(*keys: str) -> dict:
        return {f"sizes.{k}": getattr(sz, k) for k in keys}

    def fits(pattern: str) -> list[Path]:
        return sorted(Path(storage).glob(pattern))

    def release(pattern: str) -> None:
        """A finished fit's Ray Train checkpoints, once its stage is done (its export is what is used)."""
        if not cfg.keep_train_checkpoints:
            for d in Path(storage).glob(pattern):
                shutil.rmtree(d, ignore_errors=True)

    base = stages.run("base_model", lambda: {"model_dir": resolve_model(cfg.model.name_or_path)},
                      config={"model.name_or_path": cfg.model.name_or_path})
    data = stages.run("tasks", lambda: write_builtin(run / "data", cfg.tasks.n_train, cfg.tasks.n_eval, cfg.tasks.seed,
                                                  cfg.tasks.names), config={"tasks": cfg.tasks}, outputs=[run / "data"])
    init_ray(cfg.ray)

    def sft_stage() -> dict:
        r = run_sft(sft_config(cfg, base["model_dir"], data["sft_train"]))
        return {"model_dir": r.export_dir, "steps": r.step, "metrics": r.metrics}

    sft = stages.run("sft", sft_stage, config={"model": cfg.model, "sft": cfg.sft, "train": cfg.train},
                     inputs=["base_model", "tasks"], outputs=[run / "sft", *fits("sft")])
    release("sft")
    sft_dir = sft["model_dir"]

    def rollout_stage() -> dict:
        from pipeline.rollout.trajectories import run_rollout

        probs = subset(data["problems_train"], sz.rollout_problems, run / "rollout" / "_problems.parquet")
        r = run_rollout(RolloutJobConfig(model=ModelConfig(name_or_path=sft_dir), problems=[probs],
                                         n_samples=sz.rollout_samples, engine=cfg.engine, out_dir=str(run / "rollout"),
                                         sampling={"temperature": 1.0, "top_k": 50, "seed": 0}, ray=cfg.ray))
        return {"dir": str(run / "rollout"), "problems": probs, "trajectories": r.rows,
                "failed": failed_inputs(run / "rollout", "problems failed to roll out")}

    rollout = stages.run("rollout", rollout_stage, config={**sizes("rollout_problems", "rollout_samples"),
                                                           "engine": cfg.engine},
                         inputs=["tasks", "sft"], outputs=[run / "rollout"])

    def label_stage() -> dict:
        from pipeline.labeling.demos import demo_trajectories
        from pipeline.labeling.job import run_labeling, summarize

        trajs = [rollout["dir"]]
        if sz.demo_trajectories:
            demos = demo_trajectories(read_records([data["problems_train"]], "problem")[0].to_pylist(),
                                      read_records([data["sft_train"]], "sft")[0].to_pylist(), sz.demo_trajectories)
            trajs.append(str(Path(write_records(demos, run / "demo_trajectories" / "demos-00000.parquet",
                                                "trajectory")).parent))
        d = run / "labels"
        r = run_labeling(LabelJobConfig(model=ModelConfig(name_or_path=sft_dir), trajectories=trajs,
                                    problems=[data["problems_train"]], method=judged_methods(sz.judged_labels, shared),
                                    shared_objectives=shared,
                                    mc=MCConfig(k=sz.label_k, max_tokens=sz.label_max_tokens),
                                    engine=cfg.engine, out_dir=str(d), ray=cfg.ray))
        return {"dirs": [str(d)], "summary": {str(d): summarize(str(d))},
                "failed": failed_inputs(d, "trajectories failed to label"),
                "unparseable": r.extra.get("_unparseable", 0)}

    labels = stages.run("label_steps", label_stage,
                        config={**sizes("demo_trajectories", "judged_labels", "label_k", "label_max_tokens"),
                                "shared_objectives": shared, "engine": cfg.engine},
                        inputs=["tasks", "sft", "rollout"], outputs=[run / "labels", run / "demo_trajectories"])

    def prm_stage() -> dict:
        from pipeline.train.prm import run_fit_prm

        r = run_fit_prm(PRMJobConfig(output_dir=str(run / "prm"), model=ModelConfig(name_or_path=sft_dir),
                                     data=DataConfig(paths=labels["dirs"], eval_fraction=0.25), max_length=768,
                                     train=cfg.prm_train.model_copy(update={"storage_path": storage}), ray=cfg.ray))
        return {"model_dir": r.export_dir, "steps": r.step, "metrics": r.metrics}

    prm = stages.run("fit_prm", prm_stage, config={"prm_train": cfg.prm_train}, inputs=["sft", "label_steps"],
                     outputs=[run / "prm", *fits("prm")])
    release("prm")

    def pairs_stage() -> dict:
        import ray

        from pipeline.rollout.pairs import run_build_pairs

        probs = subset(data["problems_train"], sz.pair_problems, run / "pairs" / "_problems.parquet")
        return run_build_pairs(PairsJobConfig(
            model=ModelConfig(name_or_path=sft_dir), problems=[probs], prm=prm["model_dir"],
            n_candidates=sz.pair_candidates, min_margin=sz.min_margin, score_with_objective=sz.score_with_objective,
            shared_objectives=shared,
            engine=cfg.engine, dpo=cfg.dpo, out_dir=str(run / "pairs"), ray=cfg.ray,
            ref_num_cpus=ray.cluster_resources().get("CPU", 1),  # scoring runs alone: every CPU of the local Ray
            sampling={"temperature": 1.0, "top_k": 50, "seed": 1}))

    pairs = stages.run("build_pairs", pairs_stage,
                       config={**sizes("pair_problems", "pair_candidates", "min_margin", "score_with_objective"),
                               "shared_objectives": shared, "engine": cfg.engine,
                               # the reference log-probs' settings only: a DPO loss knob does not redo the pairs
                               "dpo": cfg.dpo.model_dump(include={"max_length", "max_prompt_length", "ref_dtype"})},
                       inputs=["tasks", "sft", "fit_prm"], outputs=[run / "pairs"])

    def policy_stage(method: str) -> dict:
        from pipeline.train.mahdpo import run_fit_policy

        out = run / f"policy_{method}"
        # MODPO fits one weight vector: equal weights, the point the findings compare MAH-DPO at
        weights = {o: 1.0 for o in pairs["per_objective"]} if method == "modpo" else {}
        # single-head DPO pools the pairs of the families it is evaluated on (single_eval_tasks), as the
        # paper's single-head baseline pools one domain's pairs; empty: every family's
        objectives = (list(dict.fromkeys(objective_ids(shared, sz.single_eval_tasks).values()))
                      if method == "single" and sz.single_eval_tasks else [])
        res = run_fit_policy(PolicyJobConfig(
            run_name=f"policy-{method}", output_dir=str(out), model=ModelConfig(name_or_path=sft_dir),
            data=DataConfig(paths=[str(run / "pairs")], eval_fraction=0.1), method=method, modpo_weights=weights,
            objectives=objectives,
            soup_together=cfg.soup_together and method == "soup",
            dpo=cfg.dpo, train=cfg.policy_train.model_copy(update={"storage_path": storage}), ray=cfg.ray))
        used = json.loads((out / "pairs_used.json").read_text())
        # policy_train.best_metric set: the model kept where the held-out metric was best (early stopping by
        # selection) is the one evaluated and served; best: its step and value; held_out: every evaluation
        return {name: {"model_dir": r.best_dir or r.export_dir, "steps": r.step, "pairs_used": used,
                       "best": json.loads((Path(r.log_dir) / BEST).read_text()) if r.best_dir else None,
                       "held_out": read_metrics(r.log_dir, EVAL_METRICS),
                       "metrics": {k: v for k, v in r.metrics.items() if k.startswith("eval/")}} for name, r in res.items()}

    policies = {}
    for m in ("mahdpo", *cfg.baselines):
        policies[m] = stages.run(f"fit_policy_{m}", lambda m=m: policy_stage(m),
                                 config={"dpo": cfg.dpo, "policy_train": cfg.policy_train,
                                         **({"soup_together": True} if m == "soup" and cfg.soup_together else {}),
                                         **({"single_eval_tasks": sz.single_eval_tasks} if m == "single" else {})},
                                 inputs=["sft", "build_pairs"],
                                 outputs=[run / f"policy_{m}", *fits(f"policy-{m}*")])
        release(f"policy-{m}*")

    def eval_stage() -> dict:
        from pipeline.eval.job import run_eval

        guided = ({"prm": prm["model_dir"], "tasks": ["math_word"], "n_problems": sz.guided_problems,
                   "candidates": sz.guided_candidates, "policy_names": ["MAH-DPO"],
                   "dtype": "float32" if cfg.engine.dtype == "float16" else cfg.engine.dtype}
                  if sz.guided_problems else None)
        out = run_eval(EvalJobConfig(
            problems=[data["problems_eval"]], n_per_task=sz.eval_per_task, sweep_points=sz.sweep_points,
            temperature=sz.eval_temperature, top_k=sz.eval_top_k,
            engine=cfg.engine, out_dir=str(run / "eval"), guided=guided, shared_objectives=shared, ray=cfg.ray,
            policies=eval_policies(cfg, base["model_dir"], sft_dir, policies)))
        return {"markdown": out["markdown"], "plots": out["plots"], "rows": out["rows"], "fronts": out["fronts"],
                "responses": out.get("responses")}

    ev = stages.run("eval", eval_stage,
                    config={**sizes("eval_per_task", "eval_base", "eval_temperature", "eval_top_k", "single_eval_tasks", "sweep_points",
                                    "sweep_soup", "guided_problems", "guided_candidates"), "baselines": cfg.baselines,
                            "shared_objectives": shared, "engine": cfg.engine},
                    inputs=["base_model", "tasks", "sft", "fit_prm", *(f"fit_policy_{m}" for m in policies)],
                    outputs=[run / "eval"])

    def serve_stage() -> dict:
        import socket

        from ray import serve

        from jobs.serve import smoke
        from pipeline.serve.app import build_app

        with socket.socket() as sock:  # any free port: the check must not collide with a running server
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        scfg = ServeConfig(model=ModelConfig(name_or_path=policies["mahdpo"]["mahdpo"]["model_dir"]),
                           model_name="mahalo", prm=prm["model_dir"], http_port=port, work_dir=str(run / "serve"))
        serve.start(http_options={"host": scfg.http_host, "port": scfg.http_port})
        serve.run(build_app(scfg), name="mahalo-main", route_prefix="/")
        try:
            return {"answers": smoke(scfg)}
        finally:
            serve.shutdown()  # the HTTP proxy too, so a later Serve start gets its own options

    served = stages.run("serve", serve_stage, inputs=["fit_prm", "fit_policy_mahdpo"],
                        outputs=[run / "serve"]) if cfg.serve_check else {}

    agreement = pair_agreement_of(run / "pairs", data["problems_train"], shared)
    report = write_report(run, stages.timings, report_sections(cfg, sft, rollout, labels, prm, pairs, agreement, policies,
                                                               ev, served))
    for p in ev.get("plots", []):  # plots beside the report, so its image links work
        shutil.copy(p, run / Path(p).name)
    say(f"main: done. Report: {report}")
    return {"report": str(report), "eval": ev}


def eval_policies(cfg: MainJobConfig, base_dir: str, sft_dir: str, policies: dict) -> list[dict]:
    """The evaluation's policies: base (unless sizes.eval_base is false), SFT, the fitted baselines, MAH-DPO along its sweep."""
    out = [{"name": "base", "kind": "hf", "path": base_dir}] if cfg.sizes.eval_base else []
    out.append({"name": "sft", "kind": "hf", "path": sft_dir})
    if "single" in policies:
        out.append({"name": "single-head DPO", "kind": "multihead", "path": policies["single"]["single"]["model_dir"],
                    "tasks": cfg.sizes.single_eval_tasks})
    if "soup" in policies:
        out.append({"name": "DPO soup", "kind": "soup", "paths": {n: r["model_dir"] for n, r in policies["soup"].items()},
                    "sweep": cfg.sizes.sweep_soup})
    if "modpo" in policies:
        out.append({"name": "MODPO", "kind": "multihead", "path": policies["modpo"]["modpo"]["model_dir"]})
    out.append({"name": "MAH-DPO", "kind": "multihead", "path": policies["mahdpo"]["mahdpo"]["model_dir"], "sweep": True})
    return out


def diagnosis(rows: list[dict], agreement: dict, policies: dict, pairs: dict) -> str:
    """What limits the findings, from the run's own numbers: a floor (scores at 0 leave nothing to
    improve or to trade), pairs the ground truth cannot tell apart, how little DPO trained."""
    plain = [r for r in rows if r["decoding"] == "plain"]
    sft = [r for r in plain if r["policy"] == "sft"]
    zero = [r for r in plain if r["mean"] == 0]
    tot = {k: sum(v.get(k, 0) for v in agreement.values()) for k in ("agree", "tie", "disagree")}
    steps = {m: max(r["steps"] for r in res.values()) for m, res in policies.items()}
    lines = [
        f"- Floor: the SFT policy scores 0 on {sum(r['mean'] == 0 for r in sft)} of {len(sft)} (task, objective) "
        f"cells, and {len(zero)} of {len(plain)} evaluation cells are 0 (SFT means: "
        + ", ".join(f"{_cell(r)} {r['mean']:.3f}" for r in sft) + "). A finding needs a score "
        "that can move; where every policy scores 0 there is nothing to improve or trade.",
        f"- Pairs: of {sum(tot.values())} pairs the PRM chose, the task's own verifier / judge prefers the chosen "
        f"response in {tot['agree']}, is indifferent in {tot['tie']} and prefers the rejected one in "
        f"{tot['disagree']}: where it is indifferent, DPO learns the PRM's preference, not the objective.",
        f"- Training: {pairs.get('pairs', 0)} pairs; optimizer steps " + ", ".join(f"{m} {n}" for m, n in steps.items())
        + " (balance: " + ", ".join(sorted({str((r.get("pairs_used") or {}).get("balance", "truncate"))
                                              for res in policies.values() for r in res.values()})) + ").",
    ]
    se = [r["se"] for r in plain if r.get("se") is not None and not math.isnan(r["se"])]
    if se:
        lines.append(f"- Noise: n = {min(r['n'] for r in plain)}-{max(r['n'] for r in plain)} problems per cell; "
                     f"median standard error {sorted(se)[len(se) // 2]:.3f}.")
    return "\n".join(lines)


def _cell(row: dict) -> str:
    """`task/name` of an evaluation row; its objective id already holds the task unless shared."""
    o = row["objective"]
    return o if o.startswith(f"{row['task']}/") else f"{row['task']}/{o}"


def pair_agreement_of(pairs_dir: Path, problems: str, shared=()) -> dict:
    import pyarrow.parquet as pq

    from pipeline.rollout.pairs import pair_agreement

    pairs = read_records([str(pairs_dir)], "preference")[0].to_pylist()
    cand_file = pairs_dir / "_candidates.parquet"  # played-out dialogues: a dialogue judge reads the student's replies
    dialogues = {}
    if cand_file.exists() and "dialogue" in pq.read_schema(cand_file).names:
        dialogues = {(c["problem_id"], c["response"]): c["dialogue"] for c in pq.read_table(
            cand_file, columns=["problem_id", "response", "dialogue"]).to_pylist() if c["dialogue"]}
    return pair_agreement(pairs, {p["id"]: p for p in read_records([problems], "problem")[0].to_pylist()}, shared, dialogues)


def judged_methods(method: str, shared) -> dict[str, str]:
    """LabelJobConfig.method for the judged objectives, by id. A shared id with a dialogue member
    (tutoring's engagement) takes judge_prefix (a dialogue's prefix is judged the same way), never judge_mc."""
    kinds: dict[str, set] = {}
    for t in TASKS.values():
        for o in t.objectives:
            kinds.setdefault(t.objective_ids(shared)[o["name"]], set()).add(o["kind"])
    return {i: method for i, k in kinds.items()
            if k == {"judged"} or (method == "judge_prefix" and k == {"judged", "dialogue"})}


def objectives_section(cfg, labels: dict) -> str:
    """Which objectives are shared across families, and every objective id with its labels' kind and mean."""
    shared = cfg.shared_objectives
    fams: dict[str, list[str]] = {}
    for (t, _), i in objective_ids(shared, cfg.tasks.names or None).items():
        fams.setdefault(i, []).append(t)
    summary = {o: v for s in labels["summary"].values() for o, v in s.items()}
    lines = [f"Shared objectives: {', '.join(shared) if shared else 'none'} (`shared_objectives`; an objective "
             "not shared is its family's own: one PRM output and one policy head per `<family>/<name>`).", "",
             "| objective id | families | label kind | labelled steps | label mean |", "|---|---|---|---:|---:|"]
    for i, ts in sorted(fams.items()):
        s = summary.get(i, {})
        n = s.get("steps", 0) - s.get("unlabelled", 0)
        lines.append(f"| {i} | {', '.join(ts)} | {s.get('label_kind', '-')} | {n} | "
                     + (f"{s['mean']:.3f} |" if s else "- |"))
    return "\n".join(lines)


def md_table(headers: list[str], rows: list[list]) -> str:
    fmt = lambda x: f"{x:.4g}" if isinstance(x, float) else str(x)  # noqa: E731
    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                      *("| " + " | ".join(fmt(x) for x in r) + " |" for r in rows)])


def policies_section(policies: dict) -> str:
    """Per fit: optimizer steps and the pairs it trained on after balancing (what a cut discarded, what
    cycling repeated);
    then the held-out DPO metrics, one column per fit."""
    fits = [(f"{m}" + (f":{n}" if n not in (m, "") and len(res) > 1 else ""), r)
            for m, res in policies.items() for n, r in res.items()]
    rows = []
    for name, r in fits:
        per = (r.get("pairs_used") or {}).get("per_objective", {})
        rows.append([name, r["steps"], (r.get("pairs_used") or {}).get("balance", "truncate"),
                     sum(v["used"] for v in per.values()) if per else "-",
                     sum(v["discarded"] for v in per.values()) if per else "-",
                     sum(v.get("repeated", 0) for v in per.values()) if per else "-",
                     (r.get("pairs_used") or {}).get("held_out", "-")])
    out = md_table(["fit", "optimizer steps", "balance", "training pairs used", "discarded by the balance",
                    "repeats per epoch (cycle)", "held out"], rows)
    keys = sorted({k for _, r in fits for k in r["metrics"]})
    if keys:
        out += "\n\nHeld-out DPO metrics at the last step:\n\n" + md_table(
            ["metric", *(n for n, _ in fits)], [[k, *(r["metrics"].get(k, "-") for _, r in fits)] for k in keys])
    curves = [(n, r) for n, r in fits if r.get("held_out")]
    if curves:  # the held-out preference loss along the fit, and the step the evaluated model was kept at
        out += ("\n\nThe held-out preference (DPO) loss along each fit (0.693: the untrained policy); the model "
                "evaluated is the one kept at the marked step (`policy_train.best_metric`), else the last:\n\n")
        for n, r in curves:
            best = (r.get("best") or {}).get("step")
            pts = ", ".join(f"{'**' if e['step'] == best else ''}step {e['step']}: "
                            f"{e.get('eval/dpo_loss', e.get('eval/loss', float('nan'))):.3f}{'**' if e['step'] == best else ''}"
                            for e in r["held_out"])
            out += f"- {n}: {pts}" + (f" (kept: step {best})" if best is not None else " (kept: the last step)") + "\n"
    return out


def failed_inputs(out_dir: Path, what: str) -> int:
    """Inputs a shard stage quarantined (declared input errors; anything else stopped the job), said on the console."""
    from pipeline.data.shards import failed_count

    if n := failed_count(out_dir):
        say(f"{n} {what}: see {out_dir / '_failed'}")
    return n


def prm_pairs_cell(pairs: dict, key: str, judged: bool, agreement: dict) -> str:
    """agree / tie / disagree of the PRM's pairs for one objective: the training pairs when the PRM chose them,
    else the pairs it would have chosen (build_pairs' prm_pairs_vs_judge); '-' when neither was measured."""
    would = pairs.get("prm_pairs_vs_judge", {})
    v = agreement if not judged else would.get(key, would.get(key.split("/", 1)[-1]))  # a shared objective: its bare name
    return "-" if not v else f"{v.get('agree', 0)} / {v.get('tie', 0)} / {v.get('disagree', 0)}"


def report_sections(cfg, sft, rollout, labels, prm, pairs, agreement, policies, ev, served) -> dict[str, str]:
    from pipeline.eval.findings import findings
    from pipeline.eval.report import repetition_section, steering_examples, table, verdicts_section
    from pipeline.train.prm_metrics import baseline_table

    m = sft["metrics"]
    found = findings(ev["rows"])

    def by_verifier(key: str) -> bool:  # an agreement key ("task/name") paired by its own verifier / judge
        return any(key in (e, f"{key.split('/', 1)[0]}/{e}") for e in cfg.sizes.score_with_objective)
    prm_m = {k[len("eval/"):]: round(v, 4) for k, v in prm["metrics"].items() if k.startswith("eval/")}
    rep = repetition_section(ev["responses"]) if ev.get("responses") else None
    sections = {
        # the verdicts first: what a reader came for; then whether a policy degenerated (the repetition's first line)
        "The paper's findings in miniature": verdicts_section(found) + ("\n\n" + rep.split("\n", 1)[0] if rep else ""),
        "SFT": f"{sft['steps']} optimizer steps; final train loss {m.get('loss', float('nan')):.4f}, "
               f"held-out loss {m.get('eval/loss', float('nan')):.4f}. Model: `{sft['model_dir']}`.",
        "Objectives": objectives_section(cfg, labels),
        "Rollout and step labels": md_table(["", "count"], [
            ["trajectories rolled out", rollout["trajectories"]], ["problems failed (rollout)", rollout.get("failed", 0)],
            ["trajectories failed (labelling)", labels.get("failed", 0)],
            ["judge outputs unparseable (this run's labelling)", labels.get("unparseable", 0)],
            *[[f"label rows: {o}", v.get("rows", 0)] for s_ in labels["summary"].values() for o, v in sorted(s_.items())]]),
        "PRM": f"{prm['steps']} steps; held-out steps, against the trivial baselines (AUROC 0.5, predicting "
               "the mean):\n\n" + baseline_table(prm["metrics"])
               + "\n\nAll held-out metrics:\n\n" + md_table(["metric", "value"], sorted(prm_m.items())),
        "Pairs": md_table(["", "pairs"], [[k, v] for k, v in pairs.items()
                                          if k not in ("path", "per_objective", "prm_pairs_vs_judge")]
                          + [[f"pairs: {o}", n] for o, n in sorted(pairs.get("per_objective", {}).items())]) + "\n\n"
                 "The pairs against the task's own verifier / judge (chosen scored higher, equal, lower); an "
                 "objective in `score_with_objective` was paired by that verifier itself, so it agrees by construction, "
                 "and the last column shows how the pairs the PRM would have chosen from the same candidates fare "
                 "(agree / tie / disagree). A dialogue family's candidate turns are judged on the dialogue played out from "
                 "them (the same policy and the simulated student, to the episode's end: one Monte Carlo sample of the "
                 "turn's value; build_pairs' `continue_dialogues`) where a judge pairs them; the PRM's tutoring pairs "
                 "are checked on those dialogues too:\n\n"
                 "| task/objective | paired by | agree | tie | disagree | the PRM's pairs |\n|---|---|---:|---:|---:|---|\n"
                 + "\n".join(f"| {k} | {'verifier / judge' if by_verifier(k) else 'PRM'} | {v.get('agree', 0)} | "
                             f"{v.get('tie', 0)} | {v.get('disagree', 0)} | {prm_pairs_cell(pairs, k, by_verifier(k), v)} |"
                             for k, v in agreement.items()),
        "Policies": policies_section(policies),
        "Evaluation": table(ev["rows"]) + "\n\n" + "\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in ev["plots"]),
        "Steering examples": steering_examples(ev["responses"]) if ev.get("responses")
        else "not saved by this run's evaluation (an evaluation from before responses were saved)",
        "Repetition": rep or "no responses saved",
    }
    sections["Why, from this run's data"] = diagnosis(ev["rows"], {k: v for k, v in agreement.items() if not by_verifier(k)},
                                                      policies, pairs)
    if served:
        sections["Serve check"] = "\n".join(f"- weights {a['objective_weights']}: {a['text']!r}" for a in served["answers"])
    return sections


if __name__ == "__main__":
    try:
        main()
    except (Exception, KeyboardInterrupt) as e:
        if not reported(e):  # else its summary is on the console and its traceback in the log
            raise
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 1)
