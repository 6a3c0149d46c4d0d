"""The engine on its own thread, fed by an asyncio server: requests go in through a queue, each
request's newest output comes back to its own `Sink` (one pending output at most)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from fp8lm.engine.llm_engine import LLMEngine
from fp8lm.engine.outputs import RequestOutput
from fp8lm.engine.sampling_params import RequestOutputKind, SamplingParams, SamplingParamsError
from fp8lm.errors import EngineDeadError, FP8LMError

log = logging.getLogger(__name__)
# A constraint whose grammar takes longer to compile is refused (the compile goes on in its worker;
# the size bounds of StructuredOutputsParams keep that rare).
GRAMMAR_COMPILE_TIMEOUT_S = 10.0


class RequestTimeout(FP8LMError):
    """No output from the engine within FP8LM_RPC_TIMEOUT."""


class EngineOverloaded(FP8LMError):
    """A request would pass the bound on waiting sequences (--max-waiting-requests)."""

    def __init__(self, waiting: int, most: int):
        super().__init__(f"{waiting} sequences are waiting, the server takes at most --max-waiting-requests="
                         f"{most}; retry later")


class Sink:
    """Where one request's outputs go, from the engine thread to its asyncio consumer: one pending
    output at most, so a client slower than the engine holds what it has not read, not one output
    per step. A DELTA output not yet read absorbs the next one (RequestOutput.add); a cumulative
    one is superseded by it. An error is final."""

    def __init__(self, loop: asyncio.AbstractEventLoop, deltas: bool):
        self.loop, self.deltas = loop, deltas
        self._pending = None
        self._ready = asyncio.Event()           # created on the loop's thread (in generate)

    def put(self, item) -> None:
        if not self.loop.is_closed():          # a closed loop has nobody left to tell
            self.loop.call_soon_threadsafe(self.offer, item)

    def offer(self, item) -> None:
        """On the loop's thread."""
        if isinstance(self._pending, Exception):
            return
        if self.deltas and isinstance(self._pending, RequestOutput) and isinstance(item, RequestOutput):
            self._pending.add(item)
        else:
            self._pending = item
        self._ready.set()

    async def get(self):
        await self._ready.wait()
        item, self._pending = self._pending, None
        self._ready.clear()
        return item

    @staticmethod
    def deliver(deliveries: list[tuple[Sink, object]]) -> None:
        """A step's outputs, with one wake-up of each event loop instead of one per request."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for sink, item in deliveries:
            by_loop.setdefault(sink.loop, []).append((sink, item))
        for loop, items in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_offer_all, items)


def _offer_all(items: list[tuple[Sink, object]]) -> None:
    for sink, item in items:
        sink.offer(item)


class AsyncEngine:
    def __init__(self, make_engine: Callable[[], LLMEngine], rpc_timeout_s: float):
        self._make_engine = make_engine
        self.rpc_timeout_s = rpc_timeout_s
        self.engine: LLMEngine | None = None
        self.error: str | None = None          # why the engine stopped, for the log
        self.public_error: str | None = None   # what clients may be told of it (no internal text)
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[str, Sink] = {}
        self._stopping = threading.Event()
        # Prompts tokenize and grammars compile here, never on the engine thread or the event loop: a
        # request joins the engine once both are done.
        self._workers = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="fp8lm-prepare")
        # Sequences of requests still preparing or in the queue, not yet taken by the engine thread.
        self._queued_seqs = 0
        self._queued_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fp8lm-engine", daemon=True)
        self._watchdog = threading.Thread(target=self._watch_steps, name="fp8lm-step-watchdog", daemon=True)
        self.on_step: Callable[[list[RequestOutput], float], None] | None = None

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        self._watchdog.start()

    def num_waiting(self) -> int:
        """Sequences (n per request) not yet running: preparing (tokenizing, compiling a grammar), queued for the
        engine thread, or waiting in its scheduler."""
        engine = self.engine
        return self._queued_seqs + (len(engine.scheduler.waiting) if engine is not None else 0)

    def check_room(self, seqs: int, most_waiting: int | None) -> None:
        """Raises EngineOverloaded if `seqs` more sequences would make more than `most_waiting` wait."""
        waiting = self.num_waiting()
        if most_waiting is not None and waiting + seqs > most_waiting:
            raise EngineOverloaded(waiting, most_waiting)

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.error is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stops the engine thread, then the engine (and its tensor-parallel ranks)."""
        self._stopping.set()
        self._commands.put(("wake",))
        self._thread.join(timeout)
        self._workers.shutdown(wait=False, cancel_futures=True)
        if self.engine is not None:
            self.engine.shutdown()

    def _run(self) -> None:
        try:
            self.engine = self._make_engine()
        except Exception as e:  # reported by /health and every request; the process stays up to say so
            self.error, self.public_error = f"engine failed to start: {e}", "the engine failed to start"
            log.error(self.error)
            return
        while not self._stopping.is_set():
            self._drain(block=not self.engine.has_unfinished_requests())
            if self._stopping.is_set() or not self.engine.has_unfinished_requests():
                continue
            try:
                start = time.monotonic()
                outputs = self.engine.step()
                if self.error:          # the watchdog gave up on this step while it ran
                    break
            except Exception as e:   # EngineDeadError, or anything unforeseen: clearly dead, never hung
                dead = isinstance(e, EngineDeadError)
                self.error = str(e) if dead else f"engine failed: {type(e).__name__}: {e}"
                self.public_error = e.public if dead else "the engine failed"
                log.error(self.error)
                break
            if self.on_step is not None:
                self.on_step(outputs, time.monotonic() - start)
            deliveries = []
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is not None:
                    deliveries.append((sink, out))
                if out.finished:
                    self._sinks.pop(out.request_id, None)
            Sink.deliver(deliveries)
        self._fail_all(EngineDeadError(self.public_error or "the server is shutting down"))

    def _watch_steps(self) -> None:
        """Fails every request once a step outlives FP8LM_ENGINE_ITERATION_TIMEOUT_S. The engine
        thread runs steps itself (all torch work on one thread keeps OpenMP's workers spinning, see
        LLMEngine) and cannot be interrupted; it stops when the step returns, if ever."""
        while not self._stopping.wait(0.1):
            engine = self.engine
            timeout = engine.config.iteration_timeout_s if engine is not None else None
            started = engine.last_step_started if engine is not None else None
            if self.error or not timeout or started is None or time.monotonic() - started <= timeout:
                continue
            self.error = self.public_error = (f"a model step exceeded FP8LM_ENGINE_ITERATION_TIMEOUT_S={timeout:g} s; "
                                              f"the engine is stopped (raise the timeout for slow first steps)")
            log.error(self.error)
            # The engine thread is inside the step, so it does not touch the sinks meanwhile; each
            # request is failed once here and not again when (if) the step returns.
            for request_id in list(self._sinks):
                self._sinks.pop(request_id).put(EngineDeadError(self.public_error))
            return

    def _drain(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._execute(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _execute(self, command: tuple) -> None:
        if command[0] == "add":
            _, request_id, prompt, params, kwargs, sink = command
            self._count_queued(-params.n)
            try:
                self.engine.add_request(request_id, prompt, params, **kwargs)
            except Exception as e:   # invalid request: the client gets a 400
                sink.put(e)
                return
            self._sinks[request_id] = sink
        elif command[0] == "abort":
            self._sinks.pop(command[1], None)
            self.engine.abort_request(command[1])

    def _count_queued(self, seqs: int) -> None:
        with self._queued_lock:         # the event loop adds, the engine thread takes away
            self._queued_seqs += seqs

    def _fail_all(self, error: Exception) -> None:
        for request_id, sink in list(self._sinks.items()):
            sink.put(error)
            if self.engine is not None:
                self.engine.abort_request(request_id)
        self._sinks.clear()

    # ---- the asyncio side -------------------------------------------------------------------
    def off_loop(self, fn, *args) -> asyncio.Future:
        """fn(*args) on the server's workers (tokenizing, rendering chats, compiling grammars)."""
        return asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    async def _compile(self, params: SamplingParams):
        try:
            return await asyncio.wait_for(self.off_loop(self.engine.compile_grammar, params.structured_outputs),
                                          GRAMMAR_COMPILE_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise SamplingParamsError("structured_outputs", f"its grammar took longer than "
                                      f"{GRAMMAR_COMPILE_TIMEOUT_S:g} s to compile; simplify it") from None

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       most_waiting: int | None = None, **kwargs) -> AsyncIterator[RequestOutput]:
        """Yields the request's outputs until it finishes; aborts it if the consumer stops early.
        Raises EngineOverloaded if its sequences would make more than `most_waiting` wait."""
        if self.error:
            raise EngineDeadError(self.public_error)
        # Checked and counted in one step of the event loop, before the first await: requests that
        # arrive together cannot all pass the check while the others are still tokenizing.
        self.check_room(params.n, most_waiting)
        self._count_queued(params.n)
        try:
            if isinstance(prompt, str):
                add_special = kwargs.pop("add_special_tokens", True)
                prompt, kwargs = (await self.off_loop(self.engine.tokenize, prompt, add_special),
                                  {**kwargs, "prompt_text": prompt})
            if params.structured_outputs is not None:
                kwargs = {**kwargs, "grammar": await self._compile(params)}
        except BaseException:
            self._count_queued(-params.n)
            raise
        sink = Sink(asyncio.get_running_loop(), params.output_kind is RequestOutputKind.DELTA)
        self._commands.put(("add", request_id, prompt, params, kwargs, sink))
        finished = False
        try:
            while True:
                try:
                    item = await asyncio.wait_for(sink.get(), timeout=self.rpc_timeout_s)
                except asyncio.TimeoutError:
                    raise RequestTimeout(f"no output from the engine within FP8LM_RPC_TIMEOUT "
                                         f"({self.rpc_timeout_s * 1000:.0f} ms)") from None
                if isinstance(item, Exception):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(("abort", request_id))
