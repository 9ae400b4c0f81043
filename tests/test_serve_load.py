"""The pure parts of bench/serve_load.py: percentiles, answer classification, request plans, summary.
No Ray: the client meets a local aiohttp server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os

import pytest

_spec = importlib.util.spec_from_file_location(
    "serve_load", os.path.join(os.path.dirname(__file__), "..", "bench", "serve_load.py"))
sl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sl)

ERR = json.dumps({"error": {"message": "busy", "type": "server_error", "param": None, "code": "overloaded"}}).encode()
CHAT = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
STREAM = b'data: {"choices": [{"delta": {"content": "x"}}]}\n\ndata: [DONE]\n\n'


def test_percentile_nearest_rank():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert sl.percentile(xs, 50) == 3.0
    assert sl.percentile(xs, 95) == 5.0  # ceil(4.75) = 5th value, not an interpolation
    assert sl.percentile(xs, 0) == 1.0
    assert sl.percentile(list(range(1, 101)), 95) == 95
    with pytest.raises(ValueError):
        sl.percentile([], 50)
    with pytest.raises(ValueError):
        sl.percentile(xs, 101)


@pytest.mark.parametrize("bad,stream,status,headers,body,want", [
    (False, False, 200, {}, CHAT, "ok"),
    (False, True, 200, {}, STREAM, "ok"),
    (False, True, 200, {}, STREAM[:-len(b"data: [DONE]\n\n")], "unexpected"),  # cut stream
    (False, True, 200, {}, b"data: " + ERR + b"\n\ndata: [DONE]\n\n", "unexpected"),  # error event mid-stream
    (False, False, 200, {}, b'{"choices": []}', "unexpected"),
    (False, False, 503, {"Retry-After": "1"}, ERR, "rejected"),
    (False, False, 503, {}, ERR, "unexpected"),  # no Retry-After
    (False, False, 503, {"Retry-After": "1"}, b"Service Unavailable", "unexpected"),  # Serve's plain text
    (False, False, 429, {}, ERR, "rejected"),
    (False, False, 500, {}, ERR, "unexpected"),
    (False, False, 400, {}, ERR, "unexpected"),  # a good request refused
    (True, False, 400, {}, ERR, "bad_400"),
    (True, False, 400, {}, b"bad", "unexpected"),  # not OpenAI's shape
    (True, False, 500, {}, ERR, "unexpected"),
    (True, False, 503, {"Retry-After": "1"}, ERR, "unexpected"),  # parsed before admission: always a 400
    (False, False, None, {}, b"ConnectError: refused", "unexpected"),
])
def test_classify(bad, stream, status, headers, body, want):
    cat, why = sl.classify(bad, stream, status, headers, body)
    assert cat == want
    assert (why is None) == (want != "unexpected")


@pytest.mark.parametrize("kind", sl.BAD_KINDS)
def test_every_bad_body_is_a_400_of_the_app(kind):
    """Each bad kind is refused by the app's own parser with a 400 (so a 400 is the right expectation)."""
    from pipeline.serve.app import APIError, ChatRequest, parse_request

    with pytest.raises(APIError) as e:
        parse_request(sl.bad_body(kind, [{"role": "user", "content": "hi"}]), ChatRequest, 1 << 20)
    assert e.value.status == 400
    with pytest.raises(ValueError):
        sl.bad_body("nope", [])


def test_good_bodies_are_valid_and_mixed():
    from pipeline.serve.app import ChatRequest, parse_request

    bodies = sl.good_bodies([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], 32, 16, 0.25, 0)
    for b in bodies:
        parse_request(json.dumps(b).encode(), ChatRequest, 1 << 20)
    weighted = [b for b in bodies if "objective_weights" in b]
    assert len(weighted) == 16 and len({tuple(b["objective_weights"].values()) for b in weighted}) == 16
    assert sum(bool(b.get("stream")) for b in bodies) == 8
    assert bodies == sl.good_bodies([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], 32, 16,
                                    0.25, 0)


def test_load_plan_shares():
    plan = sl.load_plan(32, clients=256, per_client=2, bad_share=0.05, seed=0)
    assert len(plan) == 256 and all(len(p) == 2 for p in plan)
    flat = [x for p in plan for x in p]
    bad = [x for k, x in flat if k == "bad"]
    assert len(bad) == round(0.05 * 512) and set(bad) == set(sl.BAD_KINDS)
    assert {x for k, x in flat if k == "good"} == set(range(32))


def _rec(kind, idx, cat, lat, stream=False, server=None):
    return {"kind": kind, "idx": idx, "category": cat, "latency_s": lat, "stream": stream, "server_s": server}


def test_summarize_pairs_each_admitted_request_with_itself_alone():
    alone = [_rec("good", 0, "ok", 1.0, server=0.5), _rec("good", 1, "ok", 2.0, server=1.0)]
    load = [_rec("good", 0, "ok", 1.5, server=0.6), _rec("good", 1, "ok", 2.1, stream=True),  # no server time
            _rec("good", 1, "rejected", 0.01, server=0.002), _rec("good", 0, "rejected", 0.03),
            _rec("bad", "lone_surrogate", "bad_400", 0.01)]
    s = sl.summarize(alone, load, load_wall_s=4.0, batch_wait_s=0.1)
    assert s["admitted"] == 2 and s["rejected"] == 2 and s["unexpected"] == 0
    assert s["rejected_share"] == 0.5  # of the good requests; the bad one is not a rejection
    assert s["admitted_rps"] == 0.5
    assert s["e2e_paired_ratio_p50"] == pytest.approx(1.0)  # (2.1 - 0.1) / 2.0
    assert s["e2e_paired_ratio_p95"] == pytest.approx(1.4)  # (1.5 - 0.1) / 1.0
    assert s["e2e_ratio_p50"] == pytest.approx((1.5 - 0.1) / 1.0)
    assert s["e2e_load_p50_s_stream"] == 2.1 and s["e2e_load_p50_s_batched"] == 1.5
    assert s["e2e_rejected_p50_s"] == 0.01 and s["server_rejected_p50_s"] == 0.002
    # server side: only the requests found in the replica's log
    assert s["server_n_load"] == 1 and s["server_paired_ratio_p50"] == pytest.approx((0.6 - 0.1) / 0.5)
    assert s["server_load_p50_s_stream"] is None
    line = sl.summary_line(s, up=True)
    assert line.startswith("serve_load:") and "unexpected 0" in line and "server up" in line


def test_summarize_without_admitted_requests():
    s = sl.summarize([_rec("good", 0, "ok", 1.0)], [_rec("good", 0, "rejected", 0.01)], 1.0, 0.01)
    assert s["admitted"] == 0 and s["e2e_load_p50_s"] is None and s["e2e_paired_ratio_p50"] is None
    assert "n/a" in sl.summary_line(s, up=False) and "server DOWN" in sl.summary_line(s, up=False)


def test_parse_access_log():
    lines = [
        "INFO 2026-12-01 00:46:03,382 bench_load_SteerableLM 246woa6u e629abc -- POST /v1/chat/completions 200 110.6ms",
        "INFO 2026-12-01 00:46:03,384 bench_load_SteerableLM 246woa6u 0fcc-55 -- POST /v1/chat/completions 503 2.0ms\n",
        "INFO 2026-12-01 00:46:03,163 bench_load_SteerableLM 246woa6u 04ee -- GET /health 200 38.5ms",
        "ERROR 2026-12-01 00:46:04,000 bench_load_SteerableLM 246woa6u Request failed.",
    ]
    t = sl.parse_access_log(lines)
    assert t == {"e629abc": ("200", pytest.approx(0.1106)), "0fcc-55": ("503", pytest.approx(0.002)),
                 "04ee": ("200", pytest.approx(0.0385))}


def test_one_request_classifies_answers_and_transport_errors():
    """The client against a local aiohttp server (no Ray): whole answers, a 503 without Retry-After,
    a connection refused."""
    from aiohttp import web

    seen = []

    async def chat(request):
        seen.append(request.headers["x-request-id"])  # ours, to find the request in the replica's log
        body = json.loads(await request.read())
        if body.get("busy"):
            return web.Response(status=503, body=ERR, content_type="application/json")
        return web.Response(body=STREAM if body.get("stream") else CHAT, content_type="application/json")

    async def go():
        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with sl._session(4) as session:
                out = [await sl.one_request(session, f"http://127.0.0.1:{port}/v1/chat/completions",
                                            json.dumps(b).encode(), bad=False, stream=bool(b.get("stream")), idx=0)
                       for b in ({}, {"stream": True}, {"busy": True})]
                out.append(await sl.one_request(session, f"http://127.0.0.1:{sl.free_port()}/v1/chat/completions",
                                                b"{}", bad=False, stream=False, idx=0))
        finally:
            await runner.cleanup()
        return out

    ok, streamed, busy, fail = asyncio.run(go())
    assert ok["category"] == "ok" and streamed["category"] == "ok"
    assert seen == [ok["rid"], streamed["rid"], busy["rid"]] and len(set(seen)) == 3
    assert busy["category"] == "unexpected" and "Retry-After" in busy["problem"]
    assert fail["category"] == "unexpected" and fail["status"] is None and "transport error" in fail["problem"]
