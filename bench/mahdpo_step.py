"""MAH-DPO cost: 3 heads against 1 head, and pairs per second against TRL's DPOTrainer.

    .venv/bin/python bench/mahdpo_step.py [--model smollm2-135m-instruct] [--pairs-per-step 6] [--steps 8]
                                          [--head-rank 16]
    (the TRL side needs bench/setup_trl.sh once; --no-trl skips it)

Pairs: built-in task demonstrations (math, assistant, tutoring), chosen = a
demonstration, rejected = another prompt's demonstration, tagged with 3 objectives
in turn. Every side: same model, pairs, micro-batch, max_length, lr, fp32, one
process, a fresh subprocess each (so ru_maxrss is its own peak):
  mh3   MultiHeadPolicy, 3 heads, balanced micro-batches, reference log-probs cached
        (computed once before training by the same code as jobs.build_pairs; timed
        separately and reported);
  mh1   the same with 1 head (single-head DPO in our code);
  lr3, lr1  with --head-rank r: the same with low-rank heads (frozen SFT head + rank-r change each);
  trl   trl.DPOTrainer (in .venv-trl), its default: a reference model run every step;
  trl_pre  trl.DPOTrainer with precompute_ref_log_probs=True (its precompute pass not timed).
Step times are medians over the steps after --warmup. Prints mh3/mh1 (and lr3/lr1) time and
memory (targets <= 1.10x, <= 1.05x) and our pairs/s over TRL's (target >= 1.5x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import report_child, run_side, run_trl, train_steps  # noqa: E402
OBJECTIVES = ["accuracy", "engagement", "concision"]


def pairs(n: int) -> list[dict]:
    from pipeline.tasks import TASKS

    demos = []
    for t in TASKS.values():
        demos += t.generate(max(4, n // 3 + 2), 0, "train")[1]
    demos = [d for d in demos if d.get("completion")]
    return [{"id": f"p{i}", "prompt": demos[i % len(demos)]["prompt"], "chosen": demos[i % len(demos)]["completion"],
             "rejected": demos[(i + 7) % len(demos)]["completion"], "objective": OBJECTIVES[i % 3]} for i in range(n)]


def run_ours(args, n_heads: int, head_rank: int = 0) -> dict:
    import numpy as np
    import torch

    from pipeline.config import DPOConfig
    from pipeline.models.registry import resolve_model
    from pipeline.train.mahdpo import build_spec, groups_table, tokenize_groups
    from pipeline.models.ref_logps import RefLogps

    torch.manual_seed(0)
    model_dir = resolve_model(args.model)
    rows = pairs(args.pairs_per_step * args.steps)
    t0 = time.perf_counter()
    c, r = RefLogps(model_dir, args.max_length, args.max_length // 2, micro_batch_size=args.pairs_per_step).logps(rows)
    ref_s = time.perf_counter() - t0
    for row, a, b in zip(rows, c, r):
        row["ref_chosen_logp"], row["ref_rejected_logp"] = a, b
    heads = OBJECTIVES[:n_heads]
    head_of = {o: (i % n_heads) for i, o in enumerate(OBJECTIVES)}
    dpo = DPOConfig(max_length=args.max_length, max_prompt_length=args.max_length // 2, head_rank=head_rank)
    spec = build_spec(model_dir, heads, OBJECTIVES, dpo, bf16=False)
    # balanced micro-batches: consecutive rows cycle through the 3 objectives already
    groups = [[rows[i]] for i in range(len(rows))]
    t = tokenize_groups(groups_table(groups, head_of, {o: i for i, o in enumerate(OBJECTIVES)}), model_dir,
                        args.max_length, args.max_length // 2).to_pylist()
    batches = []
    for s in range(args.steps):
        chunk = t[s * args.pairs_per_step: (s + 1) * args.pairs_per_step]
        batches.append(spec.collate({k: np.array([x[k] for x in chunk], dtype=object) for k in chunk[0]}))
    times = train_steps(spec, spec.build_model().train(), batches, args.lr)
    return {"times": times, "ref_precompute_s": ref_s}


TRL_BODY = r'''
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer
model = AutoModelForCausalLM.from_pretrained(a["model_dir"], dtype=torch.float32)
ds = Dataset.from_list([{"prompt": r["prompt"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
trainer = DPOTrainer(model=model, args=DPOConfig(beta=0.1, precompute_ref_log_probs=a["precompute"], **common),
                     train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pairs-per-step", type=int, default=6)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--lr", type=float, default=5e-6)
    ap.add_argument("--head-rank", type=int, default=0, help="also measure low-rank heads of this rank (lr1, lr3)")
    ap.add_argument("--no-trl", action="store_true")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:  # child process: one side, its own peak memory
        if args.side.startswith(("mh", "lr")):
            return report_child(run_ours(args, int(args.side[2:]), args.head_rank if args.side[:2] == "lr" else 0))
        from pipeline.models.registry import resolve_model

        return report_child(run_trl(TRL_BODY, pairs(args.pairs_per_step * args.steps), {
            "model_dir": resolve_model(args.model), "batch": args.pairs_per_step, "steps": args.steps,
            "max_length": args.max_length, "lr": args.lr, "precompute": args.side == "trl_pre"}))
    sides = ["mh1", "mh3"] + (["lr1", "lr3"] if args.head_rank else []) + ([] if args.no_trl else ["trl", "trl_pre"])
    res = {}
    for side in sides:
        r = run_side(__file__, side, args)
        step = statistics.median(r["times"][args.warmup:])
        res[side] = {"step_s": step, "pairs_per_s": args.pairs_per_step / step, "peak_rss_mb": r["peak_rss_mb"],
                     "ref_precompute_s": r.get("ref_precompute_s")}
        extra = f"   (reference log-probs precomputed in {r['ref_precompute_s']:.1f} s)" if r.get("ref_precompute_s") else ""
        print(f"{side:8s} step {step:.2f} s   {res[side]['pairs_per_s']:.2f} pairs/s   peak RSS {r['peak_rss_mb']:.0f} MiB{extra}")
    for three, one, what in (("mh3", "mh1", "full heads"), ("lr3", "lr1", f"heads of rank {args.head_rank}")):
        if three in res:
            print(f"3 heads / 1 head ({what}): time {res[three]['step_s'] / res[one]['step_s']:.3f}x (target <= 1.10)   "
                  f"memory {res[three]['peak_rss_mb'] / res[one]['peak_rss_mb']:.3f}x (target <= 1.05)")
    if not args.no_trl:
        for t in ("trl", "trl_pre"):
            print(f"pairs/s MAH-DPO (3 heads) / {t}: {res['mh3']['pairs_per_s'] / res[t]['pairs_per_s']:.2f}x (target >= 1.5)")


if __name__ == "__main__":
    main()
