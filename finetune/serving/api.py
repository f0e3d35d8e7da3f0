"""The HTTP front end: OpenAI's wire format over the engine. Validation and errors happen here, at the edge
(OpenAI's error JSON, the message naming the field); the engine only ever sees requests that can run."""

import asyncio
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from finetune.generation import SamplingConfig
from finetune.serving.engine import Engine, QueueFull
from finetune.serving.engine import Request as Job
from finetune.serving.handoff import Mailbox, Post
from finetune.serving.metrics import Metrics
from finetune.serving.text import TextOut


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        return JSONResponse(body, status_code=self.status)


# ------------------------------------------------------------------------------------------ request bodies
class StreamOptions(BaseModel):
    include_usage: bool = False


# OpenAI fields this server does not implement, with the values that ask for nothing (what clients send by default).
# Any other value is refused with a 400 naming the field: a penalty or logit bias silently not applied would change
# the answer the client asked for without saying so.
UNSUPPORTED: dict[str, tuple] = {
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0), "logit_bias": (None, {}),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "suffix": (None, ""), "tools": (None, []), "functions": (None, []), "response_format": (None, {"type": "text"}),
}  # fmt: skip


def _asks_nothing(value, neutral) -> bool:
    if isinstance(value, bool) or isinstance(neutral, bool):  # False == 0 in Python; not in JSON
        return value is neutral
    return value == neutral


def _unsupported(data: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        value = data.get(name)
        if not any(_asks_nothing(value, v) for v in neutral):
            raise APIError(400, f"{name}: not supported by this server (got {json.dumps(value)[:80]}); leave it out",
                           param=name)  # fmt: skip


class Common(BaseModel):
    """Fields both endpoints take; other fields are ignored (clients send OpenAI's whole vocabulary), except those of
    ``UNSUPPORTED`` set to a value that asks for something."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)  # an extension of OpenAI's API
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


class CompletionBody(Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default for completions


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatBody(Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ------------------------------------------------------------------------------------------ the app
@dataclass
class Served:
    """A model the server answers for: what ``inference.load`` gave, and the engine that batches it."""

    loaded: object
    engine: Engine


@dataclass
class State:
    name: str  # the served model's name (what /v1/models lists, what requests name)
    api_key: str | None = None
    max_tokens_limit: int | None = None
    max_body_bytes: int = 1 << 20
    models: dict[str, Served] = field(default_factory=dict)  # empty until loaded: /health answers 503
    metrics: Metrics = field(default_factory=Metrics)
    load_error: str | None = None
    post: Post | None = None  # hands the engines' events to the loop, made on the first request (the loop's)


def build_app(state: State) -> FastAPI:
    app = FastAPI(title="finetune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return e.response()

    @app.exception_handler(404)
    async def _not_found(request: Request, _):
        return APIError(404, f"no route {request.method} {request.url.path}", kind="not_found_error").response()

    @app.exception_handler(405)
    async def _method(request: Request, _):
        return APIError(405, f"{request.url.path} does not take {request.method}").response()

    @app.get("/health")
    async def health():
        if state.load_error:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if not state.models:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(state, request)
        created = int(time.time())
        data = [{"id": n, "object": "model", "created": created, "owned_by": "finetune"} for n in state.models]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _body(state, request, CompletionBody)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise APIError(400, f"prompt: one prompt per request, got a list of {len(prompts)}", param="prompt")
        served = _served(state, body.model)
        if not prompts[0]:
            raise APIError(400, "prompt: is empty", param="prompt")
        ids = served.loaded.encode(prompts[0])
        return await _run(state, request, served, body, ids, list(served.loaded.stop_ids), [], chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        from finetune.inference import chat_prompt

        body = await _body(state, request, ChatBody)
        served = _served(state, body.model)
        if served.loaded.model.is_encoder_decoder:  # as ``finetune chat`` refuses it (inference.Chat)
            raise APIError(400, f"model: {body.model} is an encoder-decoder (T5), which has no chat; send its input "
                           "to /v1/completions", param="model")  # fmt: skip
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not any(m["content"] for m in messages):
            raise APIError(400, "messages: every message is empty", param="messages")
        try:
            ids, stop_ids, eot = chat_prompt(served.loaded, messages)
        except ValueError as e:  # the template refused the conversation (roles out of order, ...)
            raise APIError(400, f"messages: {e}", param="messages") from None
        return await _run(state, request, served, body, ids, stop_ids, [eot] if eot else [], chat=True)

    return app


def _authorize(state: State, request: Request) -> None:
    if state.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), state.api_key.encode())
    if not ok:
        what = "no API key given" if not given else "the API key is wrong"
        raise APIError(401, f"{what}: send Authorization: Bearer KEY", kind="authentication_error")


async def _body(state: State, request: Request, schema: type[BaseModel]) -> BaseModel:
    """The request's JSON body, checked: authorized, within the size limit, valid JSON, fields of the right types."""
    _authorize(state, request)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > state.max_body_bytes:
        raise APIError(413, f"the request body is {length} bytes, over the limit of {state.max_body_bytes}")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > state.max_body_bytes:
            raise APIError(413, f"the request body is over the limit of {state.max_body_bytes} bytes")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    _unsupported(data)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "body"
        raise APIError(400, f"{where}: {err['msg']} (got {json.dumps(err.get('input'))[:80]})", param=where) from None


def _served(state: State, name: str) -> Served:
    if not state.models:
        raise APIError(503, "the model is still loading; retry when /health answers 200", kind="server_error")
    if name not in state.models:
        raise APIError(404, f"model: no model {name!r} here; this server serves {sorted(state.models)}",
                       param="model", kind="not_found_error")  # fmt: skip
    return state.models[name]


def _sampling(state: State, served: Served, body: Common, ids: list[int]) -> SamplingConfig:
    if body.n != 1:
        raise APIError(400, f"n: only n=1 is supported, got {body.n}", param="n")
    field_name = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
    model, draft = served.loaded.model, served.engine.draft
    if max_tokens is None:  # chat without a limit: what the context leaves, within --max-tokens-limit
        from finetune.generation import context_length

        ctx = min(context_length(m)[0] for m in (model, draft and draft.model) if m is not None)
        max_tokens = max(1, ctx - len(ids))
        if state.max_tokens_limit is not None:
            max_tokens = min(max_tokens, state.max_tokens_limit)
    elif state.max_tokens_limit is not None and max_tokens > state.max_tokens_limit:
        raise APIError(400, f"{field_name}: {max_tokens} is over this server's limit of {state.max_tokens_limit}",
                       param=field_name)  # fmt: skip
    try:
        served.engine.check(len(ids), max_tokens)  # the context (decoders), the source and decoder bounds (T5)
    except ValueError as e:
        raise APIError(400, f"{field_name}: {str(e).replace('max_new_tokens', field_name)}", param=field_name) from None
    return SamplingConfig(max_tokens, body.temperature, body.top_k, body.top_p, body.seed)


async def _run(state, request, served: Served, body: Common, ids, stop_ids, extra_stops, *, chat: bool):
    """Submits the job and answers: one JSON object, or a stream of server-sent events."""
    sampling = _sampling(state, served, body, ids)
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    loop = asyncio.get_running_loop()
    if state.post is None or state.post.loop is not loop:
        state.post = Post(loop)
    events = state.post.mailbox()
    job = Job(ids, sampling, stop_ids, TextOut(served.loaded.tokenizer, stops + extra_stops), events.put)
    try:
        served.engine.submit(job)
    except QueueFull as e:
        raise APIError(429, str(e), kind="rate_limit_error") from None
    meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": body.model}  # fmt: skip
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(_stream(served, job, events, meta, chat, usage), media_type="text/event-stream")
    text, event = [], {}
    try:
        while "finish_reason" not in event:
            for event in await events.take():
                if "error" in event:
                    raise APIError(500, event["error"], kind="server_error")
                if "text" in event:
                    text.append(event["text"])
    finally:
        served.engine.cancel(job)  # a no-op once finished; frees the row of a request whose client left
    out = "".join(text)
    choice = {"index": 0, "finish_reason": event["finish_reason"], "logprobs": None}
    choice |= {"message": {"role": "assistant", "content": out}} if chat else {"text": out}
    return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
            "usage": _usage(event)}  # fmt: skip


def _usage(event: dict) -> dict:
    p, c = event["prompt_tokens"], event["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _stream(served: Served, job: Job, events: Mailbox, meta: dict, chat: bool, include_usage: bool):
    """OpenAI's chunks as server-sent events, ``data: [DONE]`` last; an error mid-stream is a ``data: {"error"}``
    event. The events pending at once go out in one write. A client that disconnects cancels this generator: its
    row is freed at the engine's next step."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, *, role: bool = False) -> str:
        if chat:
            delta = ({"role": "assistant"} if role else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        return _sse({**meta, "object": obj, "choices": [choice]})

    try:
        if chat:
            yield chunk("", None, role=True)
        done = False
        while not done:
            out = []
            for event in await events.take():
                if "text" in event:
                    out.append(chunk(event["text"], None))
                    continue
                if "error" in event:
                    out.append(_sse({"error": {"message": event["error"], "type": "server_error", "code": 500}}))
                else:
                    out.append(chunk(None if chat else "", event["finish_reason"]))
                    if include_usage:
                        out.append(_sse({**meta, "object": obj, "choices": [], "usage": _usage(event)}))
                out.append("data: [DONE]\n\n")
                done = True
                break
            yield "".join(out)
    finally:
        served.engine.cancel(job)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
