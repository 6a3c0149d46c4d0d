"""What stands between the network and the API: the Host allow-list, the API key on every route but
/health, a bound on each request body, and connections that must send their headers in time."""
from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass, field

from uvicorn.protocols.http.h11_impl import H11Protocol

from fp8lm.entrypoints.openai.serving import error_body

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Access:
    """Who may call: `api_key` (None: anyone), `allowed_hosts` (Host header values; None: any),
    `open_paths` the key is not asked for."""
    api_key: str | None = None
    allowed_hosts: frozenset[str] | None = None
    open_paths: frozenset[str] = field(default_factory=lambda: frozenset({"/health"}))


def default_allowed_hosts(bound: str) -> frozenset[str] | None:
    """The bound address and the loopback names; None (any Host) for a wildcard bind, whose remote
    clients use names only the operator knows (--allowed-hosts then)."""
    try:
        if ipaddress.ip_address(bound).is_unspecified:
            return None
    except ValueError:
        pass                                # a host name
    return frozenset({bound, *LOOPBACK_NAMES})


def host_name(header: bytes) -> str:
    """The Host header without its port ('[::1]:8000' -> '::1')."""
    host = header.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class GuardMiddleware:
    """Plain ASGI (BaseHTTPMiddleware would hide a client's disconnect from the handlers): Host, key
    (compared in constant time), then the body, read up to `max_body_bytes` and handed on whole."""

    def __init__(self, app, access: Access, max_body_bytes: int):
        self.app, self.access, self.max_body_bytes = app, access, max_body_bytes
        self.expected = None if access.api_key is None else f"Bearer {access.api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        names = [name for name, _ in scope["headers"]]
        if names.count(b"host") > 1 or names.count(b"authorization") > 1:
            return await error_body(400, "a request may carry one Host and one Authorization header",
                                    "invalid_request_error")(scope, receive, send)
        headers = dict(scope["headers"])
        refusal = self._refusal(scope["path"], headers)
        if refusal is None and int(headers.get(b"content-length", b"0") or 0) > self.max_body_bytes:
            refusal = self._too_large()
        if refusal is not None:
            return await refusal(scope, receive, send)
        body, more = await self._read_body(receive)
        if body is None:
            return await self._too_large()(scope, receive, send)
        whole = {"type": "http.request", "body": body, "more_body": False}
        return await self.app(scope, _replay_then(whole, receive) if more is None else more, send)

    def _refusal(self, path: str, headers: dict):
        allowed = self.access.allowed_hosts
        if allowed is not None and host_name(headers.get(b"host", b"")) not in allowed:
            return error_body(400, "this server does not answer to that Host (see --allowed-hosts)",
                              "invalid_request_error", code="host_not_allowed")
        if self.expected is not None and path not in self.access.open_paths \
                and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            return error_body(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")
        return None

    def _too_large(self):
        return error_body(413, f"the request body is larger than {self.max_body_bytes} bytes (--max-request-body-bytes)",
                          "invalid_request_error", code="request_too_large")

    async def _read_body(self, receive):
        """(the whole body, None), or (None, None) past the bound; a disconnect is passed on as is."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), _replay_then(message, receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None, None
            if not message.get("more_body"):
                return b"".join(chunks), None


def _replay_then(message: dict, receive):
    """A receive that gives `message` first (the whole body, or a disconnect before it ended)."""
    pending = [message]

    async def again():
        return pending.pop() if pending else await receive()
    return again


def protocol_with_header_deadline(timeout_s: float):
    """uvicorn's h11 protocol, closing a connection that has not sent a whole request head within
    `timeout_s` of connecting (or of its previous response): half-open connections (slowloris)
    are dropped instead of held."""

    class HeaderDeadlineProtocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def _arm(self) -> None:
            waiting_for = self.cycle
            self.loop.call_later(timeout_s, self._expire, waiting_for)

        def _expire(self, waiting_for) -> None:
            if self.cycle is waiting_for and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
