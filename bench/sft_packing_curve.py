"""The main job's SFT with and without packing: the same loss curve, and the time per step.

    .venv/bin/python bench/sft_packing_curve.py [--steps 24] [--out /tmp/sft_packing]

Runs the main job's SFT stage (`sft_config` of jobs/main.py: its data, model and train settings) twice,
`sft.padding_free` true then false, with the same seed, and prints per step the training loss of both
(they must agree to float tolerance: packing changes the layout, not the maths), the held-out loss of
both, and the mean time per step after 2 warm-up steps (docs/benchmarks.md, "Training throughput").
"""

from __future__ import annotations

import argparse
import json
import statistics

import ray

from jobs.common import parse_job_args, setup_logging
from jobs.main import sft_config
from pipeline.config import MainJobConfig
from pipeline.models.registry import resolve_model
from pipeline.runtime import init_ray
from pipeline.tasks import write_builtin
from pipeline.train.harness import read_metrics
from pipeline.train.sft import run_sft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--out", default="/tmp/sft_packing")
    args = ap.parse_args()
    setup_logging()
    curves, held = {}, {}
    for packed in (True, False):
        run = f"{args.out}/{'packed' if packed else 'padded'}"
        cfg = parse_job_args(MainJobConfig, "main.yaml", ["--run_dir", run, "--train.max_steps", str(args.steps),
                                                           "--train.checkpoint_every", "1000",
                                                           "--sft.padding_free", str(packed).lower()])
        data = write_builtin(f"{run}/data", cfg.tasks.n_train, cfg.tasks.n_eval, cfg.tasks.seed, cfg.tasks.names)
        init_ray(cfg.ray)
        r = run_sft(sft_config(cfg, resolve_model(cfg.model.name_or_path), data["sft_train"]))
        curves[packed] = read_metrics(r.log_dir)
        held[packed] = r.metrics.get("eval/loss")
        ray.shutdown()
    a, b = curves[True], curves[False]
    print("step  loss packed  loss padded  s/step packed  s/step padded")
    for x, y in zip(a, b):
        print(f"{x['step']:4d}  {x['loss']:.6f}  {y['loss']:.6f}  {x['step_time_s']:.1f}  {y['step_time_s']:.1f}")
    steady = lambda c: statistics.mean(m["step_time_s"] for m in c[2:])  # noqa: E731
    print(json.dumps({"max_abs_loss_diff": max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)),
                      "held_out_loss": {"packed": held[True], "padded": held[False]},
                      "s_per_step": {"packed": steady(a), "padded": steady(b)}, "speedup": steady(b) / steady(a)}))


if __name__ == "__main__":
    main()
