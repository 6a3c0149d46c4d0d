"""The OpenAI-compatible HTTP server: `fp8lm serve MODEL ...`."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from fp8lm.entrypoints.openai.async_engine import AsyncEngine
from fp8lm.entrypoints.openai import chat_routes, completion_routes
from fp8lm.entrypoints.openai.chat_routes import ToolSettings
from fp8lm.entrypoints.openai.metrics import ServerMetrics
from fp8lm.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from fp8lm.entrypoints.openai.guards import Access, GuardMiddleware
from fp8lm.entrypoints.openai.limits import ServerLimits
from fp8lm.entrypoints.openai.serving import APIError, ServingState, error_body
from fp8lm.entrypoints.openai.tokenize_routes import add_tokenize_routes
from fp8lm.version import __version__


def build_app(engine: AsyncEngine, model_name: str, access: Access | None = None, limits: ServerLimits | None = None,
              tools: ToolSettings | None = None) -> FastAPI:
    """`access`: the API key and Host allow-list; `limits`: what one client may ask; `tools`:
    automatic tool choice and its parser."""
    app = FastAPI(title="fp8lm OpenAI-compatible server", version=__version__)
    metrics = ServerMetrics(model_name)
    limits = limits or ServerLimits()
    state = ServingState(engine, model_name, metrics, limits)
    tools = tools or ToolSettings()
    engine.on_step = state.record_step
    app.add_middleware(GuardMiddleware, access=access or Access(), max_body_bytes=limits.max_body_bytes)

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

    add_tokenize_routes(app, state)

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
            "root": model_name, "max_model_len": engine.engine.max_model_len}]}

    streamable = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                        "description": "A completion, or a stream of server-sent events when stream=true"}}

    @app.post("/v1/completions", responses=streamable)
    async def completions(body: CompletionRequest, request: Request):
        return await completion_routes.completions(state, body, request)

    @app.post("/v1/chat/completions", responses=streamable)
    async def chat(body: ChatCompletionRequest, request: Request):
        return await chat_routes.chat(state, tools, body, request)

    return app
