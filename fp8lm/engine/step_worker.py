"""Runs model steps on a daemon thread so that a step that hangs can be timed out.

A hung step cannot be interrupted; the engine that sees the timeout declares itself dead and
never waits on this worker again. Being a daemon, the thread never blocks interpreter exit.
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future


class StepWorker:
    def __init__(self, name: str = "fp8lm-step"):
        self._jobs: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            fn, args, future = self._jobs.get()
            if fn is None:
                return
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args))
                except BaseException as e:  # handed to the caller, who re-raises it
                    future.set_exception(e)

    def call(self, fn, *args, timeout: float | None = None):
        """fn(*args) on the worker thread; raises concurrent.futures.TimeoutError after `timeout` s."""
        future: Future = Future()
        self._jobs.put((fn, args, future))
        return future.result(timeout=timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Ends the thread and waits for it (a daemon thread still unwinding native code while the
        interpreter exits can abort the process). A hung step is not waited for past `timeout`."""
        self._jobs.put((None, None, None))
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
