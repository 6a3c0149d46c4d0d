"""The OpenAI-compatible HTTP server: `fp8lm serve MODEL ...`."""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fp8lm.engine.outputs import RequestOutput
from fp8lm.engine.sampling_params import SamplingParams, SamplingParamsError
from fp8lm.entrypoints.openai.async_engine import AsyncEngine, RequestTimeout
from fp8lm.entrypoints.openai.metrics import ServerMetrics
from fp8lm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from fp8lm.entrypoints.openai.tokenize_routes import add_tokenize_routes
from fp8lm.errors import EngineDeadError, FP8LMError
from fp8lm.version import __version__

DISCONNECT_POLL_S = 0.25

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_body(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class ApiKeyMiddleware:
    """'Authorization: Bearer KEY' on /v1/*, compared in constant time. Plain ASGI (not
    BaseHTTPMiddleware, which hides a client's disconnect from the handlers)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_body(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None,
              max_waiting_requests: int | None = None) -> FastAPI:
    """`max_waiting_requests`: beyond this many requests waiting for the engine, new ones get a 503
    with Retry-After (None: unbounded)."""
    app = FastAPI(title="fp8lm OpenAI-compatible server", version=__version__)
    metrics = ServerMetrics(model_name)
    state = _ServerState(engine, model_name, metrics, max_waiting_requests)
    engine.on_step = state.record_step

    if api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=api_key)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return error_body(400, f"{param or 'body'}: {first.get('msg')}", "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_body(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_body(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.get("/health")
    async def health():
        return state.health()

    @app.get("/version")
    async def version():
        return {"version": __version__}

    add_tokenize_routes(app, state, APIError)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        if engine.engine is not None:
            metrics.update_engine(engine.engine)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        state.require_ready()
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": state.started, "owned_by": "fp8lm",
            "root": str(engine.engine.model_path), "max_model_len": engine.engine.max_model_len}]}

    streamable = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                        "description": "A completion, or a stream of server-sent events when stream=true"}}

    @app.post("/v1/completions", responses=streamable)
    async def completions(body: CompletionRequest, request: Request):
        return await state.completions(body, request)

    @app.post("/v1/chat/completions", responses=streamable)
    async def chat(body: ChatCompletionRequest, request: Request):
        return await state.chat(body, request)

    return app


class _ServerState:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics, max_waiting: int | None):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.max_waiting = max_waiting
        self.started = int(time.time())
        self.submitted: dict[str, float] = {}        # request id -> when it was handed to the engine
        self.last_token_time: dict[str, float] = {}

    # ---- health ---------------------------------------------------------------------------------
    def health(self):
        if self.engine.error:
            return JSONResponse({"status": "error", "detail": self.engine.error}, status_code=503)
        if not self.engine.ready:
            return JSONResponse({"status": "starting"}, status_code=503)
        e = self.engine.engine
        started = e.last_step_started
        timeout = e.config.iteration_timeout_s
        if started is not None and timeout and time.monotonic() - started > timeout:
            return JSONResponse({"status": "error", "detail": "a model step is taking longer than "
                                 "FP8LM_ENGINE_ITERATION_TIMEOUT_S"}, status_code=503)
        return {"status": "ok"}

    def require_ready(self) -> None:
        if self.engine.error:
            raise APIError(503, self.engine.error, "service_unavailable")
        if not self.engine.ready:
            raise APIError(503, "the model is still loading / warming up", "service_unavailable")

    def record_step(self, outputs: list[RequestOutput], _elapsed: float) -> None:
        now = time.monotonic()
        for out in outputs:
            last = self.last_token_time.get(out.request_id)
            if last is None:
                self.metrics.labels(self.metrics.ttft).observe(now - self.submitted.pop(out.request_id, now))
            else:
                self.metrics.labels(self.metrics.itl).observe(now - last)
            self.last_token_time[out.request_id] = now
            if out.finished:
                self.last_token_time.pop(out.request_id, None)
                arrived, scheduled = out.metrics.get("arrival_time"), out.metrics.get("first_scheduled_time")
                if arrived is not None:      # the engine's clock is time.monotonic() too
                    self.metrics.labels(self.metrics.e2e).observe(now - arrived)
                    if scheduled is not None:
                        self.metrics.labels(self.metrics.queue_time).observe(scheduled - arrived)
                for o in out.outputs:
                    self.metrics.requests.labels(model_name=self.model_name, finished_reason=o.finish_reason).inc()

    # ---- shared request handling ------------------------------------------------------------------
    def check_model(self, body: SamplingFields) -> None:
        self.require_ready()
        if body.model is not None and body.model != self.model_name:
            raise APIError(404, f"model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    def sampling_params(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None) -> SamplingParams:
        fields = dict(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                      seed=body.seed, presence_penalty=body.presence_penalty,
                      frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty)
        try:
            return SamplingParams(
                **{k: v for k, v in fields.items() if v is not None}, stop=body.stop,
                stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, max_tokens=max_tokens,
                min_tokens=body.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs)
        except SamplingParamsError as e:
            raise APIError(400, str(e), param=e.param) from None

    async def start(self, prompts: list, params: SamplingParams, base_id: str, **kwargs):
        """Submits every prompt and waits for each one's first output, so that a rejected request is
        a 400 before any streaming starts. Returns [(generator, first output)]."""
        waiting = self.engine.num_waiting()
        if self.max_waiting is not None and waiting + len(prompts) > self.max_waiting:
            raise APIError(503, f"{waiting} requests are waiting, the server takes at most --max-waiting-requests="
                                f"{self.max_waiting}; retry later", "service_unavailable", headers={"Retry-After": "1"})
        started = []
        try:
            for i, prompt in enumerate(prompts):
                self.submitted[f"{base_id}-{i}"] = time.monotonic()
                gen = self.engine.generate(f"{base_id}-{i}", prompt, params, **kwargs)
                started.append(gen)
                first = await gen.__anext__()
                started[-1] = (gen, first)
        except BaseException as e:
            for item in started:
                await (item[0] if isinstance(item, tuple) else item).aclose()
            raise _as_api_error(e) from None
        return started

    async def finish(self, started, request: Request) -> list[RequestOutput]:
        """Every request's final output; a client that disconnects meanwhile aborts them (the
        engine stops computing for nobody)."""
        return await _unless_disconnected(request, self._collect(started))

    @staticmethod
    async def _collect(started) -> list[RequestOutput]:
        finals = []
        try:
            for gen, out in started:
                while not out.finished:
                    out = await gen.__anext__()
                finals.append(out)
        except BaseException as e:
            for gen, _ in started:
                await gen.aclose()
            raise _as_api_error(e) from None
        return finals

    # ---- /v1/completions ----------------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request):
        self.check_model(body)
        prompts = _prompt_list(body.prompt)
        echo_lp = body.logprobs if body.echo and body.logprobs is not None else None
        scoring = body.max_tokens == 0      # echo's prompt logprobs only: one token is run and dropped
        if scoring and not body.echo:
            raise APIError(400, "max_tokens: 0 is only allowed with echo (scoring the prompt)", param="max_tokens")
        params = self.sampling_params(body, 1 if scoring else body.max_tokens, body.logprobs, echo_lp)
        base_id = f"cmpl-{uuid.uuid4().hex}"
        started = await _unless_disconnected(request, self.start(prompts, params, base_id))
        tok = self.engine.engine.tokenizer
        if body.stream:
            if scoring:
                raise APIError(400, "max_tokens: 0 is not supported with stream", param="max_tokens")
            return _sse(self._stream_completions(started, body, params, base_id, tok))
        finals = await self.finish(started, request)
        choices = []
        for p_index, out in enumerate(finals):
            for o in out.outputs:
                prefix = (out.prompt or "") if body.echo else ""
                entries, token_ids = _echoed(out, o, scoring) if body.echo else (o.logprobs, o.token_ids)
                choices.append({"index": p_index * body.n + o.index, "text": prefix + ("" if scoring else o.text),
                                "logprobs": _completion_logprobs(entries, token_ids, tok) if body.logprobs is not None
                                else None, "finish_reason": "length" if scoring else o.finish_reason,
                                "stop_reason": None if scoring else o.stop_reason})
        return {"id": base_id, "object": "text_completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": _usage(finals)}

    async def _stream_completions(self, started, body, params, base_id, tok) -> AsyncIterator[str]:
        created = int(time.time())
        sent: dict[int, tuple[int, int]] = {}
        finals: dict[int, RequestOutput] = {}
        async for p_index, out in _merge(started):
            for o in out.outputs:
                index = p_index * body.n + o.index
                text_sent, tokens_sent = sent.get(index, (0, 0))
                echo_now = body.echo and index not in sent          # the prompt goes out with the first chunk
                text_delta_prefix = (out.prompt or "") if echo_now else ""
                upto = _stream_upto(o.text, params, o.finish_reason is not None)
                delta = o.text[text_sent:upto]
                new_tokens = o.token_ids[tokens_sent:]
                if not (delta or echo_now or o.finish_reason) and index in sent:
                    continue
                sent[index] = (max(text_sent, upto), len(o.token_ids))
                lp = None
                if body.logprobs is not None and o.logprobs is not None:
                    entries = o.logprobs[tokens_sent:]
                    if echo_now:
                        entries, new_tokens = (out.prompt_logprobs or []) + entries, out.prompt_token_ids + new_tokens
                    lp = _completion_logprobs(entries, new_tokens, tok)
                yield _chunk({"id": base_id, "object": "text_completion", "created": created, "model": self.model_name,
                              "choices": [{"index": index, "text": text_delta_prefix + delta, "logprobs": lp,
                                           "finish_reason": o.finish_reason}]})
            if out.finished:
                finals[p_index] = out
        if body.stream_options and body.stream_options.include_usage:
            yield _chunk({"id": base_id, "object": "text_completion", "created": created, "model": self.model_name,
                          "choices": [], "usage": _usage(list(finals.values()))})
        yield "data: [DONE]\n\n"

    # ---- /v1/chat/completions -----------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request: Request):
        self.check_model(body)
        tok = self.engine.engine.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so it has no chat template", param="messages")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
        try:
            prompt = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in body.messages],
                                             body.add_generation_prompt)
        except Exception as e:  # jinja errors (e.g. roles that must alternate) are the client's
            raise APIError(400, f"messages: the chat template rejected them: {e}", param="messages") from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        params = self.sampling_params(body, body.max_completion_tokens or body.max_tokens, logprobs, None)
        base_id = f"chatcmpl-{uuid.uuid4().hex}"
        started = await _unless_disconnected(request, self.start([prompt], params, base_id, add_special_tokens=False))
        if body.stream:
            return _sse(self._stream_chat(started, body, params, base_id, tok))
        finals = await self.finish(started, request)
        out = finals[0]
        choices = [{"index": o.index, "message": {"role": "assistant", "content": o.text},
                    "logprobs": _chat_logprobs(o.logprobs, o.token_ids, tok, body.top_logprobs or 0)
                    if body.logprobs else None, "finish_reason": o.finish_reason, "stop_reason": o.stop_reason}
                   for o in out.outputs]
        return {"id": base_id, "object": "chat.completion", "created": int(time.time()), "model": self.model_name,
                "choices": choices, "usage": _usage(finals)}

    async def _stream_chat(self, started, body, params, base_id, tok) -> AsyncIterator[str]:
        created = int(time.time())
        sent: dict[int, tuple[int, int]] = {}
        final = None
        head = {"id": base_id, "object": "chat.completion.chunk", "created": created, "model": self.model_name}
        async for _, out in _merge(started):
            for o in out.outputs:
                if o.index not in sent:
                    yield _chunk({**head, "choices": [{"index": o.index, "delta": {"role": "assistant", "content": ""},
                                                       "logprobs": None, "finish_reason": None}]})
                    sent[o.index] = (0, 0)
                text_sent, tokens_sent = sent[o.index]
                upto = _stream_upto(o.text, params, o.finish_reason is not None)
                delta = o.text[text_sent:upto]
                if not delta and not o.finish_reason:
                    continue
                sent[o.index] = (max(text_sent, upto), len(o.token_ids))
                lp = _chat_logprobs(o.logprobs[tokens_sent:], o.token_ids[tokens_sent:], tok, body.top_logprobs or 0) \
                    if body.logprobs and o.logprobs is not None else None
                yield _chunk({**head, "choices": [{"index": o.index, "delta": {"content": delta} if delta else {},
                                                   "logprobs": lp, "finish_reason": o.finish_reason}]})
            if out.finished:
                final = out
        if body.stream_options and body.stream_options.include_usage and final is not None:
            yield _chunk({**head, "choices": [], "usage": _usage([final])})
        yield "data: [DONE]\n\n"


def _as_api_error(e: BaseException) -> BaseException:
    if isinstance(e, SamplingParamsError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, RequestTimeout):
        return APIError(504, str(e), "timeout")
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), "service_unavailable")
    if isinstance(e, FP8LMError):
        return APIError(400, str(e))
    return e


async def _unless_disconnected(request: Request, work):
    """Awaits `work` unless the client goes away first; then cancels it (its generators abort their
    requests) and answers 499, which nobody reads."""
    task = asyncio.ensure_future(work)

    async def gone():
        while not await request.is_disconnected():
            await asyncio.sleep(DISCONNECT_POLL_S)

    watcher = asyncio.ensure_future(gone())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise APIError(499, "the client closed the connection", "client_closed_request")


def _prompt_list(prompt) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    if isinstance(prompt[0], int):
        return [prompt]
    if any(isinstance(p, list) and not p for p in prompt):
        raise APIError(400, "prompt: token lists must not be empty", param="prompt")
    return list(prompt)


async def _merge(started) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, each request's first output first."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, gen, first: RequestOutput):
        try:
            await queue.put((index, first))
            if not first.finished:
                async for out in gen:
                    await queue.put((index, out))
        except BaseException as e:
            await queue.put((index, e))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, gen, first)) for i, (gen, first) in enumerate(started)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        # Cancelling a pump throws into the generator it is iterating, which aborts its request;
        # only once the pumps are done may the generators be closed from here.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for gen, _ in started:
            await gen.aclose()


def _stream_upto(text: str, params: SamplingParams, finished: bool) -> int:
    """How much of the text is safe to send: not a possible start of a stop string, not a partial
    UTF-8 character (decoded as U+FFFD until the rest arrives)."""
    if finished:
        return len(text)
    upto = len(text)
    if params.stop_strings:
        upto -= max(len(s) for s in params.stop_strings) - 1
    while upto > 0 and text[upto - 1] == "\ufffd":
        upto -= 1
    return max(upto, 0)


def _usage(finals: list[RequestOutput]) -> dict:
    prompt = sum(len(f.prompt_token_ids) for f in finals)
    completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)


def _completion_logprobs(entries, token_ids, tok) -> dict:
    """OpenAI's completion logprobs; an entry None (the first prompt token, which nothing predicts)
    gives null logprobs, as OpenAI and vLLM answer for echo."""
    tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
    for token, entry in zip(token_ids, entries or []):
        text = _token_text(tok, token)
        tokens.append(text)
        token_lps.append(None if entry is None else entry[token].logprob)
        tops.append(None if entry is None else {_token_text(tok, t): lp.logprob for t, lp in entry.items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _echoed(out: RequestOutput, o, scoring_only: bool) -> tuple[list, list[int]]:
    """Logprob entries and token ids of the prompt followed by the completion (echo); with
    max_tokens 0 (scoring) the prompt alone."""
    generated = ([], []) if scoring_only else (o.logprobs or [], o.token_ids)
    return (out.prompt_logprobs or []) + generated[0], out.prompt_token_ids + generated[1]


def _chat_logprobs(entries, token_ids, tok, top: int) -> dict:
    content = []
    for token, entry in zip(token_ids, entries or []):
        text = _token_text(tok, token)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].rank)[:top]
        content.append({"token": text, "logprob": entry[token].logprob, "bytes": list(text.encode("utf-8", "replace")),
                        "top_logprobs": [{"token": _token_text(tok, t), "logprob": lp.logprob,
                                          "bytes": list(_token_text(tok, t).encode("utf-8", "replace"))}
                                         for t, lp in ranked]})
    return {"content": content}


def _chunk(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream")
