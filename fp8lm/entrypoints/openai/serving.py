"""What the API's endpoints share: the error type, the server state that submits requests to the
engine and collects their outputs, and the streaming helpers (server-sent events)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from fp8lm.engine.outputs import RequestOutput
from fp8lm.engine.sampling_params import RequestOutputKind, SamplingParams, SamplingParamsError
from fp8lm.entrypoints.openai.async_engine import AsyncEngine, EngineOverloaded, RequestTimeout
from fp8lm.entrypoints.openai.limits import ServerLimits
from fp8lm.entrypoints.openai.metrics import ServerMetrics
from fp8lm.entrypoints.openai.protocol import SamplingFields, UnsupportedField
from fp8lm.errors import EngineDeadError, FP8LMError

DISCONNECT_POLL_S = 0.25
def engine_stopped(engine: AsyncEngine) -> str:
    return f"{engine.public_error or 'the engine has stopped'}; the server log says why"

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


class ServingState:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics, limits: ServerLimits):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.limits = limits
        self.started = int(time.time())
        self.submitted: dict[str, float] = {}        # request id -> when it was handed to the engine
        self.last_token_time: dict[str, float] = {}

    # ---- health ---------------------------------------------------------------------------------
    def health(self):
        if self.engine.error:
            return JSONResponse({"status": "error", "detail": engine_stopped(self.engine)}, status_code=503)
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
            raise APIError(503, engine_stopped(self.engine), "service_unavailable")
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
    def check_model(self, model: str | None) -> None:
        """A ready engine serving `model` (None: whatever it serves)."""
        self.require_ready()
        if model is not None and model != self.model_name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                           "not_found_error", "model", "model_not_found")

    def check_request(self, body: SamplingFields) -> None:
        """A ready engine, this server's model, and nothing asked that fp8lm would not honour."""
        self.check_model(body.model)
        try:
            body.check_supported()
        except UnsupportedField as e:
            raise as_api_error(e) from None

    def sampling_params(self, body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None, constraint=None) -> SamplingParams:
        """`constraint`: the request's StructuredOutputsParams (see `constraint`) or one of the server's."""
        fields = dict(n=body.n, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
                      seed=body.seed, presence_penalty=body.presence_penalty,
                      frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty)
        try:
            return SamplingParams(
                **{k: v for k, v in fields.items() if v is not None}, stop=body.stop,
                stop_token_ids=body.stop_token_ids, ignore_eos=body.ignore_eos, max_tokens=max_tokens,
                min_tokens=body.min_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
                skip_special_tokens=body.skip_special_tokens, include_stop_str_in_output=body.include_stop_str_in_output,
                logit_bias=body.token_logit_bias(), structured_outputs=constraint)
        except (SamplingParamsError, UnsupportedField) as e:
            raise as_api_error(e) from None

    @staticmethod
    def constraint(body: SamplingFields):
        """The request's own output constraint (response_format, structured_outputs, guided_*), or None."""
        try:
            return body.structured()
        except (SamplingParamsError, UnsupportedField) as e:
            raise as_api_error(e) from None

    async def start(self, prompts: list, params: SamplingParams, base_id: str, **kwargs):
        """Submits every prompt (their outputs come as deltas) and waits for each one's first output,
        so that a rejected request is a 400 before any streaming starts. Returns [(generator, first output)]."""
        asked, bound = len(prompts) * params.n, self.limits.max_sequences_per_request
        if asked > bound:
            raise APIError(400, f"{len(prompts)} prompts x n={params.n} is {asked} sequences; a request may ask for "
                                f"at most {bound}", param="prompt")
        # The whole request first, so that none of its prompts starts when it cannot all wait; each
        # prompt's own check in generate() is what holds the bound when requests arrive together.
        try:
            self.engine.check_room(asked, self.limits.max_waiting_sequences)
        except EngineOverloaded as e:
            raise as_api_error(e) from None
        params = dataclasses.replace(params, output_kind=RequestOutputKind.DELTA)
        gens = []
        for i, prompt in enumerate(prompts):
            self.submitted[f"{base_id}-{i}"] = time.monotonic()
            gens.append(self.engine.generate(f"{base_id}-{i}", prompt, params, self.limits.max_waiting_sequences,
                                             **kwargs))
        try:
            # Awaited together: each prompt is submitted as its first output is awaited.
            firsts = await asyncio.gather(*(gen.__anext__() for gen in gens), return_exceptions=True)
            error = next((f for f in firsts if isinstance(f, BaseException)), None)
        except BaseException as e:
            error = e
        if error is not None:
            for gen in gens:
                await gen.aclose()
            raise as_api_error(error) from None
        return list(zip(gens, firsts))

    async def finish(self, started, request: Request) -> list[RequestOutput]:
        """Every request's whole output; a client that disconnects meanwhile aborts them (the
        engine stops computing for nobody)."""
        return await unless_disconnected(request, self._collect(started))

    @staticmethod
    async def _collect(started) -> list[RequestOutput]:
        try:
            for gen, whole in started:
                while not whole.finished:
                    whole.add(await gen.__anext__())
        except BaseException as e:
            for gen, _ in started:
                await gen.aclose()
            raise as_api_error(e) from None
        return [whole for _, whole in started]


def as_api_error(e: BaseException) -> BaseException:
    if isinstance(e, SamplingParamsError):
        return APIError(400, str(e), param=e.param)
    if isinstance(e, UnsupportedField):
        return APIError(400, str(e), param=e.field)
    if isinstance(e, RequestTimeout):
        return APIError(504, str(e), "timeout")
    if isinstance(e, EngineOverloaded):
        return APIError(503, str(e), "service_unavailable", headers={"Retry-After": "1"})
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), "service_unavailable")      # AsyncEngine's public reason
    if isinstance(e, FP8LMError):
        return APIError(400, str(e))
    return e


async def unless_disconnected(request: Request, work):
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


async def merge(started) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, each request's first output first."""
    # Bounded: a pump waits for the consumer, and meanwhile its request's Sink joins the deltas.
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(started))

    async def pump(index: int, gen, first: RequestOutput):
        try:
            await queue.put((index, first))
            if not first.finished:
                async for out in gen:
                    await queue.put((index, out))
            await queue.put((index, None))
        except asyncio.CancelledError:
            raise                      # the consumer is gone: nobody reads the queue any more
        except BaseException as e:     # the consumer raises it, so no end marker follows
            await queue.put((index, e))

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


class Usage:
    """Token counts of a response, from its requests' outputs (whole ones, or every delta of a stream)."""

    def __init__(self):
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens = 0

    def add(self, out: RequestOutput) -> None:
        self.prompt_tokens[out.request_id] = len(out.prompt_token_ids)
        self.completion_tokens += sum(len(o.token_ids) for o in out.outputs)

    def as_dict(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}


def usage(finals: list[RequestOutput]) -> dict:
    counts = Usage()
    for out in finals:
        counts.add(out)
    return counts.as_dict()


def token_text(tok, token_id: int) -> str:
    return tok.decode([token_id], skip_special_tokens=False) if tok is not None else str(token_id)


def chunk(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(with_error_event(gen), media_type="text/event-stream")


async def with_error_event(gen: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events of `gen`; an error after the stream started (the status line is gone) ends it
    with an error event in OpenAI's shape and [DONE], as vLLM does, instead of a cut connection."""
    try:
        async for event in gen:
            yield event
    except Exception as e:
        err = as_api_error(e)
        if not isinstance(err, APIError):
            log.exception("a stream failed")
            err = APIError(500, f"{type(e).__name__}: {e}", "internal_server_error")
        yield chunk({"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.status}})
        yield "data: [DONE]\n\n"
