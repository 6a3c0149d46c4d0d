"""`fp8lm serve`: the app of server.py on uvicorn, with the engine on its own thread, and a
supervisor that ends the process when the engine or a tensor-parallel rank fails."""
from __future__ import annotations

import logging
import threading
import time

from fp8lm.entrypoints.openai.async_engine import AsyncEngine
from fp8lm.entrypoints.openai.guards import Access, protocol_with_header_deadline
from fp8lm.entrypoints.openai.server import build_app
from fp8lm.entrypoints.openai.limits import ServerLimits
from fp8lm.errors import FP8LMError

log = logging.getLogger(__name__)


def rpc_timeout_seconds() -> float:
    """FP8LM_RPC_TIMEOUT (alias VLLM_RPC_TIMEOUT) in milliseconds, as vLLM reads it; default 10 minutes."""
    from fp8lm.engine.config import env_value

    raw = env_value("RPC_TIMEOUT", "600000")
    try:
        value = float(raw)
    except ValueError:
        raise FP8LMError(f"FP8LM_RPC_TIMEOUT={raw!r}: expected milliseconds") from None
    if value <= 0:
        raise FP8LMError(f"FP8LM_RPC_TIMEOUT={raw!r}: must be positive (milliseconds)")
    return value / 1000


# Measured with benchmarks/serve_vs_vllm.py (docs/BENCHMARKS.md): on a 2-core CPU a 2,048-token prompt
# chunk stalls every stream for ~2.5 s (P99 ITL 2.6 s at 16 streams); 256 prompt tokens per decoding
# step gave 0.5 s, and TTFT 1.4 s instead of 5.6 s, for 9% of output tokens/s. Offline generation keeps
# the whole budget (throughput, not latency).
CPU_SERVE_PROMPT_TOKENS_WHILE_DECODING = 256


def apply_serve_defaults(engine_config) -> None:
    """The server's defaults where they differ from offline generation's (options left unset only)."""
    from fp8lm.engine.config import resolve_device

    if engine_config.iteration_timeout_s is None:
        engine_config.iteration_timeout_s = 60.0          # vLLM's default for VLLM_ENGINE_ITERATION_TIMEOUT_S
    if engine_config.prompt_tokens_while_decoding is None and resolve_device(engine_config.device).type == "cpu":
        engine_config.prompt_tokens_while_decoding = CPU_SERVE_PROMPT_TOKENS_WHILE_DECODING


def run_server(engine_config, host: str, port: int, model_name: str, access: Access, limits: ServerLimits,
               tools=None) -> None:
    """Serves until SIGINT/SIGTERM. The model loads on the engine thread; meanwhile /health and
    /v1/* answer 503, so clients can poll."""
    import uvicorn

    from fp8lm.engine.llm_engine import LLMEngine

    apply_serve_defaults(engine_config)
    engine = AsyncEngine(lambda: LLMEngine(engine_config, step_thread=False), rpc_timeout_seconds())
    app = build_app(engine, model_name, access, limits, tools)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=3,
                                           http=protocol_with_header_deadline(limits.header_timeout_s),
                                           limit_concurrency=limits.max_connections, timeout_keep_alive=5))

    failure: list[str] = []

    def supervise():
        """Announces readiness; ends the server (non-zero exit, for a supervisor to restart it) when
        the engine fails — to start, in a step, past the step watchdog — or a tensor-parallel rank is
        lost. Requests in flight get their 503 first."""
        announced = False
        while not server.should_exit:
            if engine.ready and server.started and not announced:
                log.info("fp8lm server ready: http://%s:%d/v1 (model %s)", host, port, model_name)
                announced = True
            lost = [p for p in (engine.engine.workers if engine.engine else []) if not p.is_alive()]
            if lost or engine.error:
                reason = engine.error or f"tensor-parallel worker {lost[0].name} exited with code {lost[0].exitcode}"
                log.error("stopping the server: %s", reason)
                failure.append(reason)
                time.sleep(0.5)             # lets the failed requests' 503s go out
                server.should_exit = True
                return
            time.sleep(0.2)

    engine.start()
    threading.Thread(target=supervise, daemon=True).start()
    try:
        server.run()
    finally:
        engine.stop()
    if failure:
        raise FP8LMError(f"the server stopped: {failure[0]}")
