"""Training throughput against the machine's limit: the harness (Ray Train + DeepSpeed) against a bare
torch loop on the same model and batches, and both against the bf16 matmul peak.

    .venv/bin/python bench/train_throughput.py [--model smollm2-135m-instruct] [--steps 12] [--warmup 2]
                                               [--trainers sft,prm,mahdpo] [--layouts config,2x1,1x2] [--no-harness]

Measured in one run, on the built-in tasks' data (SFT demonstrations; math demonstrations split into
steps with labels for the PRM; demonstration pairs for MAH-DPO, 3 heads), with the main job's settings
(jobs/configs/main.yaml: 2 workers, ZeRO-2, bf16, its micro-batches and lengths):
  (FLOP per token: 6 x the parameters each token's matmuls use: no input embedding; the vocabulary
  projection for SFT and MAH-DPO, once per token)
  peak     matmul GFLOP/s (2048 x 2048, all threads) in bf16 and float32; the bound 6 x params FLOP per token
           is read against is the peak of the dtype training computes in (bf16: auto follows the CPU's bf16 units);
  bare     one process, the trainer's own model, collate and loss, weights in the compute dtype, fused AdamW, the same
           optimizer-step batches the harness sees (micro-batch x workers x grad_accum examples);
  harness  the real fit (pipeline.train.harness.fit), its per-step times and token counts from metrics.jsonl
           and its start-up (launch -> first step) and export times from timings.json.
Per trainer it prints real (non-padding) and padded tokens/s (tokens over time, summed over the steady
steps after --warmup), the share of the peak, the ratio harness / bare, start-up (by phase) and export.
The median step time and the spread (min-max of the steady steps) are printed beside them, since this
machine is shared and noisy.
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


def matmul_peak(dtype: str, n: int = 2048, reps: int = 20) -> float:
    """GFLOP/s of an n x n matmul in dtype: the fastest of reps, after a warm-up (a peak: on a shared
    machine the median moved from 60 to 117 GFLOP/s between runs, the best far less)."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, dtype=dt), torch.randn(n, n, dtype=dt)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


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


def packing(trainer: str, default: bool) -> bool:
    """A trainer name's packing: `<kind>-packed` / `<kind>-padded` force it, `<kind>` takes the config's."""
    return True if trainer.endswith("-packed") else False if trainer.endswith("-padded") else default


def datasets(trainer: str, cfg, model_dir: str, n: int, work: str):
    """(TrainSpec, Ray-free list of tokenised rows, the fit's extra kwargs) for one trainer."""
    import pyarrow as pa

    kind = trainer.split("-")[0]
    if kind == "sft":
        from pipeline.train.sft import build_spec, tokenize_sft

        rows = sft_rows(n)
        t = tokenize_sft(pa.Table.from_pylist([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]),
                         model_dir, cfg.sft.max_length, cfg.sft.max_prompt_length)
        return build_spec(model_dir, cfg.train.bf16, padding_free=packing(trainer, cfg.sft.padding_free)), t, cfg.train
    if kind == "prm":
        from prm_training import examples

        from pipeline.train.prm import build_spec, tokenize_prm

        rows = [{"prompt": e["prompt"], "completions": e["completions"], "labels": [[x] for x in e["labels"]],
                 "prompt_key": json.dumps(e["prompt"])} for e in examples(n)]
        t = tokenize_prm(pa.Table.from_pylist(rows), model_dir, "<|step|>", 768)
        from pipeline.config import PRMJobConfig

        return (build_spec(model_dir, ["accuracy"], ["hard"], padding_free=packing(trainer, PRMJobConfig().padding_free)),
                t, cfg.prm_train)
    from mahdpo_step import OBJECTIVES, pairs

    from pipeline.train.mahdpo import build_spec, groups_table, tokenize_groups

    rows = pairs(n * len(OBJECTIVES))
    groups = [rows[i: i + len(OBJECTIVES)] for i in range(0, len(rows), len(OBJECTIVES))]
    t = tokenize_groups(groups_table(groups, {o: i for i, o in enumerate(OBJECTIVES)},
                                     {o: i for i, o in enumerate(OBJECTIVES)}), model_dir,
                        cfg.dpo.max_length, cfg.dpo.max_prompt_length)
    # no cached reference log-probs: the bare loop and the harness both compute them (the same work);
    dpo = cfg.dpo.model_copy(update={"padding_free": packing(trainer, cfg.dpo.padding_free)})
    return build_spec(model_dir, OBJECTIVES, OBJECTIVES, dpo, cfg.policy_train.bf16), t, cfg.policy_train


def cell(x):
    """A row's value as Ray Data's numpy batches hold it: lists as arrays, ragged lists of lists as object
    arrays of arrays (MAH-DPO groups: one token list per objective)."""
    import numpy as np

    if not isinstance(x, list):
        return x
    if x and isinstance(x[0], list):
        out = np.empty(len(x), dtype=object)
        out[:] = [np.asarray(v) for v in x]
        return out
    return np.asarray(x)


def run_bare(spec, table, train_cfg, steps: int) -> dict:
    """The achievable bound: one process, the same optimizer-step batches, weights in the compute dtype,
    fused AdamW."""
    import numpy as np
    import torch

    from pipeline.models.precision import resolve_bf16
    from pipeline.train.harness import _count_tokens

    per_step = train_cfg.micro_batch_size * train_cfg.num_workers * train_cfg.grad_accum
    rows = table.to_pylist()
    dtype = torch.bfloat16 if resolve_bf16(train_cfg.bf16) else torch.float32  # the harness's compute dtype
    model = spec.build_model().to(dtype).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=train_cfg.lr, fused=True)
    times, real, padded = [], [], []
    for s in range(steps):
        chunk = [rows[(s * per_step + i) % len(rows)] for i in range(per_step)]
        batch = {}
        for k in chunk[0]:  # as Ray Data hands them: one array per row
            batch[k] = np.empty(len(chunk), dtype=object)
            batch[k][:] = [cell(r[k]) for r in chunk]
        b = spec.collate(batch)
        r, p = _count_tokens(b)
        t0 = time.perf_counter()
        loss, _ = spec.loss(model, b)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
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
    from pipeline.config import TrackerConfig

    cfg = train_cfg.model_copy(update={"max_steps": steps, "epochs": 1, "log_every": 1, "checkpoint_every": 10**6,
                                       "storage_path": os.path.join(work, "ray"), "tracker": TrackerConfig(kind="none")})
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
    # totals over the steady steps: steps differ in tokens (packed rows of different lengths), so a median
    # time against a mean token count would mix two different steps
    tok, pad = sum(r["real"][steady]), sum(r["padded"][steady])
    return {"step_s": med, "spread": (min(t), max(t)), "real_tps": tok / sum(t), "padded_tps": pad / sum(t),
            "pad_share": 1 - tok / pad}


def flop_per_token(model, lm_head: bool) -> int:
    """6 x the parameters a token passes through in matmuls (forward 2, backward 4): all but the input
    embedding (a lookup), plus the vocabulary projection when the trainer computes logits (SFT, DPO: it
    is the embedding, tied, in SmolLM2; counted on every token, an upper bound where only completion
    tokens are projected). The PRM reads hidden states: no vocabulary projection."""
    inner = next(m for m in (getattr(model, "base", None), getattr(model, "backbone", None), model)
                 if m is not None and hasattr(m, "get_input_embeddings"))
    n_emb = inner.get_input_embeddings().weight.numel()
    unique = {id(p): p.numel() for p in model.parameters()}
    heads = sum(p.numel() for n, p in model.named_parameters() if n.endswith("heads") or n.startswith("head_"))
    body = sum(unique.values()) - n_emb - heads  # multi-head policies: one head per token, not all of them
    return 6 * (body + (n_emb if lm_head else 0))


def layout(spec_: str, train_cfg) -> dict:
    """"WxC[mM][zZ]" -> W Ray Train workers of C CPUs each (Ray gives each worker C threads:
    OMP_NUM_THREADS), micro-batches of M rows (default: the config's), with the gradient accumulation
    that keeps the rows per optimizer step, and ZeRO stage Z (default: the config's)."""
    w, rest = spec_.split("x")
    rest, _, z = rest.partition("z")
    c, _, m = rest.partition("m")
    w, c, m = int(w), int(c), int(m) if m else train_cfg.micro_batch_size
    rows = train_cfg.num_workers * train_cfg.grad_accum * train_cfg.micro_batch_size
    if rows % (w * m):
        return None
    return {"num_workers": w, "resources_per_worker": {"CPU": c}, "micro_batch_size": m, "grad_accum": rows // (w * m),
            **({"zero_stage": int(z)} if z else {})}


PHASES = [("launch", "worker_start", "Ray Train: controller, worker group, process group"),
          ("worker_start", "distributed_ready", "imports (deepspeed, ...)"),
          ("distributed_ready", "model_built", "model"),
          ("model_built", "deepspeed_ready", "optimizer + deepspeed.initialize"),
          ("deepspeed_ready", "setup_done", "setup (reference model)"),
          ("setup_done", "first_batch", "first batch from Ray Data")]


def startup_phases(tm: dict, first_step_s: float) -> str:
    """Where the start-up goes, from the harness's timings.json marks (rank 0)."""
    out = [f"{what} {tm[b] - tm[a]:.1f} s" for a, b, what in PHASES if a in tm and b in tm]
    if "first_batch" in tm and "first_step_end" in tm:
        out.append(f"first step {tm['first_step_end'] - tm['first_batch']:.1f} s (median step {first_step_s:.1f} s)")
    return "; ".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    # sft, prm, mahdpo (the configs' padding_free); <kind>-packed / <kind>-padded force one or the other
    ap.add_argument("--trainers", default="sft,prm,mahdpo")
    # worker layouts to time: "2x1" = 2 workers of 1 CPU (ZeRO across them, gloo all-reduce), "1x2" = one
    # worker with 2 threads; "config" = the main job's own setting
    ap.add_argument("--layouts", default="config")
    ap.add_argument("--no-harness", action="store_true")
    args = ap.parse_args()
    import torch

    from pipeline.models.precision import resolve_bf16
    from pipeline.models.registry import resolve_model

    cfg = main_settings(args.model)
    model_dir = resolve_model(args.model)
    work = tempfile.mkdtemp(prefix="bench-throughput-")
    compute = "bfloat16" if resolve_bf16(cfg.train.bf16) else "float32"
    fp32 = matmul_peak("float32")
    # without bf16 units a 2048 bf16 matmul takes ~17 s: a smaller one says enough
    bf16 = matmul_peak("bfloat16", *((2048, 20) if compute == "bfloat16" else (512, 2)))
    peak = bf16 if compute == "bfloat16" else fp32
    print(f"matmul peak ({torch.get_num_threads()} threads): bf16 {bf16:.1f} GFLOP/s, float32 {fp32:.1f} GFLOP/s; "
          f"training computes in {compute} (bf16: {cfg.train.bf16}), so the bound is {peak:.0f} GFLOP/s", flush=True)
    if not args.no_harness:
        from pipeline.runtime import init_ray

        init_ray(cfg.ray)
    for trainer in args.trainers.split(","):
        spec, table, train_cfg = datasets(trainer, cfg, model_dir, 64, work)
        flop_tok = flop_per_token(spec.build_model(), lm_head=not trainer.startswith("prm"))
        # in a child process: its model, optimizer and reference (GBs in float32) are gone before the
        # harness's workers start, on a 24 GiB machine
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
            bare = summary(pool.submit(run_bare, spec, table, train_cfg, args.steps).result(), args.warmup)
        print(f"{trainer:7s} bare     {bare['real_tps']:.0f} tokens/s real, {bare['padded_tps']:.0f} padded "
              f"({bare['pad_share']:.0%} padding); step {bare['step_s']:.2f} s [{bare['spread'][0]:.2f}-"
              f"{bare['spread'][1]:.2f}]; {flop_tok * bare['real_tps'] / 1e9 / peak:.0%} of the {compute} peak "
              "(real tokens)", flush=True)
        if args.no_harness:
            continue
        for lay in args.layouts.split(","):
            upd = {} if lay == "config" else layout(lay, train_cfg)
            if upd is None:
                print(f"{trainer:7s} harness {lay}: skipped, the step's rows do not split into such micro-batches")
                continue
            tc = train_cfg.model_copy(update=upd)
            name = lay if lay != "config" else (f"{tc.num_workers}x{(tc.resources_per_worker or {}).get('CPU', 1):g}"
                                                f"m{tc.micro_batch_size} (config)")
            h = run_harness(trainer, spec, table, tc, args.steps, os.path.join(work, name))
            hs = summary(h, args.warmup)
            tm = h["timings"]
            start = tm["first_step_end"] - tm["launch"] - h["times"][0]
            export = tm.get("export_end", float("nan")) - tm.get("export_start", float("nan"))
            print(f"{trainer:7s} harness {name}  {hs['real_tps']:.0f} tokens/s real, {hs['padded_tps']:.0f} padded "
                  f"({hs['pad_share']:.0%} padding); step {hs['step_s']:.2f} s [{hs['spread'][0]:.2f}-"
                  f"{hs['spread'][1]:.2f}]; {flop_tok * hs['real_tps'] / 1e9 / peak:.0%} of the {compute} peak; "
                  f"{hs['real_tps'] / bare['real_tps']:.2f}x the bare loop (target >= 0.9); start-up {start:.0f} s, "
                  f"export {export:.1f} s (target < 20 s together); wall {h['wall']:.0f} s", flush=True)
            print(f"{trainer:7s} start-up {name}: {startup_phases(tm, hs['step_s'])}", flush=True)


if __name__ == "__main__":
    main()
