"""PRM training throughput and peak memory: our vectorized PRM against TRL's PRMTrainer.

    bench/setup_trl.sh                       # once: .venv-trl with trl 1.12 (the last with PRMTrainer)
    .venv/bin/python bench/prm_training.py [--model smollm2-135m-instruct] [--steps 12] [--batch 4]

Same backbone, same examples (built-in math demonstrations split into steps, one
hard label per step), same micro-batch, max_length, learning rate, fp32, one
process on this machine, no gradient checkpointing on either side. Each side runs
in a fresh subprocess, so its peak RSS (ru_maxrss) is its own:
  ours  pipeline.train.prm (VectorPRM, the PRMCollate / prm_loss the harness uses) + torch AdamW;
  trl   trl.experimental.prm.PRMTrainer (AutoModelForTokenClassification, 2 labels), in .venv-trl.
Throughput is examples per second over the steps after `--warmup`. Prints
ours/trl for throughput (target > 1) and memory (target < 1).
The Ray Train + DeepSpeed harness adds its start-up (~35-50 s here) on top of our
side; that is a constant, not a per-step cost, and is not in these numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import report_child, run_side, run_trl, train_steps  # noqa: E402


def examples(n: int) -> list[dict]:
    import re

    from pipeline.tasks import math_word

    problems, demos = math_word.generate(n, 0, "train")
    out = []
    for i, (p, d) in enumerate(zip(problems, demos)):
        # demonstrations are short; their clauses are the steps
        steps = [s.strip() for s in re.split(r"(?<=[,.])\s+|\n+", d["completion"]) if s.strip()]
        out.append({"prompt": p["prompt"], "completions": steps, "labels": [float((i + t) % 3 != 0) for t in range(len(steps))]})
    return out


def run_ours(args) -> dict:
    import numpy as np
    import pyarrow as pa
    import torch

    from pipeline.models.registry import resolve_model
    from pipeline.train.prm import build_spec, tokenize_prm

    torch.manual_seed(0)
    model_dir = resolve_model(args.model)
    spec = build_spec(model_dir, ["accuracy"], ["hard"])
    rows = [{"prompt": e["prompt"], "completions": e["completions"], "labels": [[x] for x in e["labels"]],
             "prompt_key": json.dumps(e["prompt"])} for e in examples(args.batch * args.steps)]
    tok = tokenize_prm(pa.Table.from_pylist(rows), model_dir, "<|step|>", args.max_length).to_pylist()
    batches = []
    for s in range(args.steps):
        chunk = tok[s * args.batch: (s + 1) * args.batch]
        batch = {}
        for k in chunk[0]:  # as Ray Data hands them: one array per row
            batch[k] = np.empty(len(chunk), dtype=object)
            batch[k][:] = [np.asarray(r[k]) for r in chunk]
        batches.append(spec.collate(batch))
    return {"times": train_steps(spec, spec.build_model().float().train(), batches, args.lr)}


TRL_BODY = r'''
from transformers import AutoModelForTokenClassification
from trl.experimental.prm import PRMConfig, PRMTrainer
model = AutoModelForTokenClassification.from_pretrained(a["model_dir"], num_labels=2, dtype=torch.float32)
model.config.pad_token_id = tok.pad_token_id
ds = Dataset.from_list([{"prompt": tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True),
                         "completions": r["completions"], "labels": [bool(x) for x in r["labels"]]} for r in rows])
trainer = PRMTrainer(model=model, args=PRMConfig(step_separator="\n", **common), train_dataset=ds,
                     processing_class=tok, callbacks=[StepTimer()])
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side == "ours":
        return report_child(run_ours(args))
    if args.side == "trl":
        from pipeline.models.registry import resolve_model

        return report_child(run_trl(TRL_BODY, examples(args.batch * args.steps),
                                    {"model_dir": resolve_model(args.model), "batch": args.batch, "steps": args.steps,
                                     "max_length": args.max_length, "lr": args.lr}))
    res = {}
    for side in ("ours", "trl"):
        r = run_side(__file__, side, args)
        steady = r["times"][args.warmup:]
        res[side] = {"examples_per_s": args.batch * len(steady) / sum(steady), "peak_rss_mb": r["peak_rss_mb"]}
        print(f"{side:5s} {res[side]['examples_per_s']:.2f} examples/s   peak RSS {res[side]['peak_rss_mb']:.0f} MiB")
    print(f"throughput ours/trl: {res['ours']['examples_per_s'] / res['trl']['examples_per_s']:.2f}x   "
          f"peak memory ours/trl: {res['ours']['peak_rss_mb'] / res['trl']['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
