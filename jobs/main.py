"""The main job: the whole pipeline on the built-in tasks, on local Ray (or a cluster).

    python -m jobs.main [--config jobs/configs/main.yaml] [--key value ...]
    python -m jobs.main --config jobs/configs/main_quick.yaml        # the quick profile

Stages: base_model (SmolLM2-135M-Instruct from its PyPI package), tasks (built-in
problems and demonstrations), sft, rollout, label_steps (+ math demonstration
trajectories), fit_prm, build_pairs, fit_policy (MAH-DPO, single-head DPO, DPO soup),
eval (base, SFT, baselines, MAH-DPO along a weight sweep, PRM-guided decoding),
serve (one prompt, two weight vectors, through the endpoint). Each finished stage
leaves a marker in <run_dir>/stages/, so running the job again resumes after the
last one. The report (<run_dir>/report.md) has the time per stage, each stage's
result, the evaluation tables and plots, and the paper's findings checked in miniature.
"""

from __future__ import annotations

import json
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

    base = stages.run("base_model", lambda: {"model_dir": resolve_model(cfg.model.name_or_path)})
    data = stages.run("tasks", lambda: write_builtin(run / "data", cfg.tasks.n_train, cfg.tasks.n_eval, cfg.tasks.seed,
                                                  cfg.tasks.names))
    init_ray(cfg.ray)

    def sft_stage() -> dict:
        r = run_sft(sft_config(cfg, base["model_dir"], data["sft_train"]))
        return {"model_dir": r.export_dir, "steps": r.step, "metrics": r.metrics}

    sft = stages.run("sft", sft_stage)
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

        trajs = [rollout["dir"]]
        if sz.demo_trajectories:
            demos = demo_trajectories(read_records([data["problems_train"]], "problem")[0].to_pylist(),
                                      read_records([data["sft_train"]], "sft")[0].to_pylist(), sz.demo_trajectories)
            trajs.append(str(Path(write_records(demos, run / "demo_trajectories" / "trajectories-00000.parquet",
                                                "trajectory")).parent))
        out = {}
        for i, t in enumerate(trajs):
            d = run / "labels" / f"part{i}"
            run_labeling(LabelJobConfig(model=ModelConfig(name_or_path=sft_dir), trajectories=[t],
                                        problems=[data["problems_train"]], mc=MCConfig(k=sz.label_k),
                                        engine=cfg.engine, out_dir=str(d), ray=cfg.ray))
            out[str(d)] = summarize(str(d))
        return {"dirs": list(out), "summary": out}

    labels = stages.run("label_steps", label_stage)

    def prm_stage() -> dict:
        from pipeline.train.prm import run_fit_prm

        r = run_fit_prm(PRMJobConfig(output_dir=str(run / "prm"), model=ModelConfig(name_or_path=sft_dir),
                                     data=DataConfig(paths=labels["dirs"], eval_fraction=0.2), max_length=768,
                                     train=cfg.prm_train.model_copy(update={"storage_path": storage}), ray=cfg.ray))
        return {"model_dir": r.export_dir, "steps": r.step, "metrics": r.metrics}

    prm = stages.run("fit_prm", prm_stage)

    def pairs_stage() -> dict:
        from pipeline.rollout.pairs import run_build_pairs

        probs = subset(data["problems_train"], sz.pair_problems, run / "pairs" / "_problems.parquet")
        return run_build_pairs(PairsJobConfig(
            model=ModelConfig(name_or_path=sft_dir), problems=[probs], prm=prm["model_dir"],
            n_candidates=sz.pair_candidates, min_margin=sz.min_margin, score_with_objective=sz.score_with_objective,
            engine=cfg.engine, dpo=cfg.dpo, out_dir=str(run / "pairs"), ray=cfg.ray,
            sampling={"temperature": 1.0, "top_k": 50, "seed": 1}))

    pairs = stages.run("build_pairs", pairs_stage)

    def policy_stage(method: str) -> dict:
        from pipeline.train.mahdpo import run_fit_policy

        out = run / f"policy_{method}"
        res = run_fit_policy(PolicyJobConfig(
            run_name=f"policy-{method}", output_dir=str(out), model=ModelConfig(name_or_path=sft_dir),
            data=DataConfig(paths=[str(run / "pairs")], eval_fraction=0.1), method=method, dpo=cfg.dpo,
            train=cfg.policy_train.model_copy(update={"storage_path": storage}), ray=cfg.ray))
        return {name: {"model_dir": r.export_dir, "steps": r.step,
                       "metrics": {k: v for k, v in r.metrics.items() if k.startswith("eval/")}} for name, r in res.items()}

    policies = {m: stages.run(f"fit_policy_{m}", lambda m=m: policy_stage(m)) for m in ("mahdpo", "single", "soup")}

    def eval_stage() -> dict:
        from pipeline.eval.job import run_eval

        soup = {name: r["model_dir"] for name, r in policies["soup"].items()}
        guided = ({"prm": prm["model_dir"], "tasks": ["math_word"], "n_problems": sz.guided_problems,
                   "candidates": sz.guided_candidates, "policy_names": ["MAH-DPO"]} if sz.guided_problems else None)
        out = run_eval(EvalJobConfig(
            problems=[data["problems_eval"]], n_per_task=sz.eval_per_task, sweep_points=sz.sweep_points,
            engine=cfg.engine, out_dir=str(run / "eval"), guided=guided, ray=cfg.ray, policies=[
                {"name": "base", "kind": "hf", "path": base["model_dir"]},
                {"name": "sft", "kind": "hf", "path": sft_dir},
                {"name": "single-head DPO", "kind": "multihead", "path": policies["single"]["single"]["model_dir"]},
                {"name": "DPO soup", "kind": "soup", "paths": soup, "sweep": True},
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

    report = write_report(run, stages.timings, report_sections(cfg, sft, rollout, labels, prm, pairs, policies, ev, served))
    for p in ev.get("plots", []):  # plots beside the report, so its image links work
        shutil.copy(p, run / Path(p).name)
    print(f"main: done. Report: {report}")
    return {"report": str(report), "eval": ev}


def report_sections(cfg, sft, rollout, labels, prm, pairs, policies, ev, served) -> dict[str, str]:
    from pipeline.eval.findings import findings
    from pipeline.eval.report import table

    m = sft["metrics"]
    prm_m = {k[len("eval/"):]: round(v, 4) for k, v in prm["metrics"].items() if k.startswith("eval/")}
    sections = {
        "SFT": f"{sft['steps']} optimizer steps; final train loss {m.get('loss', float('nan')):.4f}, "
               f"held-out loss {m.get('eval/loss', float('nan')):.4f}. Model: `{sft['model_dir']}`.",
        "Rollout and step labels": f"{rollout['trajectories']} trajectories; labels: "
                                   f"`{json.dumps(labels['summary'])}`",
        "PRM": f"{prm['steps']} steps; held-out metrics: `{json.dumps(prm_m)}`",
        "Pairs": f"`{json.dumps({k: v for k, v in pairs.items() if k != 'path'})}`",
        "Policies": "\n".join(f"- {m_}: " + "; ".join(f"{n}: {r['steps']} steps, "
                                                      f"{json.dumps({k: round(v, 3) for k, v in r['metrics'].items()})}"
                                                      for n, r in res.items()) for m_, res in policies.items()),
        "Evaluation": table(ev["rows"]) + "\n\n" + "\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in ev["plots"]),
    }
    found = findings(ev["rows"])
    sections["The paper's findings in miniature"] = "\n".join(
        f"- **{k}** ({'holds' if h else 'does not hold' if h is not None else 'not measured'}): {text or '-'}"
        for k, (h, text) in found.items())
    if served:
        sections["Serve check"] = "\n".join(f"- weights {a['objective_weights']}: {a['text']!r}" for a in served["answers"])
    return sections


if __name__ == "__main__":
    main()
