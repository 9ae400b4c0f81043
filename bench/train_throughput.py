"""Training throughput against the machine's limit: the harness (Ray Train + DeepSpeed) against a bare
torch loop on the same model and batches, and both against the bf16 matmul peak.

    .venv/bin/python bench/train_throughput.py [--model smollm2-135m-instruct] [--steps 12] [--warmup 2]
                                               [--trainers sft,prm,mahdpo] [--no-harness]

Measured in one run, on the built-in tasks' data (SFT demonstrations; math demonstrations split into
steps with labels for the PRM; demonstration pairs for MAH-DPO, 3 heads), with the main job's settings
(jobs/configs/main.yaml: 2 workers, ZeRO-2, bf16, its micro-batches and lengths):
  peak     bf16 matmul GFLOP/s (2048 x 2048, all threads), the bound 6 x params FLOP per token is read against;
  bare     one process, the trainer's own model, collate and loss, bf16 weights, fused AdamW, the same
           optimizer-step batches the harness sees (micro-batch x workers x grad_accum examples);
  harness  the real fit (pipeline.train.harness.fit), its per-step times and token counts from metrics.jsonl
           and its start-up (launch -> first step) and export times from timings.json.
Per trainer it prints real (non-padding) and padded tokens/s, the share of the bf16 peak, the ratio
harness / bare, start-up and export. Step times are medians after --warmup; the spread (min-max of the
steady steps) is printed beside them, since this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def bf16_peak(n: int = 2048, reps: int = 20) -> float:
    """GFLOP/s of a bf16 n x n matmul (median of reps, after a warm-up)."""
    import torch

    a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


def main_settings(model: str):
    """The main job's training settings (jobs/configs/main.yaml), resolved."""
    from pipeline.config import MainJobConfig, load_config

    return load_config(MainJobConfig, os.path.join(os.path.dirname(__file__), "..", "jobs", "configs", "main.yaml"),
                       {"model.name_or_path": model})


def sft_rows(n: int) -> list[dict]:
    from pipeline.tasks import TASKS

    rows = []
    for t in TASKS.values():
        rows += [d for d in t.generate(n // len(TASKS) + 2, 0, "train")[1] if d.get("completion")]
    return rows[:n]


def datasets(trainer: str, cfg, model_dir: str, n: int, work: str):
    """(TrainSpec, Ray-free list of tokenised rows, the fit's extra kwargs) for one trainer."""
    import pyarrow as pa

    if trainer == "sft":
        from pipeline.train.sft import build_spec, tokenize_sft

        rows = sft_rows(n)
        t = tokenize_sft(pa.Table.from_pylist([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]),
                         model_dir, cfg.sft.max_length, cfg.sft.max_prompt_length)
        return build_spec(model_dir, cfg.train.bf16), t, cfg.train
    if trainer == "prm":
        from prm_training import examples

        from pipeline.train.prm import build_spec, tokenize_prm

        rows = [{"prompt": e["prompt"], "completions": e["completions"], "labels": [[x] for x in e["labels"]],
                 "prompt_key": json.dumps(e["prompt"])} for e in examples(n)]
        t = tokenize_prm(pa.Table.from_pylist(rows), model_dir, "<|step|>", 768)
        return build_spec(model_dir, ["accuracy"], ["hard"]), t, cfg.prm_train
    from mahdpo_step import OBJECTIVES, pairs

    from pipeline.train.mahdpo import build_spec, groups_table, tokenize_groups

    rows = pairs(n * len(OBJECTIVES))
    groups = [rows[i: i + len(OBJECTIVES)] for i in range(0, len(rows), len(OBJECTIVES))]
    t = tokenize_groups(groups_table(groups, {o: i for i, o in enumerate(OBJECTIVES)},
                                     {o: i for i, o in enumerate(OBJECTIVES)}), model_dir,
                        cfg.dpo.max_length, cfg.dpo.max_prompt_length)
    # no cached reference log-probs: the bare loop and the harness both compute them (the same work)
    return build_spec(model_dir, OBJECTIVES, OBJECTIVES, cfg.dpo, cfg.policy_train.bf16), t, cfg.policy_train


def count_tokens(batch: dict) -> tuple[int, int]:
    """(real, padded) tokens of a collated batch."""
    return int(batch["attention_mask"].sum()), int(batch["attention_mask"].numel())


def run_bare(spec, table, train_cfg, steps: int) -> dict:
    """The achievable bound: one process, the same optimizer-step batches, bf16 weights, fused AdamW."""
    import numpy as np
    import torch

    per_step = train_cfg.micro_batch_size * train_cfg.num_workers * train_cfg.grad_accum
    rows = table.to_pylist()
    model = spec.build_model().to(torch.bfloat16).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_cfg.lr, fused=True)
    times, real, padded = [], [], []
    for s in range(steps):
        chunk = [rows[(s * per_step + i) % len(rows)] for i in range(per_step)]
        batch = {}
        for k in chunk[0]:  # as Ray Data hands them: one array per row
            batch[k] = np.empty(len(chunk), dtype=object)
            batch[k][:] = [np.asarray(r[k]) if isinstance(r[k], list) else r[k] for r in chunk]
        b = spec.collate(batch)
        t0 = time.perf_counter()
        loss, _ = spec.loss(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        r, p = count_tokens(b)
        real.append(r)
        padded.append(p)
    return {"times": times, "real": real, "padded": padded}


def run_harness(trainer: str, spec, table, train_cfg, steps: int, work: str) -> dict:
    import ray

    from pipeline.train.harness import fit, read_metrics

    per_step = train_cfg.micro_batch_size * train_cfg.num_workers * train_cfg.grad_accum
    rows = table.to_pylist()
    n = per_step * steps
    rows = [rows[i % len(rows)] for i in range(n)]
    import pyarrow as pa

    ds = ray.data.from_arrow(pa.Table.from_pylist(rows, schema=table.schema))
    cfg = train_cfg.model_copy(update={"max_steps": steps, "epochs": 1, "log_every": 1, "checkpoint_every": 10**6,
                                       "storage_path": os.path.join(work, "ray"), "tracker": {"kind": "none"}})
    log_dir = os.path.join(work, trainer, "logs")
    t0 = time.time()
    fit(spec, cfg, {"train": ds}, run_name=f"bench-{trainer}", num_train_rows=n, log_dir=log_dir,
        export_dir=os.path.join(work, trainer, "model"))
    wall = time.time() - t0
    m = read_metrics(log_dir)
    timings = json.loads(open(os.path.join(log_dir, "timings.json")).read())
    return {"times": [r["step_time_s"] for r in m], "real": [r.get("tokens", float("nan")) for r in m],
            "padded": [r.get("tokens_padded", float("nan")) for r in m], "wall": wall, "timings": timings, "launch": t0}


def summary(r: dict, warmup: int) -> dict:
    steady = slice(warmup, None)
    t = r["times"][steady]
    med = statistics.median(t)
    tok = statistics.mean(r["real"][steady])
    pad = statistics.mean(r["padded"][steady])
    return {"step_s": med, "spread": (min(t), max(t)), "real_tps": tok / med, "padded_tps": pad / med,
            "pad_share": 1 - tok / pad}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--trainers", default="sft,prm,mahdpo")
    ap.add_argument("--no-harness", action="store_true")
    args = ap.parse_args()
    import torch

    from pipeline.models.registry import resolve_model

    cfg = main_settings(args.model)
    model_dir = resolve_model(args.model)
    work = tempfile.mkdtemp(prefix="bench-throughput-")
    peak = bf16_peak()
    print(f"bf16 matmul peak: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    if not args.no_harness:
        from pipeline.runtime import init_ray

        init_ray(cfg.ray)
    for trainer in args.trainers.split(","):
        spec, table, train_cfg = datasets(trainer, cfg, model_dir, 64, work)
        n_params = sum(p.numel() for p in spec.build_model().parameters())
        flop_tok = 6 * n_params
        bare = summary(run_bare(spec, table, train_cfg, args.steps), args.warmup)
        print(f"{trainer:7s} bare     {bare['real_tps']:.0f} tokens/s real, {bare['padded_tps']:.0f} padded "
              f"({bare['pad_share']:.0%} padding); step {bare['step_s']:.2f} s [{bare['spread'][0]:.2f}-"
              f"{bare['spread'][1]:.2f}]; {flop_tok * bare['real_tps'] / 1e9 / peak:.0%} of the bf16 peak (real tokens)")
        if args.no_harness:
            continue
        h = run_harness(trainer, spec, table, train_cfg, args.steps, work)
        hs = summary(h, args.warmup)
        tm = h["timings"]
        start = tm["first_step_end"] - tm["launch"] - h["times"][0]
        export = tm.get("export_end", float("nan")) - tm.get("export_start", float("nan"))
        print(f"{trainer:7s} harness  {hs['real_tps']:.0f} tokens/s real, {hs['padded_tps']:.0f} padded "
              f"({hs['pad_share']:.0%} padding); step {hs['step_s']:.2f} s [{hs['spread'][0]:.2f}-{hs['spread'][1]:.2f}]; "
              f"{flop_tok * hs['real_tps'] / 1e9 / peak:.0%} of the bf16 peak; {hs['real_tps'] / bare['real_tps']:.2f}x "
              f"the bare loop (target >= 0.9); start-up {start:.0f} s, export {export:.1f} s (target < 20 s together); "
              f"wall {h['wall']:.0f} s")


if __name__ == "__main__":
    main()
