"""The steerable endpoint: `python -m jobs.serve --config jobs/configs/serve.yaml [--smoke]`.

Serves until interrupted. `--smoke` sends one prompt with two weight vectors through
the endpoint, prints both answers and exits (the main job's serve check).
"""

from __future__ import annotations

import json
import sys
import time

from jobs.common import start_job
from pipeline.config import ServeConfig


def smoke(cfg: ServeConfig, prompt: str = "What is 12 + 30? Explain briefly.") -> list[dict]:
    import httpx

    url = f"http://{cfg.http_host}:{cfg.http_port}{cfg.route_prefix.rstrip('/')}/v1/chat/completions"
    objectives = httpx.get(url.replace("/chat/completions", "/models"), timeout=60).json()["data"][0]["objectives"]
    out = []
    for i in (0, len(objectives) - 1):
        w = {o: (1.0 if j == i else 0.0) for j, o in enumerate(objectives)}
        r = httpx.post(url, json={"model": cfg.model_name, "messages": [{"role": "user", "content": prompt}],
                                  "max_tokens": 48, "temperature": 0, "objective_weights": w}, timeout=300)
        r.raise_for_status()
        out.append({"objective_weights": w, "text": r.json()["choices"][0]["message"]["content"]})
    return out


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    check = "--smoke" in argv
    if check:
        argv.remove("--smoke")
    cfg = start_job(ServeConfig, "serve.yaml", argv, "work_dir")
    from ray import serve

    from pipeline.serve.app import build_app

    serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
    serve.run(build_app(cfg), name="mahalo", route_prefix=cfg.route_prefix)
    print(f"serving {cfg.model_name} at http://{cfg.http_host}:{cfg.http_port}{cfg.route_prefix}v1 "
          f"(presets: {sorted(cfg.presets) or 'none'})", flush=True)
    if check:
        res = smoke(cfg)
        print(json.dumps(res, indent=1))
        serve.shutdown()
        return res
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
