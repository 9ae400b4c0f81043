"""SFT learning curve of the main job: held-out scores and loss against optimizer steps.

    .venv/bin/python scripts/sft_curve.py --out runs/sft_curve --steps 96 --snapshots 16,32,64 \
        --n_eval 64 [--lr 1e-4] [--config jobs/configs/main.yaml] [--seed 0]

One SFT run with the main job's settings (model, sft, train from the config; --lr / --steps override),
exporting snapshots at the given steps (train.export_steps), then the evaluation stage's own path
(vLLM, the main job's evaluation temperature unless --temperature, the tasks' judges) on the base model, each snapshot and the final model over the
first n_eval held-out problems per family. Writes <out>/curve.md (mean [95% CI] per cell and step, the
loss per step) and curve.json. What it is for: choosing SFT's length so the policy leaves the floor
(docs/main.md, "SFT long enough").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jobs.common import setup_logging
from jobs.main import sft_config
from pipeline.config import EvalJobConfig, MainJobConfig, load_config
from pipeline.models.registry import resolve_model
from pipeline.runtime import init_ray
from pipeline.tasks import write_builtin


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="jobs/configs/main.yaml")
    ap.add_argument("--out", default="runs/sft_curve")
    ap.add_argument("--steps", type=int, default=96)
    ap.add_argument("--snapshots", default="16,32,64")
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--n_eval", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=None, help="default: the config's sizes.eval_temperature")
    ap.add_argument("--skip_train", action="store_true", help="evaluate the snapshots of an earlier run")
    ap.add_argument("--only", default="", help="evaluate only these policies, e.g. sft@32,sft@96 (base, sft@<step>)")
    a = ap.parse_args()
    setup_logging()
    out = Path(a.out)
    snaps = [int(s) for s in a.snapshots.split(",") if s]
    cfg = load_config(MainJobConfig, a.config, {"run_dir": str(out), "tasks.seed": a.seed})
    if cfg.tasks.n_eval < a.n_eval:
        cfg = cfg.model_copy(update={"tasks": cfg.tasks.model_copy(update={"n_eval": a.n_eval})})
    train = {"max_steps": a.steps, "export_steps": snaps, "checkpoint_every": 16}
    if a.lr:
        train["lr"] = a.lr
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=train)})
    base = resolve_model(cfg.model.name_or_path)
    data = write_builtin(out / "data", cfg.tasks.n_train, cfg.tasks.n_eval, cfg.tasks.seed, cfg.tasks.names)
    init_ray(cfg.ray)
    t0 = time.time()
    if not a.skip_train:
        from pipeline.train.sft import run_sft

        run_sft(sft_config(cfg, base, data["sft_train"]))
    train_s = time.time() - t0
    sft_dir = out / "sft" / "model"
    policies = [{"name": "base", "kind": "hf", "path": base}]
    policies += [{"name": f"sft@{s}", "kind": "hf", "path": f"{sft_dir}_step{s}"} for s in snaps if s < a.steps]
    # the final model's step: --steps, or fewer where train.epochs ends the run first (plan_steps)
    logged = out / "sft" / "logs" / "metrics.jsonl"
    last = json.loads(logged.read_text().splitlines()[-1])["step"] if logged.exists() else a.steps
    policies += [{"name": f"sft@{last}", "kind": "hf", "path": str(sft_dir)}]
    if a.only:
        policies = [p for p in policies if p["name"] in a.only.split(",")]
    from pipeline.eval.job import run_eval

    t1 = time.time()
    temperature = cfg.sizes.eval_temperature if a.temperature is None else a.temperature
    ev = run_eval(EvalJobConfig(problems=[data["problems_eval"]], n_per_task=a.n_eval, policies=policies,
                                temperature=temperature, top_k=cfg.sizes.eval_top_k,
                                engine=cfg.engine, out_dir=str(out / "eval"), ray=cfg.ray))
    eval_s = time.time() - t1
    losses = [json.loads(l) for l in (out / "sft" / "logs" / "metrics.jsonl").read_text().splitlines()]
    cells = sorted({(r["task"], r["objective"]) for r in ev["rows"]})
    lines = [f"SFT curve: `{' '.join(__import__('sys').argv)}`; train {train_s:.0f} s, eval {eval_s:.0f} s "
             f"({len(policies)} policies, {a.n_eval} held-out problems per family, temperature {temperature}).", "",
             "| policy | " + " | ".join(f"{t}/{o.split('/')[-1]}" for t, o in cells) + " |",
             "|---|" + "---:|" * len(cells)]
    for pol in policies:
        got = {(r["task"], r["objective"]): r for r in ev["rows"] if r["policy"] == pol["name"]}
        lines.append(f"| {pol['name']} | " + " | ".join(
            f"{got[c]['mean']:.3f} [{got[c]['ci_low']:.2f}, {got[c]['ci_high']:.2f}]" if c in got else "-"
            for c in cells) + " |")
    lines += ["", "| step | train loss | held-out loss | tokens/s |", "|---:|---:|---:|---:|"]
    for m in losses:
        if m["step"] in snaps or m["step"] == last or m["step"] % 8 == 0 or m["step"] <= 2:
            lines.append(f"| {m['step']} | {m['loss']:.3f} | {m.get('eval/loss', float('nan')):.3f} | "
                         f"{m.get('tokens', 0) / max(m.get('step_time_s', 1), 1e-9):.0f} |")
    (out / "curve.md").write_text("\n".join(lines) + "\n")
    (out / "curve.json").write_text(json.dumps({"rows": ev["rows"], "losses": losses, "train_s": train_s,
                                                "eval_s": eval_s}, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
