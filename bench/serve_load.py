"""The steerable endpoint under load, with the shipped limits (issue 20, item 5).

    nice -n 19 flock /tmp/heavy.lock .venv/bin/python bench/serve_load.py [--model tiny|smollm2-135m-instruct]
        [--clients 256] [--per-client 2] [--requests 32] [--max-tokens 16] [--bad-share 0.05] [--retries 0]

Starts the Ray Serve app (pipeline/serve) as jobs.serve does, with the limits of jobs/configs/serve.yaml
(admission limit, Serve's queue and cap, batch size; ServeConfig's defaults where the YAML is silent:
batch_wait_timeout_s, retry_after_s); only the model is the bench's own, a 3-head policy built from
`--model`. Then:
  alone  `--requests` good requests sent one at a time: per-request latency;
  load   `--clients` asyncio clients on one aiohttp connection pool, each sending `--per-client` requests back
         to back: the same good requests (half with random objective_weights, a share streamed) and a
         share of bad ones (malformed JSON, a field of the wrong type, an unknown content part type,
         negative max_tokens, a lone surrogate).
Every answer is classified: 200 (a complete body or stream), 400 with OpenAI's error shape (the bad ones),
503 (OpenAI's error shape and Retry-After) or 429 (OpenAI's error shape): rejected; anything else, a
transport error included, is unexpected and printed. After the load the server must still answer.
Latency is end to end, as the client sees it (the server exposes no server-side time): under load an
admitted request includes its wait for a batch and, for a request admitted while the replica decodes
another batch, that wait too; the client's own event loop shares the cores. The criterion compares each
admitted request with the same request sent alone: (latency under load - batch wait) / latency alone.
Exit status 1 on any unexpected answer or when the server no longer answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import glob
import random
import re
import socket
import sys
import time
import uuid

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

OBJECTIVES = ["accuracy", "engagement", "concision"]
SERVE_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "jobs", "configs", "serve.yaml")
MODEL_NAME = "steer"
APP = "bench_load"  # the Serve application's name (its replica logs are replica_<APP>_*.log)
BAD_KINDS = ("malformed_json", "wrong_type", "unknown_part_type", "negative_max_tokens", "lone_surrogate")


# --- pure parts (unit-tested in tests/test_serve_load.py) -------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list: a value that was measured."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q={q} outside [0, 100]")
    xs = sorted(values)
    return xs[max(0, math.ceil(q / 100 * len(xs)) - 1)]


def openai_error(body: bytes) -> dict | None:
    """The {"error": {...}} of an OpenAI-shaped error body (message and type strings), or None."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return None
    return err


def complete_answer(body: bytes, stream: bool) -> bool:
    """A 200's body is a whole answer: a chat completion with a choice, or a stream of chunks ending
    in [DONE] with no error event in it."""
    if stream:
        events = [ln[len(b"data: "):] for ln in body.split(b"\n") if ln.startswith(b"data: ")]
        if not events or events[-1].strip() != b"[DONE]":
            return False
        return all(openai_error(e) is None for e in events[:-1])
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and bool(data.get("choices")) and "usage" in data


def classify(bad: bool, stream: bool, status: int | None, headers: dict[str, str],
             body: bytes) -> tuple[str, str | None]:
    """-> (category, why it is unexpected or None). Categories: ok (200, whole answer), bad_400 (a bad
    request's OpenAI-shaped 400), rejected (OpenAI-shaped 503 with Retry-After, or 429), unexpected.
    status None: the request failed in transport (body holds the error's text)."""
    if status is None:
        return "unexpected", f"transport error: {body.decode('utf-8', 'replace')[:300]}"
    text = body.decode("utf-8", "replace")[:300]
    if bad:
        if status == 400 and openai_error(body):
            return "bad_400", None
        return "unexpected", f"bad request answered {status}: {text}"
    if status == 200:
        if complete_answer(body, stream):
            return "ok", None
        return "unexpected", f"200 with an incomplete answer: {text}"
    if status in (503, 429):
        if openai_error(body) is None:
            return "unexpected", f"{status} without OpenAI's error shape: {text}"
        if status == 503 and not {k.lower() for k in headers} & {"retry-after"}:
            return "unexpected", f"503 without Retry-After: {text}"
        return "rejected", None
    return "unexpected", f"good request answered {status}: {text}"


def bad_body(kind: str, prompt: list[dict]) -> bytes:
    """One bad request body of `kind` (each must get a 400 naming what is wrong)."""
    base = {"model": MODEL_NAME, "messages": prompt, "max_tokens": 4}
    if kind == "malformed_json":
        return json.dumps(base).encode()[:-7]  # cut mid-document
    if kind == "wrong_type":
        return json.dumps({**base, "temperature": "hot"}).encode()
    if kind == "unknown_part_type":
        part = {"type": "image_url", "image_url": {"url": "http://127.0.0.1/x.png"}}
        return json.dumps({**base, "messages": [{"role": "user", "content": [part]}]}).encode()
    if kind == "negative_max_tokens":
        return json.dumps({**base, "max_tokens": -5}).encode()
    if kind == "lone_surrogate":  # json.dumps escapes it as \ud800: valid UTF-8 bytes, not valid Unicode
        return json.dumps({**base, "messages": [{"role": "user", "content": "hi \ud800 there"}]}).encode()
    raise ValueError(f"unknown bad request kind {kind!r}; known: {BAD_KINDS}")


def good_bodies(prompts: list[list[dict]], n: int, max_tokens: int, stream_share: float, seed: int) -> list[dict]:
    """n good requests over the prompts (cycled): even ones with random weights (a Dirichlet draw),
    odd ones on the default (equal) mix; a `stream_share` of them streamed (spread evenly). Greedy,
    so the same request decodes the same tokens alone and under load."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        b = {"model": MODEL_NAME, "messages": prompts[i % len(prompts)], "max_tokens": max_tokens, "temperature": 0}
        if i % 2 == 0:
            x = [rng.expovariate(1.0) for _ in OBJECTIVES]
            b["objective_weights"] = dict(zip(OBJECTIVES, (v / sum(x) for v in x)))
        if math.floor((i + 1) * stream_share) > math.floor(i * stream_share):
            b["stream"] = True
        out.append(b)
    return out


def load_plan(n_good: int, clients: int, per_client: int, bad_share: float, seed: int) -> list[list[tuple]]:
    """Each client's requests: ("good", pool index) or ("bad", kind); round(bad_share * total) bad ones
    at random places, the good ones cycling over the pool."""
    total = clients * per_client
    rng = random.Random(seed)
    bad_at = set(rng.sample(range(total), round(bad_share * total)))
    flat, g, b = [], 0, 0
    for i in range(total):
        if i in bad_at:
            flat.append(("bad", BAD_KINDS[b % len(BAD_KINDS)]))
            b += 1
        else:
            flat.append(("good", g % n_good))
            g += 1
    return [flat[c * per_client:(c + 1) * per_client] for c in range(clients)]


# Serve's replica access log: "... <request id> -- POST /v1/chat/completions 200 123.4ms" (the time from the
# replica taking the request to its last byte: parsing, admission, the batch wait, decoding; not the proxy)
_ACCESS = re.compile(r"\s(?P<rid>\S+) -- (?P<method>[A-Z]+) (?P<route>\S+) (?P<status>\S+) (?P<ms>[0-9.]+)ms\s*$")


def parse_access_log(lines) -> dict[str, tuple[str, float]]:
    """{request id: (status, seconds in the replica)} from the replica's access log lines."""
    out = {}
    for ln in lines:
        m = _ACCESS.search(ln)
        if m:
            out[m["rid"]] = (m["status"], float(m["ms"]) / 1000)
    return out


def _pct(xs: list[float], q: float) -> float | None:
    return percentile(xs, q) if xs else None


def _latency_stats(alone: list[dict], adm: list[dict], key: str, batch_wait_s: float, prefix: str) -> dict:
    """p50/p95 of `key` alone and for the admitted requests under load; (load - batch wait) / alone on
    the percentiles, and paired: each admitted request against the same request (pool index) alone."""
    a = [r[key] for r in alone if r["category"] == "ok" and r.get(key) is not None]
    b = [r[key] for r in adm if r.get(key) is not None]
    by_idx = {r["idx"]: r[key] for r in alone if r["category"] == "ok" and r.get(key)}
    paired = [(r[key] - batch_wait_s) / by_idx[r["idx"]] for r in adm if r.get(key) is not None and r["idx"] in by_idx]
    out = {f"{prefix}n_load": len(b)}
    for q in (50, 95):
        pa, pb = _pct(a, q), _pct(b, q)
        out[f"{prefix}alone_p{q}_s"], out[f"{prefix}load_p{q}_s"] = pa, pb
        out[f"{prefix}ratio_p{q}"] = (pb - batch_wait_s) / pa if pa and pb is not None else None
        out[f"{prefix}paired_ratio_p{q}"] = _pct(paired, q)
    for stream in (False, True):  # a stream decodes on its own in a thread, outside the batches: apart
        xs = [r[key] for r in adm if r["stream"] == stream and r.get(key) is not None]
        out[f"{prefix}load_p50_s_{'stream' if stream else 'batched'}"] = _pct(xs, 50)
    return out


def summarize(alone: list[dict], load: list[dict], load_wall_s: float, batch_wait_s: float) -> dict:
    """The numbers the bench prints, from the records of both phases (one_request's; `server_s`, the
    replica's time from its access log, where known). Keys "e2e_*": as the client sees it; "server_*":
    in the replica."""
    counts: dict[str, int] = {}
    for r in load:
        counts[r["category"]] = counts.get(r["category"], 0) + 1
    adm = [r for r in load if r["category"] == "ok"]
    good = [r for r in load if r["kind"] == "good"]
    rejected = [r for r in load if r["category"] == "rejected"]
    out = {"requests": len(load), "counts": counts, "unexpected": counts.get("unexpected", 0),
           "admitted": len(adm), "rejected": len(rejected),
           "rejected_share": len(rejected) / len(good) if good else 0.0,
           "admitted_rps": len(adm) / load_wall_s if load_wall_s > 0 else 0.0, "load_wall_s": load_wall_s,
           "batch_wait_s": batch_wait_s,
           # how long a refusal takes: the transit every request pays before admission
           "e2e_rejected_p50_s": _pct([r["latency_s"] for r in rejected], 50),
           "server_rejected_p50_s": _pct([r["server_s"] for r in rejected if r.get("server_s") is not None], 50)}
    out.update(_latency_stats(alone, adm, "latency_s", batch_wait_s, "e2e_"))
    out.update(_latency_stats(alone, adm, "server_s", batch_wait_s, "server_"))
    return out


def summary_line(s: dict, up: bool) -> str:
    def f(x, spec=".3f"):
        return "n/a" if x is None else format(x, spec)

    def lat(p):
        return (f"{p}p50/p95 alone {f(s[p + 'alone_p50_s'])}/{f(s[p + 'alone_p95_s'])} s, load "
                f"{f(s[p + 'load_p50_s'])}/{f(s[p + 'load_p95_s'])} s, paired (load - wait)/alone "
                f"p50 {f(s[p + 'paired_ratio_p50'], '.2f')} p95 {f(s[p + 'paired_ratio_p95'], '.2f')}")

    return (f"serve_load: {s['requests']} requests, admitted {s['admitted']} ({f(s['admitted_rps'], '.2f')} req/s), "
            f"rejected {f(100 * s['rejected_share'], '.1f')}%, bad->400 {s['counts'].get('bad_400', 0)}, "
            f"unexpected {s['unexpected']}; {lat('e2e_')}; {lat('server_')} (wait {s['batch_wait_s']} s); "
            f"server {'up' if up else 'DOWN'}")


# --- the clients -------------------------------------------------------------------------------------
async def one_request(session, url: str, body: bytes, *, bad: bool, stream: bool, idx) -> dict:
    """Send one body and classify the answer; latency to the answer's last byte. The request id is
    ours (Serve takes a client's x-request-id), to find the request in the replica's access log."""
    rid = uuid.uuid4().hex
    t0 = time.perf_counter()
    status, headers = None, {}
    try:
        async with session.post(url, data=body, headers={"content-type": "application/json", "x-request-id": rid}) as r:
            data = await r.read()
            status, headers = r.status, {k.lower(): v for k, v in r.headers.items()}
    except Exception as e:  # noqa: BLE001 - a transport failure is a finding, recorded and printed
        data = f"{type(e).__name__}: {e}".encode()
    lat = time.perf_counter() - t0
    cat, why = classify(bad, stream, status, headers, data)
    return {"kind": "bad" if bad else "good", "idx": idx, "stream": stream, "status": status, "category": cat,
            "problem": why, "latency_s": lat, "retry_after": headers.get("retry-after"), "rid": rid}


def _session(connections: int):
    """aiohttp, not httpx: at 256 connections httpx's pool spent ~20 ms of CPU per request here (10 s for
    512 requests, most of a core the server needs); aiohttp ~0.5 ms."""
    import aiohttp

    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=600, connect=60))


async def run_alone(url: str, bodies: list[dict]) -> list[dict]:
    async with _session(1) as session:
        return [await one_request(session, url, json.dumps(b).encode(), bad=False, stream=bool(b.get("stream")), idx=i)
                for i, b in enumerate(bodies)]


async def run_load(url: str, bodies: list[dict], plan: list[list[tuple]], prompts: list[list[dict]],
                   retries: int) -> tuple[list[dict], float, float]:
    """All clients at once on one pool sized to them; -> (records, wall seconds, this process's CPU
    seconds: the clients' own share of the cores the server also needs). With retries > 0 a
    rejected request is sent again after its Retry-After, as OpenAI's client does (each try recorded)."""
    records: list[dict] = []

    async def client_loop(session, c: int, reqs: list[tuple]):
        for j, (kind, x) in enumerate(reqs):
            bad = kind == "bad"
            body = bad_body(x, prompts[(c + j) % len(prompts)]) if bad else json.dumps(bodies[x]).encode()
            stream = not bad and bool(bodies[x].get("stream"))
            for attempt in range(retries + 1):
                r = await one_request(session, url, body, bad=bad, stream=stream, idx=x)
                r["client"], r["attempt"] = c, attempt
                records.append(r)
                if r["category"] != "rejected" or attempt == retries:
                    break
                await asyncio.sleep(float(r["retry_after"] or 1))

    async with _session(len(plan)) as session:
        t0, cpu0 = time.perf_counter(), time.process_time()
        await asyncio.gather(*(client_loop(session, c, reqs) for c, reqs in enumerate(plan)))
        return records, time.perf_counter() - t0, time.process_time() - cpu0


def still_up(base: str, body: dict) -> tuple[bool, str]:
    """The server answers /health and one request after the load."""
    import httpx

    try:
        h = httpx.get(f"{base}/health", timeout=60)
        r = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False}, timeout=300)
    except Exception as e:  # noqa: BLE001 - a dead server is what this checks
        return False, f"{type(e).__name__}: {e}"
    if h.status_code != 200 or r.status_code != 200:
        return False, f"/health {h.status_code}, chat {r.status_code}: {r.text[:300]}"
    batches = h.json().get("recent_batches", [])
    sizes = [b["size"] for b in batches]
    return True, (f"recent batches: {len(sizes)}, mean size {sum(sizes) / len(sizes):.2f}, max {max(sizes)}, "
                  f"max distinct mixes {max(b['mixes'] for b in batches)}" if sizes else "no batches recorded")


def attach_server_times(records: list[dict], app_name: str) -> int:
    """Each record's `server_s` from this Ray session's replica access logs; -> how many were found."""
    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()
    times: dict[str, tuple[str, float]] = {}
    for path in glob.glob(os.path.join(logs, "serve", f"replica_{app_name}_*.log")):
        with open(path, errors="replace") as f:
            times.update(parse_access_log(f))
    found = 0
    for r in records:
        t = times.get(r["rid"])
        r["server_s"] = t[1] if t else None
        found += t is not None
    return found


# --- setup -------------------------------------------------------------------------------------------
def serve_config(policy_dir: str, port: int, work_dir: str):
    """jobs/configs/serve.yaml's limits; only the model (and no PRM, no presets) is the bench's."""
    from pipeline.config import ServeConfig, load_config

    return load_config(ServeConfig, SERVE_YAML, {
        "model.name_or_path": policy_dir, "model_name": MODEL_NAME, "prm": None, "presets": {},
        "http_host": "127.0.0.1", "http_port": port, "work_dir": os.path.join(work_dir, "serve")})


def build_policy(model: str, work_dir: str) -> str:
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy
    from pipeline.models.registry import resolve_model

    model_dir = resolve_model(model)
    pdir = os.path.join(work_dir, "policy")
    if not os.path.exists(os.path.join(pdir, "heads.safetensors")):
        MultiHeadPolicy.from_sft(model_dir, OBJECTIVES).save(pdir, load_tokenizer(model_dir))
    return pdir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny (default) or smollm2-135m-instruct, or a local directory")
    ap.add_argument("--requests", type=int, default=32, help="good requests in the pool; each sent alone once")
    ap.add_argument("--clients", type=int, default=256)
    ap.add_argument("--per-client", type=int, default=2, help="requests each client sends back to back")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--stream-share", type=float, default=0.25)
    ap.add_argument("--bad-share", type=float, default=0.05)
    ap.add_argument("--retries", type=int, default=0, help="resend a rejected request after Retry-After, this often")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work-dir", default=None, help="default runs/bench_serve_load/<model>")
    ap.add_argument("--json", default=None, help="also write the summary and every request's record here")
    args = ap.parse_args()
    work_dir = args.work_dir or os.path.join("runs", "bench_serve_load", os.path.basename(args.model.rstrip("/")))

    import ray
    from ray import serve

    from pipeline.runtime import init_ray
    from pipeline.serve.app import build_app
    from pipeline.tasks import assistant

    pdir = build_policy(args.model, work_dir)
    cfg = serve_config(pdir, free_port(), work_dir)
    print(f"limits (jobs/configs/serve.yaml + ServeConfig defaults): max_ongoing_requests {cfg.max_ongoing_requests}, "
          f"serve_max_ongoing_requests {cfg.serve_max_ongoing_requests}, "
          f"max_queued_requests {cfg.max_queued_requests}, "
          f"max_batch_size {cfg.max_batch_size}, batch_wait_timeout_s {cfg.batch_wait_timeout_s}, "
          f"retry_after_s {cfg.retry_after_s}, num_replicas {cfg.num_replicas}", flush=True)
    init_ray(cfg.ray)
    up, note, found = False, "not started", 0
    try:
        serve.start(http_options={"host": cfg.http_host, "port": cfg.http_port})
        serve.run(build_app(cfg), name=APP, route_prefix="/")
        base = f"http://{cfg.http_host}:{cfg.http_port}"
        url = f"{base}/v1/chat/completions"
        problems, _ = assistant.generate(args.requests, args.seed, "eval")
        prompts = [p["prompt"] for p in problems]
        bodies = good_bodies(prompts, args.requests, args.max_tokens, args.stream_share, args.seed)
        asyncio.run(run_alone(url, bodies[:4]))  # warm-up: the first batches, the first stream
        alone = asyncio.run(run_alone(url, bodies))
        plan = load_plan(len(bodies), args.clients, args.per_client, args.bad_share, args.seed)
        load, wall, client_cpu = asyncio.run(run_load(url, bodies, plan, prompts, args.retries))
        up, note = still_up(base, bodies[0])
        time.sleep(2)  # the replica's last access-log lines
        found = attach_server_times(alone + load, APP)
    finally:
        serve.shutdown()
        ray.shutdown()
    s = summarize(alone, load, wall, cfg.batch_wait_timeout_s)
    bad_alone = [r for r in alone if r["category"] != "ok"]
    unexpected = [r for r in load if r["category"] == "unexpected"] + bad_alone
    for r in unexpected[:20]:
        print(f"UNEXPECTED {r['kind']} {r['idx']} stream={r['stream']}: {r['problem']}")
    print(f"alone: {len(alone)} requests one at a time; load: {args.clients} clients x {args.per_client} "
          f"(retries {args.retries}) in {wall:.1f} s (client CPU {client_cpu:.1f} s): {s['counts']}")
    print(f"replica times found for {found} of {len(alone) + len(load)} requests (Serve's access log)")
    for p, what in (("e2e_", "end to end"), ("server_", "in the replica")):
        print(f"{what}: alone p50 {s[p + 'alone_p50_s']} p95 {s[p + 'alone_p95_s']}; admitted under load p50 "
              f"{s[p + 'load_p50_s']} p95 {s[p + 'load_p95_s']} (batched p50 {s[p + 'load_p50_s_batched']}, "
              f"streamed p50 {s[p + 'load_p50_s_stream']}); rejected p50 {s[p + 'rejected_p50_s']}")
    print(f"after the load: {'up' if up else 'DOWN'} ({note})")
    print(summary_line({**s, "unexpected": len(unexpected)}, up), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": s, "client_cpu_s": client_cpu, "up": up, "note": note,
                       "unexpected": unexpected, "alone": alone, "load": load}, f, indent=1)
    return 0 if up and not unexpected else 1


if __name__ == "__main__":
    sys.exit(main())
