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
from pathlib import Path

from jobs.common import parse_job_args, setup_logging
from pipeline.config import (DataConfig, EvalJobConfig, LabelJobConfig, MainJobConfig, MCConfig, ModelConfig,
                             PairsJobConfig, PolicyJobConfig, PRMJobConfig, RolloutJobConfig, ServeConfig,
                             SFTJobConfig, dump_config)
from pipeline.data import read_records, write_records
from pipeline.models.registry import resolve_model
from pipeline.runtime import init_ray
from pipeline.stages import StageRunner, write_report
from pipeline.tasks import write_builtin
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
    run = Path(cfg.run_dir)
    dump_config(cfg, run / "config.yaml")
    stages = StageRunner(run)
    sz = cfg.sizes
    storage = str((run / "ray").resolve())

    def release(pattern: str) -> None:
        """A finished fit's Ray Train checkpoints, once its stage is done (its export is what is used)."""
        if not cfg.keep_train_checkpoints:
            for d in Path(storage).glob(pattern):
                shutil.rmtree(d, ignore_errors=True)

    base = stages.run("base_model", lambda: {"model_dir": resolve_model(cfg.model.name_or_path)})
    data = stages.run("tasks", lambda: write_builtin(run / "data", cfg.tasks.n_train, cfg.tasks.n_eval, cfg.tasks.seed,
                                                  cfg.tasks.names))
    init_ray(cfg.ray)

    def sft_stage() -> dict:
        r = run_sft(sft_config(cfg, base["model_dir"], data["sft_train"]))
        return {"model_dir": r.export_dir, "steps": r.step, "metrics": r.metrics}

    sft = stages.run("sft", sft_stage)
    release("sft")
    sft_dir = sft["model_dir"]

    def rollout_stage() -> dict:
        from pipeline.rollout.trajectories import run_rollout

        probs = subset(data["problems_train"], sz.rollout_problems, run / "rollout" / "_problems.parquet")
        r = run_rollout(RolloutJobConfig(model=ModelConfig(name_or_path=sft_dir), problems=[probs],
                                         n_samples=sz.rollout_samples, engine=cfg.engine, out_dir=str(run / "rollout"),
                                         sampling={"temperature": 1.0, "top_k": 50, "seed": 0}, ray=cfg.ray))
        return {"dir": str(run / "rollout"), "problems": probs, "trajectories": r.rows}

    rollout = stages.run("rollout", rollout_stage)

    def label_stage() -> dict:
        from pipeline.labeling.demos import demo_trajectories
        from pipeline.labeling.job import run_labeling, summarize
        from pipeline.tasks import TASKS

        trajs = [rollout["dir"]]
        if sz.demo_trajectories:
            demos = demo_trajectories(read_records([data["problems_train"]], "problem")[0].to_pylist(),
                                      read_records([data["sft_train"]], "sft")[0].to_pylist(), sz.demo_trajectories)
            trajs.append(str(Path(write_records(demos, run / "demo_trajectories" / "demos-00000.parquet",
                                                "trajectory")).parent))
        judged = {o["name"]: sz.judged_labels for t in TASKS.values() for o in t.objectives if o["kind"] == "judged"}
        d = run / "labels"
        run_labeling(LabelJobConfig(model=ModelConfig(name_or_path=sft_dir), trajectories=trajs,
                                    problems=[data["problems_train"]], method=judged,
                                    mc=MCConfig(k=sz.label_k, max_tokens=sz.label_max_tokens),
                                    engine=cfg.engine, out_dir=str(d), ray=cfg.ray))
        return {"dirs": [str(d)], "summary": {str(d): summarize(str(d))}}

    labels = stages.run("label_steps", label_stage)

    def prm_stage() -> dict:
        from pipeline.train.prm import run_fit_prm

        r = run_fit_prm(PRMJobConfig(output_dir=str(run / "prm"), model=ModelConfig(name_or_path=sft_dir),
                                     data=DataConfig(paths=labels["dirs"], eval_fraction=0.25), max_length=768,
                                     train=cfg.prm_train.model_copy(update={"storage_path": storage}), ray=cfg.ray))
        return {"model_dir": r.export_dir, "steps": r.step, "metrics": r.metrics}

    prm = stages.run("fit_prm", prm_stage)
    release("prm")

    def pairs_stage() -> dict:
        import ray

        from pipeline.rollout.pairs import run_build_pairs

        probs = subset(data["problems_train"], sz.pair_problems, run / "pairs" / "_problems.parquet")
        return run_build_pairs(PairsJobConfig(
            model=ModelConfig(name_or_path=sft_dir), problems=[probs], prm=prm["model_dir"],
            n_candidates=sz.pair_candidates, min_margin=sz.min_margin, score_with_objective=sz.score_with_objective,
            engine=cfg.engine, dpo=cfg.dpo, out_dir=str(run / "pairs"), ray=cfg.ray,
            ref_num_cpus=ray.cluster_resources().get("CPU", 1),  # scoring runs alone: every CPU of the local Ray
            sampling={"temperature": 1.0, "top_k": 50, "seed": 1}))

    pairs = stages.run("build_pairs", pairs_stage)

    def policy_stage(method: str) -> dict:
        from pipeline.train.mahdpo import run_fit_policy

        out = run / f"policy_{method}"
        # MODPO fits one weight vector: equal weights, the point the findings compare MAH-DPO at
        weights = {o: 1.0 for o in pairs["per_objective"]} if method == "modpo" else {}
        res = run_fit_policy(PolicyJobConfig(
            run_name=f"policy-{method}", output_dir=str(out), model=ModelConfig(name_or_path=sft_dir),
            data=DataConfig(paths=[str(run / "pairs")], eval_fraction=0.1), method=method, modpo_weights=weights,
            dpo=cfg.dpo, train=cfg.policy_train.model_copy(update={"storage_path": storage}), ray=cfg.ray))
        return {name: {"model_dir": r.export_dir, "steps": r.step,
                       "metrics": {k: v for k, v in r.metrics.items() if k.startswith("eval/")}} for name, r in res.items()}

    policies = {}
    for m in ("mahdpo", "single", "soup", "modpo"):
        policies[m] = stages.run(f"fit_policy_{m}", lambda m=m: policy_stage(m))
        release(f"policy-{m}*")

    def eval_stage() -> dict:
        from pipeline.eval.job import run_eval

        soup = {name: r["model_dir"] for name, r in policies["soup"].items()}
        guided = ({"prm": prm["model_dir"], "tasks": ["math_word"], "n_problems": sz.guided_problems,
                   "candidates": sz.guided_candidates, "policy_names": ["MAH-DPO"],
                   "dtype": "bfloat16" if cfg.engine.dtype == "bfloat16" else "float32"}
                  if sz.guided_problems else None)
        out = run_eval(EvalJobConfig(
            problems=[data["problems_eval"]], n_per_task=sz.eval_per_task, sweep_points=sz.sweep_points,
            engine=cfg.engine, out_dir=str(run / "eval"), guided=guided, ray=cfg.ray, policies=[
                {"name": "base", "kind": "hf", "path": base["model_dir"]},
                {"name": "sft", "kind": "hf", "path": sft_dir},
                {"name": "single-head DPO", "kind": "multihead", "path": policies["single"]["single"]["model_dir"]},
                {"name": "DPO soup", "kind": "soup", "paths": soup, "sweep": sz.sweep_soup},
                {"name": "MODPO", "kind": "multihead", "path": policies["modpo"]["modpo"]["model_dir"]},
                {"name": "MAH-DPO", "kind": "multihead", "path": policies["mahdpo"]["mahdpo"]["model_dir"],
                 "sweep": True}]))
        return {"markdown": out["markdown"], "plots": out["plots"], "rows": out["rows"], "fronts": out["fronts"]}

    ev = stages.run("eval", eval_stage)

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

    served = stages.run("serve", serve_stage) if cfg.serve_check else {}

    agreement = pair_agreement_of(run / "pairs", data["problems_train"])
    report = write_report(run, stages.timings, report_sections(cfg, sft, rollout, labels, prm, pairs, agreement, policies,
                                                               ev, served))
    for p in ev.get("plots", []):  # plots beside the report, so its image links work
        shutil.copy(p, run / Path(p).name)
    print(f"main: done. Report: {report}")
    return {"report": str(report), "eval": ev}


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
        + ", ".join(f"{r['task']}/{r['objective']} {r['mean']:.3f}" for r in sft) + "). A finding needs a score "
        "that can move; where every policy scores 0 there is nothing to improve or trade.",
        f"- Pairs: of {sum(tot.values())} pairs the PRM chose, the task's own verifier / judge prefers the chosen "
        f"response in {tot['agree']}, is indifferent in {tot['tie']} and prefers the rejected one in "
        f"{tot['disagree']}: where it is indifferent, DPO learns the PRM's preference, not the objective.",
        f"- Training: {pairs.get('pairs', 0)} pairs; optimizer steps " + ", ".join(f"{m} {n}" for m, n in steps.items())
        + " (1 epoch of the balanced cut).",
    ]
    se = [r["se"] for r in plain if r.get("se") is not None and not math.isnan(r["se"])]
    if se:
        lines.append(f"- Noise: n = {min(r['n'] for r in plain)}-{max(r['n'] for r in plain)} problems per cell; "
                     f"median standard error {sorted(se)[len(se) // 2]:.3f}.")
    return "\n".join(lines)


def pair_agreement_of(pairs_dir: Path, problems: str) -> dict:
    from pipeline.rollout.pairs import pair_agreement

    pairs = read_records([str(pairs_dir)], "preference")[0].to_pylist()
    return pair_agreement(pairs, {p["id"]: p for p in read_records([problems], "problem")[0].to_pylist()})


def report_sections(cfg, sft, rollout, labels, prm, pairs, agreement, policies, ev, served) -> dict[str, str]:
    from pipeline.eval.findings import findings
    from pipeline.eval.report import table
    from pipeline.train.prm_metrics import baseline_table

    m = sft["metrics"]
    prm_m = {k[len("eval/"):]: round(v, 4) for k, v in prm["metrics"].items() if k.startswith("eval/")}
    sections = {
        "SFT": f"{sft['steps']} optimizer steps; final train loss {m.get('loss', float('nan')):.4f}, "
               f"held-out loss {m.get('eval/loss', float('nan')):.4f}. Model: `{sft['model_dir']}`.",
        "Rollout and step labels": f"{rollout['trajectories']} trajectories; labels: "
                                   f"`{json.dumps(labels['summary'])}`",
        "PRM": f"{prm['steps']} steps; held-out steps, against the trivial baselines (AUROC 0.5, predicting "
               "the mean):\n\n" + baseline_table(prm["metrics"])
               + f"\n\nAll held-out metrics: `{json.dumps(prm_m)}`",
        "Pairs": f"`{json.dumps({k: v for k, v in pairs.items() if k != 'path'})}`\n\n"
                 "The PRM's pairs against the task's own verifier / judge (chosen scored higher, equal, lower):\n\n"
                 "| task/objective | agree | tie | disagree |\n|---|---:|---:|---:|\n"
                 + "\n".join(f"| {k} | {v.get('agree', 0)} | {v.get('tie', 0)} | {v.get('disagree', 0)} |"
                             for k, v in agreement.items()),
        "Policies": "\n".join(f"- {m_}: " + "; ".join(f"{n}: {r['steps']} steps, "
                                                      f"{json.dumps({k: round(v, 3) for k, v in r['metrics'].items()})}"
                                                      for n, r in res.items()) for m_, res in policies.items()),
        "Evaluation": table(ev["rows"]) + "\n\n" + "\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in ev["plots"]),
    }
    found = findings(ev["rows"])
    sections["The paper's findings in miniature"] = "\n".join(
        f"- **{k}** ({'holds' if h else 'does not hold' if h is not None else 'not measured'}): {text or '-'}"
        for k, (h, text) in found.items())
    sections["Why, from this run's data"] = diagnosis(ev["rows"], agreement, policies, pairs)
    if served:
        sections["Serve check"] = "\n".join(f"- weights {a['objective_weights']}: {a['text']!r}" for a in served["answers"])
    return sections


if __name__ == "__main__":
    main()
