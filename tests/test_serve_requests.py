"""The endpoint's request handling without Ray Serve: body parsing and validation, the OpenAI error
shape of FastAPI's own errors, admission control, the API-key check, streamed text pieces, and
per-request seeds in a shared batch (in process, on the tiny model)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.serve.app import (APIError, Admission, ChatRequest, CompletionRequest, TextStream, check_weights,
                                first_stop, install_error_handlers, key_matches, parse_request)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _body(**kw) -> bytes:
    return json.dumps({**CHAT, **kw}).encode()


def _refused(body: bytes, cls=ChatRequest, status=400) -> APIError:
    with pytest.raises(APIError) as e:
        parse_request(body, cls, 1 << 20)
    assert e.value.status == status, e.value.message
    return e.value


# --- malformed bodies: a 400 naming what is wrong, never an exception the server turns into a 500
@pytest.mark.parametrize("body,cls,param", [
    (b'{"model": "m", "messages": [{"role": "user", "content": "\xff\xfe"}]}', ChatRequest, None),  # not UTF-8
    (b'{"model": "m", "messages": [{"role": "user", "content": "a\\ud800b"}]}', ChatRequest, "messages.0.content"),
    (b'{"model": "m\\udfff", "messages": [{"role": "user", "content": "a"}]}', ChatRequest, "model"),
    (b'{"model": "m", "stop": ["x", "\\udc00"], "messages": [{"role": "user", "content": "a"}]}', ChatRequest, "stop.1"),
    (b'{"model": "m", "prompt": "\\ud83d"}', CompletionRequest, "prompt"),
    (b"[" * 100_000 + b"]" * 100_000, ChatRequest, None),  # RecursionError in json.loads
    (b'{"model": "m", "prompt": ""}', CompletionRequest, "prompt"),
    (_body(seed=2 ** 70), ChatRequest, "seed"),  # torch.Generator.manual_seed raises beyond 64 bits
    (_body(seed=-2 ** 63 - 1), ChatRequest, "seed"),
    (_body(seed=True), ChatRequest, "seed"),
    (_body(stop=["a", "b", "c", "d", "e"]), ChatRequest, "stop"),
    (_body(stop=""), ChatRequest, "stop"),
    (_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}]),
     ChatRequest, "messages.0.content"),
])
def test_malformed_bodies_are_400s_naming_the_field(body, cls, param):
    e = _refused(body, cls)
    assert e.param == param and e.message
    if param:
        assert e.message.startswith(param)


def test_refusals_say_why():
    assert "UTF-8" in _refused(b'{"model": "\xc3("}').message
    assert "nested too deeply" in _refused(b"{\"a\":" * 50_000 + b"1" + b"}" * 50_000).message
    assert "surrogate" in _refused(b'{"model": "\\ud800"}').message
    assert "part 1" in _refused(_body(messages=[{"role": "user", "content": [{"type": "text", "text": "a"},
                                                                               {"type": "image_url"}]}])).message
    with pytest.raises(APIError) as e:
        parse_request(b"x" * 5000, ChatRequest, 4096)
    assert e.value.status == 413


def test_what_openai_accepts_is_accepted():
    r = parse_request(_body(temperature=None, top_p=None, max_tokens=None, n=None, stream=None, seed=None, stop=None),
                      ChatRequest, 1 << 20)
    assert (r.temperature, r.top_p, r.n, r.stream, r.stop, r.seed) == (1.0, 1.0, 1, False, [], None)
    assert parse_request(_body(), ChatRequest, 1 << 20).stop == []  # absent: no stop strings
    assert parse_request(_body(stop="\n\n"), ChatRequest, 1 << 20).stop == ["\n\n"]
    assert parse_request(_body(seed=2 ** 64 - 1), ChatRequest, 1 << 20).seed == 2 ** 64 - 1  # the bounds themselves
    assert parse_request(_body(seed=-2 ** 63), ChatRequest, 1 << 20).seed == -2 ** 63
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "7 * 6?"}]
    r = parse_request(_body(messages=[{"role": "user", "content": parts}]), ChatRequest, 1 << 20)
    assert r.messages[0].content == "What is\n7 * 6?"


def test_weights_whose_sum_overflows_are_a_400():
    """1e308 + 1e308 = inf: every normalised weight would be 0 (x / inf), silently."""
    with pytest.raises(APIError) as e:
        check_weights({"a": 1e308, "b": 1e308}, ["a", "b"])
    assert e.value.status == 400 and e.value.param == "objective_weights" and "float range" in e.value.message
    assert check_weights({"a": 1e307, "b": 3e307}, ["a", "b"]) == pytest.approx([0.25, 0.75])


# --- FastAPI's own errors in OpenAI's shape
@pytest.fixture
def client():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    api = install_error_handlers(FastAPI())

    @api.post("/v1/thing")
    def thing(count: int):
        return {"count": count}

    @api.post("/v1/busy")
    def busy():
        raise APIError(503, "busy", kind="server_error", code="overloaded", headers={"Retry-After": "3"})

    return TestClient(api, raise_server_exceptions=False)


def _openai_error(r, status):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    return err


def test_unknown_routes_wrong_methods_and_validation_errors_use_the_openai_shape(client):
    err = _openai_error(client.post("/v1/nothing-here"), 404)
    assert "/v1/nothing-here" in err["message"] and err["type"] == "invalid_request_error"
    r = client.get("/v1/thing")
    _openai_error(r, 405)
    assert r.headers["allow"] == "POST"
    err = _openai_error(client.post("/v1/thing?count=many"), 400)
    assert err["param"] == "query.count"
    r = client.post("/v1/busy")
    assert _openai_error(r, 503)["code"] == "overloaded" and r.headers["retry-after"] == "3"


# --- admission control
def test_admission_refuses_past_its_limit_with_a_retry_after_503():
    adm = Admission(limit=2, retry_after_s=4)
    a, b = adm.enter(), adm.enter()
    with pytest.raises(APIError) as e:
        adm.enter()
    err = e.value
    assert (err.status, err.kind, err.code, err.headers) == (503, "server_error", "overloaded", {"Retry-After": "4"})
    a.release()
    a.release()  # released once only
    assert adm.n == 1
    c = adm.enter()
    del c  # a stream dropped unread still gives its place back
    b.release()
    assert adm.n == 0


def test_api_key_is_compared_in_constant_time(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert key_matches("Bearer k3y", "k3y") and not key_matches("Bearer k3", "k3y") and not key_matches(None, "k3y")
    assert not key_matches("Bearer \udcff", "k3y")  # odd header bytes: a refusal, not an exception
    assert calls and all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)


# --- streamed text pieces
def _decode(pieces: dict[int, bytes]):
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")


def _stream(tokens, decode, stops=()):
    s = TextStream(decode, list(stops))
    out = []
    for t in tokens:
        out.append(s.push(t))
        if s.stopped:
            break
    if not s.stopped:
        out.append(s.finish())
    return "".join(out), s.stopped, out


def test_a_stream_cut_inside_a_multibyte_character_sends_its_last_characters():
    """max_tokens reached after the first byte of "é": the plain answer ends in U+FFFD; so does the stream."""
    dec = _decode({0: b"ab", 1: b"\xc3", 2: b"\xa9c"})
    assert _stream([0, 1], dec)[0] == dec([0, 1]) == "ab\ufffd"
    assert _stream([0, 1, 2], dec)[0] == "ab\u00e9c"


def test_stop_strings_cut_the_text_and_are_never_sent_split_across_tokens():
    dec = _decode({0: b"hel", 1: b"lo w", 2: b"orld", 3: b" and more"})
    text, stopped, pieces = _stream([0, 1, 2, 3], dec, stops=["o wor"])
    assert text == "hell" and stopped and not any("o" in p for p in pieces)
    text, stopped, _ = _stream([0, 1, 2, 3], dec, stops=["xyz", "wo"])  # the earliest stop wins
    assert text == "hello " and stopped
    text, stopped, _ = _stream([0, 1, 2], dec, stops=["world!"])  # held back, then released at the end
    assert text == "hello world" and not stopped
    assert first_stop("a stop b", ["b", "stop"]) == 2 and first_stop("abc", []) is None


# --- per-request seeds: a row's sample does not depend on its batch
@pytest.mark.parametrize("top_p,bf16", [(1.0, "1"), (1.0, "0"), (0.9, "0")])
def test_a_seeded_request_gets_the_same_tokens_alone_and_in_any_batch(tiny_model_dir, monkeypatch, top_p, bf16):
    """top_p 1 with bf16 screening (Gumbel noise per row), without it, and nucleus sampling (multinomial per row)."""
    from pipeline.decoding.mixing import generate
    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy

    monkeypatch.setenv("MAHALO_BF16", bf16)
    torch.manual_seed(0)
    policy = MultiHeadPolicy.from_sft(tiny_model_dir, ["x", "y"], noise_std=0.3).eval()
    tok = load_tokenizer(tiny_model_dir)
    p1, p2, p3 = (tok(t, add_special_tokens=False)["input_ids"] for t in
                  ("Once upon a time", "The weather today is", "Numbers: 1, 2,"))
    kw = {"max_new_tokens": 8, "eos_ids": {tok.eos_token_id}, "pad_id": tok.pad_token_id, "temperature": 1.0,
          "top_p": top_p}
    w = torch.tensor([[0.7, 0.3]])
    alone = generate(policy, [p1], w, seeds=[11], **kw)[0]
    batch = generate(policy, [p2, p1, p3, p1], torch.tensor([[0.2, 0.8], [0.7, 0.3], [1.0, 0.0], [0.7, 0.3]]),
                     seeds=[5, 11, None, 11], **kw)
    assert batch[1] == alone and batch[3] == alone  # two requests with one seed no longer share a stream
    assert generate(policy, [p1], w, seeds=[12], **kw)[0] != alone  # the seed does matter
    greedy = dict(kw, temperature=0.0)
    assert generate(policy, [p1, p2], w.repeat(2, 1), seeds=[1, None], **greedy) == generate(
        policy, [p1, p2], w.repeat(2, 1), **greedy)


def test_serve_config_keeps_serves_cap_above_the_admission_limit():
    from pipeline.config import ServeConfig

    assert ServeConfig().serve_max_ongoing_requests > ServeConfig().max_ongoing_requests
    with pytest.raises(ValueError, match="serve_max_ongoing_requests"):
        ServeConfig(max_ongoing_requests=8, serve_max_ongoing_requests=8)
