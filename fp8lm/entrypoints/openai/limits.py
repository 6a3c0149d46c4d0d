"""The server's bounds on what one client may ask (flags of `fp8lm serve`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerLimits:
    max_body_bytes: int = 4 << 20             # a bigger request body is answered 413
    max_sequences_per_request: int = 256      # prompts x n of one request
    max_waiting_sequences: int | None = None  # sequences not yet running; beyond it new requests get 503
    header_timeout_s: float = 10.0            # a connection must send a request's headers within this
    max_connections: int = 1024               # beyond it uvicorn answers 503
    chat_special_tokens: bool = False         # special-token strings in chat messages are special (not text)
