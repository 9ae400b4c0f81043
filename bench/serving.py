"""Serving throughput and latency: random per-request weights against one fixed head.

    .venv/bin/python bench/serving.py [--model smollm2-135m-instruct] [--requests 32] [--concurrency 8]

Starts the Ray Serve app (pipeline/serve) on local Ray with a 3-head policy built
from `--model`, then sends the same prompts twice with `--concurrency` clients:
  fixed   every request {accuracy: 1}: one head, all rows of a batch alike;
  random  every request its own random weight vector (Dirichlet): rows of a batch differ.
Prints requests/s, generated tokens/s, p50/p99 latency for both and the throughput
ratio random/fixed (target >= 0.85). The batch wait is 0.1 s so that each wave of
`--concurrency` requests forms one batch: with a shorter wait, arrival jitter can split
the first wave, the clients then stay out of step and every later batch is partial,
which changes the throughput by 2x from run to run whatever the weights.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import random
import socket
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def run_load(url: str, bodies: list[dict], concurrency: int) -> dict:
    import httpx

    def one(body):
        t0 = time.perf_counter()
        r = httpx.post(url, json=body, timeout=600)
        r.raise_for_status()
        return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"]

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(one, bodies))
    wall = time.perf_counter() - t0
    lat = sorted(x[0] for x in out)
    return {"rps": len(bodies) / wall, "tok_s": sum(x[1] for x in out) / wall,
            "p50": lat[len(lat) // 2], "p99": lat[min(len(lat) - 1, int(len(lat) * 0.99))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--work-dir", default="runs/bench_serving")
    args = ap.parse_args()
    import ray
    from ray import serve

    from pipeline.config import RayConfig, ServeConfig
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy
    from pipeline.models.registry import resolve_model
    from pipeline.runtime import init_ray
    from pipeline.serve.app import build_app
    from pipeline.tasks import assistant

    model_dir = resolve_model(args.model)
    pdir = os.path.join(args.work_dir, "policy")
    if not os.path.exists(os.path.join(pdir, "heads.safetensors")):
        MultiHeadPolicy.from_sft(model_dir, ["accuracy", "engagement", "concision"]).save(pdir, load_tokenizer(model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_ray(RayConfig())
    cfg = ServeConfig.model_validate({"model": {"name_or_path": pdir}, "model_name": "steer", "http_port": port,
                                      "max_ongoing_requests": args.concurrency, "max_queued_requests": -1,
                                      "max_batch_size": args.concurrency, "batch_wait_timeout_s": 0.1,
                                      "num_cpus": 1})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    problems, _ = assistant.generate(args.requests, 0, "eval")
    rng = random.Random(0)

    def body(p, w):
        return {"model": "steer", "messages": p["prompt"], "max_tokens": args.max_tokens, "temperature": 0,
                "objective_weights": w}

    run_load(url, [body(problems[0], {"accuracy": 1})] * 2, 2)  # warm-up
    res = {}
    for mode in ("fixed", "random", "fixed2"):
        bodies = []
        for p in problems:
            if mode == "random":
                x = [rng.expovariate(1.0) for _ in range(3)]
                bodies.append(body(p, dict(zip(["accuracy", "engagement", "concision"], x))))
            else:
                bodies.append(body(p, {"accuracy": 1.0}))
        r = run_load(url, bodies, args.concurrency)
        res[mode] = r
        print(f"{mode:7s} {r['rps']:.2f} req/s  {r['tok_s']:.1f} tok/s  p50 {r['p50']:.2f} s  p99 {r['p99']:.2f} s")
    fixed = (res["fixed"]["tok_s"] + res["fixed2"]["tok_s"]) / 2  # before and after: drift on a shared machine
    print(f"throughput random weights / fixed head: {res['random']['tok_s'] / fixed:.2f}x (target >= 0.85)")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
