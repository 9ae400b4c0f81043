"""The steerable endpoint: a Ray Serve application with an OpenAI-compatible API.

    GET  /health                  liveness, and the replica's last batches (size, distinct weight vectors)
    GET  /v1/models               the policy (its objectives in head order) and the presets
    POST /v1/chat/completions     chat; `stream: true` for server-sent events
    POST /v1/completions          raw prompt

Two extra request fields (pass them through `extra_body` with the openai client):
    objective_weights  {objective: weight}: the head mix; finite, >= 0, not all zero; normalised. Keys are
                       head ids (`math_word/accuracy`); a bare name (`concision`) names the one head
                       it ends; a name two heads end (`accuracy`) is a 400 listing both
    guidance           {candidates, max_steps, max_step_tokens, boundary, temperature}: PRM-guided decoding

Requests with different weights share one batch (`serve.batch`; each row has its own
mix). A preset (a fixed weight vector) is a merged single-head checkpoint served by
its own deployment through the rollout engine (vLLM), selected by passing its name as
`model`. Errors use OpenAI's shape: {"error": {"message", "type", "param", "code"}}, unknown routes,
wrong methods and the overload 503 (with Retry-After) included; bad input is a 4xx, never a 5xx.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import json
import os
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import GuidanceDefaults, ServeConfig
from pipeline.decoding.mixing import eos_ids

app = FastAPI(title="mahalo steerable endpoint")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers


def _error(status: int, message: str, param=None, kind="invalid_request_error", code=None,
           headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status,
                        headers=headers)


def install_error_handlers(api: FastAPI) -> FastAPI:
    """OpenAI's error shape for our errors and for those FastAPI / Starlette raise themselves
    (unknown route 404, wrong method 405 with its Allow header, request validation)."""

    @api.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return _error(e.status, e.message, e.param, e.kind, e.code, e.headers)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        return _error(e.status_code, f"{e.detail} ({request.method} {request.url.path})",
                      kind="server_error" if e.status_code >= 500 else "invalid_request_error", headers=e.headers)

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        e = validation_error(e.errors(), str(e))
        return _error(e.status, e.message, e.param)

    return api


install_error_handlers(app)

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes


class Admission:
    """Admission control in the replica: at most `limit` requests in flight (decoding, or waiting
    for a batch); one more is refused at once with an OpenAI-shaped 503 and Retry-After, so
    overload never queues without bound and never reaches Serve's plain-text 503."""

    def __init__(self, limit: int, retry_after_s: int):
        self.limit, self.retry_after_s, self.n = limit, retry_after_s, 0
        self._lock = threading.Lock()  # streams end in Starlette's threads

    def enter(self) -> "_Ticket":
        with self._lock:
            if self.n >= self.limit:
                raise APIError(503, f"the server is at its limit of {self.limit} requests in flight per replica; "
                               f"retry after {self.retry_after_s} s", kind="server_error", code="overloaded",
                               headers={"Retry-After": str(self.retry_after_s)})
            self.n += 1
        return _Ticket(self)

    def _leave(self):
        with self._lock:
            self.n -= 1


class _Ticket:
    """One admitted request; released once, when its answer is done (a stream: at its end, or when
    it is dropped unread)."""

    def __init__(self, admission: Admission):
        self._adm: Admission | None = admission

    def release(self):
        adm, self._adm = self._adm, None
        if adm is not None:
            adm._leave()

    __del__ = release


def _surrogate_path(data) -> str | None:
    """The first string (value or key) holding a lone surrogate (JSON "\\ud800" escapes decode to one; it
    is not Unicode, and the tokenizer fails on it), as a dotted path; None when there is none.
    Iterative: the body may be nested as deep as the JSON parser allows."""
    stack: list[tuple[tuple, Any]] = [((), data)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, str):
            if not _is_unicode(x):
                return ".".join(str(p) for p in path) or "body"
        elif isinstance(x, dict):
            for k in reversed(list(x)):
                if not _is_unicode(k):
                    return ".".join(str(p) for p in path + (k.encode("utf-8", "backslashreplace").decode(),))
                stack.append((path + (k,), x[k]))
        elif isinstance(x, list):
            stack.extend((path + (i,), v) for i, v in reversed(list(enumerate(x))))
    return None


def _is_unicode(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def parse_request(body: bytes, cls, max_body_bytes: int):
    """A request body as `cls`; every malformed body is a 4xx naming what is wrong (never a 500):
    over the size limit, not UTF-8, not JSON, nested too deep, lone surrogates, schema errors."""
    if len(body) > max_body_bytes:
        raise APIError(413, f"request body of {len(body)} bytes exceeds the limit of {max_body_bytes}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"body is not valid UTF-8 (byte {e.start}: {e.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise APIError(400, f"body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "body is not valid JSON: nested too deeply") from None
    bad = _surrogate_path(data)
    if bad is not None:
        raise APIError(400, f"{bad}: holds a lone surrogate (an unpaired \\ud800-\\udfff escape), not valid Unicode",
                       bad)
    try:
        return cls.model_validate(data)
    except Exception as e:  # pydantic.ValidationError
        raise validation_error(getattr(e, "errors", lambda: [])(), str(e)) from None


def validation_error(errors: list[dict], text: str) -> APIError:
    """A 400 naming the first invalid field (its dotted path; FastAPI's leading "body" dropped)."""
    first = errors[0] if errors else {"loc": [], "msg": text}
    param = ".".join(str(x) for x in first.get("loc", []) if x != "body") or None
    return APIError(400, f"{param}: {first.get('msg')}" if param else str(first.get("msg")), param)


def key_matches(header: str | None, key: str) -> bool:
    """The Authorization header against `Bearer <key>`, in constant time (no timing oracle on the key)."""
    return hmac.compare_digest((header or "").encode("utf-8", "surrogateescape"), f"Bearer {key}".encode("utf-8"))


def first_stop(text: str, stops: list[str]) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


class TextStream:
    """The text of a token stream as pieces safe to send: holds back an unfinished multi-byte
    character (decoded as U+FFFD) and the last len(longest stop) - 1 characters (a stop string
    split across tokens is never sent), and cuts the text before the first stop string."""

    def __init__(self, decode, stops: list[str]):
        self.decode, self.stops = decode, stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.decode(self.ids)
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.stopped = True
            return self._emit(text[:cut])
        if text.endswith("\ufffd"):  # wait for the character's other bytes
            return ""
        return self._emit(text[:len(text) - self.hold])

    def finish(self) -> str:
        """The rest, once decoding has ended (an unfinished character included: it is the answer's end)."""
        text = self.decode(self.ids)
        cut = first_stop(text, self.stops)
        if cut is not None:
            self.stopped, text = True, text[:cut]
        return self._emit(text)

    def _emit(self, upto: str) -> str:
        piece = upto[len(self.sent):]
        if piece:
            self.sent = upto
        return piece


class Guidance(BaseModel):
    model_config = ConfigDict(extra="forbid")
    candidates: int | None = Field(None, ge=1, le=16)
    max_steps: int | None = Field(None, ge=1, le=64)
    max_step_tokens: int | None = Field(None, ge=1, le=1024)
    boundary: Literal["blank_lines", "sentences", "turn"] | None = None
    temperature: float | None = Field(None, ge=0, le=2)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, v):
        """OpenAI's list form [{"type": "text", "text": ...}, ...]: the texts joined by newlines
        (as vLLM does); any other part type is refused, by its index."""
        if not isinstance(v, list):
            return v
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text" or not isinstance(part.get("text"), str):
                raise ValueError(f"content part {i} ({kind!r}) is not a text part {{'type': 'text', 'text': str}}; "
                                 "this model takes text only")
            texts.append(part["text"])
        return "\n".join(texts)


_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "n": 1, "stream": False}


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logprobs, ...)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # null means the default, as OpenAI takes it (filled in by _defaults)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=1)
    # a JSON integer (no true -> 1) in torch's range: beyond it manual_seed raises
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, strict=True)
    stream: bool | None = None
    stop: str | list[str] | None = None  # up to 4; the answer is cut before the first
    objective_weights: dict[str, float] | None = None
    guidance: Guidance | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @model_validator(mode="after")
    def _defaults(self):
        for k, v in _DEFAULTS.items():
            if getattr(self, k) is None:
                setattr(self, k, v)
        if self.stop is None:  # not given (a given null is [] already)
            self.stop = []
        return self


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)  # an empty prompt has no position to decode from


def check_weights(weights: dict[str, float] | None, objectives: list[str]) -> list[float]:
    """Normalised weights in head order (equal when absent); a bad vector is a 400 naming the field.
    Keys resolve to head ids (pipeline.objectives.resolve_keys): an ambiguous bare name is a 400."""
    from pipeline.models.multihead import validate_weights
    from pipeline.objectives import resolve_keys

    try:
        if weights is not None:
            weights = resolve_keys(weights, objectives, "objective")
        return validate_weights(weights if weights is not None else [1.0] * len(objectives), objectives)
    except ValueError as e:
        raise APIError(400, f"objective_weights: {e}", "objective_weights") from None


def prm_objective_map(mapping: dict[str, str], prm_objectives: list[str], heads: list[str]) -> dict[str, str]:
    """ServeConfig.prm_objectives ({PRM objective: policy head}) with both sides resolved to ids."""
    from pipeline.objectives import resolve_keys, resolve_objective

    if mapping and not prm_objectives:
        raise ValueError("prm_objectives is set but the server has no PRM (ServeConfig.prm)")
    return {k: resolve_objective(v, heads, f"prm_objectives[{k!r}]: head")
            for k, v in resolve_keys(mapping, prm_objectives, "prm_objectives key").items()}


@serve.deployment
class PresetLM:
    """One fixed weight vector as an ordinary merged checkpoint, on the rollout engine (vLLM)."""

    def __init__(self, model_dir: str, engine: dict):
        from pipeline.config import EngineConfig
        from pipeline.engines.pool import make_engine

        spec = EngineConfig.model_validate(engine)
        os.environ.update(spec.env)
        self.engine = make_engine(spec, model_dir)

    def complete(self, text: str, max_tokens: int, temperature: float, top_p: float, seed: int | None) -> str:
        return self.engine.complete([text], n=1, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                    seeds=None if seed is None else [seed])[0][0]


@serve.deployment
@serve.ingress(app)
class SteerableLM:
    def __init__(self, cfg: dict, presets: dict | None = None):
        import torch

        from pipeline.models.checkpoint import load_tokenizer
        from pipeline.models.multihead import MultiHeadPolicy

        self.cfg = ServeConfig.model_validate(cfg)
        self.device = self.cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.policy = MultiHeadPolicy.load(self.cfg.model.name_or_path, self.cfg.dtype).to(self.device).eval()
        self.tok = load_tokenizer(self.cfg.model.name_or_path)
        self.objectives = self.policy.objectives
        self.max_positions = getattr(self.policy.config, "max_position_embeddings", 4096)
        self.eos = eos_ids(self.tok, self.policy.config)
        self.prm = self.prm_tok = None
        if self.cfg.prm:
            from pipeline.models.prm import VectorPRM

            self.prm, self.prm_tok = VectorPRM.load(self.cfg.prm)
            self.prm.to(self.device).eval()
        self.prm_objectives = prm_objective_map(self.cfg.prm_objectives, self.prm.objectives if self.prm else [],
                                                self.objectives)
        self.presets = presets or {}
        self.api_key = None
        if self.cfg.api_key_env:
            self.api_key = os.environ.get(self.cfg.api_key_env)
            if not self.api_key:
                raise RuntimeError(f"api_key_env={self.cfg.api_key_env!r} is set but that environment variable is empty")
        self.admission = Admission(self.cfg.max_ongoing_requests, self.cfg.retry_after_s)
        self._batched.set_max_batch_size(self.cfg.max_batch_size)
        self._batched.set_batch_wait_timeout_s(self.cfg.batch_wait_timeout_s)
        # the last batches' sizes and distinct weight vectors, shown by /health (batching is observable)
        self.recent_batches: collections.deque = collections.deque(maxlen=32)

    # --- plumbing --------------------------------------------------------------------------
    async def _parse(self, request: Request, cls):
        self._check_auth(request)
        return parse_request(await request.body(), cls, self.cfg.max_body_bytes)

    def _check_auth(self, request: Request):
        if self.api_key is not None and not key_matches(request.headers.get("authorization"), self.api_key):
            raise APIError(401, "invalid or missing API key (Authorization: Bearer ...)", kind="authentication_error",
                           code="invalid_api_key")

    async def _admitted(self, answer):
        """Runs `answer` (a coroutine) as one admitted request; a stream holds its admission until it ends."""
        try:
            ticket = self.admission.enter()
        except APIError:
            answer.close()  # never started: no "never awaited" warning
            raise
        try:
            resp = await answer
        except BaseException:
            ticket.release()
            raise
        if not isinstance(resp, StreamingResponse):
            ticket.release()
            return resp

        async def held(body):
            try:
                async for chunk in body:
                    yield chunk
            finally:
                ticket.release()

        resp.body_iterator = held(resp.body_iterator)
        return resp

    def _max_new(self, req: _Common) -> int:
        max_new = req.max_completion_tokens or req.max_tokens or min(256, self.cfg.max_tokens_limit)
        if max_new > self.cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_new} exceeds this server's limit of {self.cfg.max_tokens_limit}",
                           "max_tokens")
        return max_new

    def _plan(self, req: _Common, prompt_ids: list[int]) -> dict:
        max_new = self._max_new(req)
        if len(prompt_ids) + max_new > self.max_positions:
            raise APIError(400, f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_new}) exceeds the model's "
                           f"context of {self.max_positions}", "max_tokens")
        weights = check_weights(req.objective_weights, self.objectives)
        return {"max_new": max_new, "weights": weights}

    # --- generation ------------------------------------------------------------------------
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _batched(self, jobs: list[dict]) -> list[list[int]]:
        """Requests with different weights (and lengths) in one batch; grouped only by sampling settings."""
        n = self.recent_batches[-1]["n"] + 1 if self.recent_batches else 1
        self.recent_batches.append({"n": n, "size": len(jobs), "mixes": len({tuple(j["weights"]) for j in jobs})})
        return await asyncio.to_thread(self._generate_many, jobs)

    def _generate_many(self, jobs: list[dict]) -> list[list[int]]:
        import torch

        from pipeline.decoding.mixing import generate

        out: list[Any] = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for i, j in enumerate(jobs):
            groups.setdefault((j["temperature"], j["top_p"]), []).append(i)
        for (temp, top_p), idx in groups.items():
            # each row its own generator (seeds): a request's sample does not depend on its batch
            res = generate(self.policy, [jobs[i]["prompt_ids"] for i in idx],
                           torch.tensor([jobs[i]["weights"] for i in idx]),
                           max_new_tokens=[jobs[i]["max_new"] for i in idx], eos_ids=self.eos,
                           pad_id=self.tok.pad_token_id, temperature=temp, top_p=top_p,
                           seeds=[jobs[i]["seed"] for i in idx])
            for i, r in zip(idx, res):
                out[i] = r
        return out

    def _guided(self, req: _Common, messages: list[dict], plan: dict) -> dict:
        from pipeline.decoding.guided import guided_generate

        if self.prm is None:
            raise APIError(400, "guidance needs a PRM; this server has none (ServeConfig.prm)", "guidance")
        g = {**GuidanceDefaults().model_dump(), **self.cfg.guidance.model_dump(),
             **req.guidance.model_dump(exclude_none=True)}
        w = dict(zip(self.objectives, plan["weights"]))
        prm_w = [w.get(self.prm_objectives.get(o, o), 0.0) for o in self.prm.objectives]
        if sum(prm_w) <= 0:
            raise APIError(400, f"the PRM scores {self.prm.objectives}; none of them has a positive weight in this request",
                           "guidance")
        r = guided_generate(self.policy, self.tok, self.prm, self.prm_tok, messages, weights=plan["weights"],
                            prm_weights=prm_w, candidates=g["candidates"], max_steps=g["max_steps"],
                            max_step_tokens=g["max_step_tokens"], max_new_tokens=plan["max_new"],
                            boundary=g["boundary"], temperature=g["temperature"], top_p=req.top_p,
                            seed=req.seed if req.seed is not None else 0)
        return {"ids": r.token_ids, "finished": r.finished, "steps": r.steps, "step_scores": r.step_scores}

    async def _complete(self, req: _Common, messages: list[dict] | None, prompt_text: str, chat: bool):
        prompt_ids = self.tok(prompt_text, add_special_tokens=False)["input_ids"]
        if not prompt_ids:
            raise APIError(400, "the prompt is empty after tokenization", "messages" if chat else "prompt")
        if req.model in self.presets:
            return await self._preset(req, prompt_text, prompt_ids, chat)
        if req.model != self.cfg.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; see /v1/models", "model", code="model_not_found")
        plan = self._plan(req, prompt_ids)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        extra = {"objective_weights": dict(zip(self.objectives, plan["weights"]))}
        if req.guidance is not None:
            if messages is None:
                messages = [{"role": "user", "content": prompt_text}]
            r = await asyncio.to_thread(self._guided, req, messages, plan)
            ids, finish = r["ids"], "stop" if r["finished"] else "length"
            extra["guidance"] = {"steps": r["steps"], "step_scores": r["step_scores"]}
        elif req.stream:
            return StreamingResponse(self._stream(req, prompt_ids, plan, rid, chat, extra), media_type="text/event-stream")
        else:
            ids = await self._batched({"prompt_ids": prompt_ids, "weights": plan["weights"], "max_new": plan["max_new"],
                                       "temperature": req.temperature, "top_p": req.top_p, "seed": req.seed})
            finish = "length" if len(ids) >= plan["max_new"] else "stop"
        text = self.tok.decode(ids, skip_special_tokens=True)
        cut = first_stop(text, req.stop)
        if cut is not None:  # usage still counts every token generated
            text, finish = text[:cut], "stop"
        if req.stream:  # guided: the whole answer as one chunk (the search picks whole steps)
            return StreamingResponse(self._one_chunk(rid, req.model, text, finish, chat, extra),
                                     media_type="text/event-stream")
        return self._response(rid, req.model, text, finish, len(prompt_ids), len(ids), chat, extra)

    async def _preset(self, req: _Common, prompt_text: str, prompt_ids: list[int], chat: bool):
        if req.objective_weights is not None or req.guidance is not None:
            raise APIError(400, f"model {req.model!r} is a preset with fixed weights; objective_weights and guidance "
                           f"apply to {self.cfg.model_name!r}", "model")
        max_new = self._max_new(req)
        text = await self.presets[req.model].complete.remote(prompt_text, max_new, req.temperature, req.top_p, req.seed)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        n_out = len(self.tok(text, add_special_tokens=False)["input_ids"])
        extra = {"objective_weights": self.cfg.presets[req.model]}
        finish = "length" if n_out >= max_new else "stop"
        cut = first_stop(text, req.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        if req.stream:
            return StreamingResponse(self._one_chunk(rid, req.model, text, finish, chat, extra),
                                     media_type="text/event-stream")
        return self._response(rid, req.model, text, finish, len(prompt_ids), n_out, chat, extra)

    def _response(self, rid, model, text, finish, n_prompt, n_out, chat, extra) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
                  else {"index": 0, "text": text, "finish_reason": finish, "logprobs": None})
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model, "choices": [choice],
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}, **extra}

    def _chunk(self, rid, model, piece, finish, chat, extra=None) -> str:
        if chat:
            choice = {"index": 0, "delta": {"content": piece} if piece is not None else {}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": finish}
        body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": model, "choices": [choice], **(extra or {})}
        return f"data: {json.dumps(body)}\n\n"

    def _one_chunk(self, rid, model, text, finish, chat, extra):
        if chat:
            yield self._chunk(rid, model, None, None, chat) .replace('"delta": {}', '"delta": {"role": "assistant"}')
        yield self._chunk(rid, model, text, None, chat, extra)
        yield self._chunk(rid, model, None, finish, chat)
        yield "data: [DONE]\n\n"

    def _stream(self, req, prompt_ids, plan, rid, chat, extra):
        """Token by token, text deltas decoded incrementally (a sync generator: Starlette runs it in a thread)."""
        import torch

        from pipeline.decoding.mixing import stream_tokens

        if chat:
            yield self._chunk(rid, req.model, None, None, chat).replace('"delta": {}', '"delta": {"role": "assistant"}')
        text = TextStream(lambda ids: self.tok.decode(ids, skip_special_tokens=True), req.stop)
        finish = "length"
        # seeds=[seed]: the same draws as this request would get in a batch (one generator per row)
        for step in stream_tokens(self.policy, [prompt_ids], torch.tensor([plan["weights"]]), max_new_tokens=plan["max_new"],
                                  eos_ids=self.eos, pad_id=self.tok.pad_token_id, temperature=req.temperature,
                                  top_p=req.top_p, seeds=[req.seed]):
            x = step[0]
            if x is None:
                break
            if x in self.eos:
                finish = "stop"
                break
            piece = text.push(x)
            if piece:
                yield self._chunk(rid, req.model, piece, None, chat, extra)
                extra = None  # the weights ride on the first content chunk
            if text.stopped:
                break
        # the held-back tail: a character cut by the end of decoding, text that was not a stop after all
        piece = "" if text.stopped else text.finish()
        if piece:
            yield self._chunk(rid, req.model, piece, None, chat, extra)
        yield self._chunk(rid, req.model, None, "stop" if text.stopped else finish, chat)
        yield "data: [DONE]\n\n"

    # --- routes ----------------------------------------------------------------------------
    @app.get("/health")
    def health(self):
        return {"status": "ok", "model": self.cfg.model_name, "objectives": self.objectives,
                "recent_batches": list(self.recent_batches)}

    @app.get("/v1/models")
    def models(self, request: Request):
        self._check_auth(request)
        data = [{"id": self.cfg.model_name, "object": "model", "created": 0, "owned_by": "mahalo",
                 "objectives": self.objectives, "guidance": self.prm is not None}]
        data += [{"id": name, "object": "model", "created": 0, "owned_by": "mahalo", "objective_weights": w}
                 for name, w in self.cfg.presets.items()]
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        req = await self._parse(request, ChatRequest)
        messages = [m.model_dump() for m in req.messages]
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return await self._admitted(self._complete(req, messages, text, chat=True))

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        req = await self._parse(request, CompletionRequest)
        return await self._admitted(self._complete(req, None, req.prompt, chat=False))


def build_app(cfg: ServeConfig):
    """The Serve application: the steerable policy plus one vLLM deployment per preset (merged on the driver)."""
    from pathlib import Path

    from pipeline.models.checkpoint import load_tokenizer
    from pipeline.models.multihead import MultiHeadPolicy

    # absolute paths: replicas do not run in the driver's working directory
    cfg = cfg.model_copy(update={
        "model": cfg.model.model_copy(update={"name_or_path": str(Path(cfg.model.name_or_path).resolve())}),
        "prm": str(Path(cfg.prm).resolve()) if cfg.prm else None})
    presets = {}
    if cfg.presets:
        from pipeline.objectives import resolve_keys

        policy = MultiHeadPolicy.load(cfg.model.name_or_path)
        tok = load_tokenizer(cfg.model.name_or_path)
        # keys as head ids, so /v1/models and responses show what each preset weighs
        cfg = cfg.model_copy(update={"presets": {name: resolve_keys(w, policy.objectives, f"presets.{name}: objective")
                                                 for name, w in cfg.presets.items()}})
        for name, w in cfg.presets.items():
            out = Path(cfg.work_dir) / "presets" / name
            # validates the weights (a bad preset fails here, by name); saved in the preset engine's dtype
            policy.export_merged(w, out, tok, dtype=cfg.preset_engine.dtype)
            eng = cfg.preset_engine
            presets[name] = PresetLM.options(name=f"preset-{name}", ray_actor_options={
                "num_cpus": eng.num_cpus, "num_gpus": eng.num_gpus}).bind(str(out.resolve()), eng.model_dump())
    actor = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus}
    if cfg.api_key_env:  # the key travels from the driver's environment to the replicas, never through config
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise ValueError(f"api_key_env={cfg.api_key_env!r}: set that environment variable to the API key")
        actor["runtime_env"] = {"env_vars": {cfg.api_key_env: key}}
    # Serve's cap far above the replica's admission limit (Admission): overload gets the replica's
    # OpenAI-shaped 503 with Retry-After, not Serve's plain-text one
    return SteerableLM.options(
        num_replicas=cfg.num_replicas, max_ongoing_requests=cfg.serve_max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests, ray_actor_options=actor,
    ).bind(cfg.model_dump(), presets)
