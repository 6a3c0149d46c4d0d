"""Start the real `fp8lm serve` on a free loopback port and wait until it is ready."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str, *args: str, env: dict | None = None, timeout: float = 180):
    port = free_port()
    cmd = [sys.executable, "-m", "fp8lm", "serve", model, "--port", str(port), *args]
    # The log goes to a file: a pipe nobody reads fills up (64 KiB of access log) and blocks the server.
    log = tempfile.NamedTemporaryFile("w+", prefix="fp8lm-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "FP8LM_SKIP_WARMUP": "1", **(env or {})})
    proc.output = lambda: open(log.name).read()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}: {proc.output()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.2)
        proc.base_url = base
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()
        os.unlink(log.name)
