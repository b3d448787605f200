"""ASGI middleware of the ingress: body size limit before parsing, CORS, one access-log line per request.

These wrap the module-level FastAPI app; their settings come from the Ingress replica's validated args
(``configure``), since the app object exists before any replica does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import envelope

access_log = logging.getLogger("ray.serve")

SETTINGS: dict[str, Any] = {
    "max_body_bytes": 64 * 1024 * 1024,
    "cors_allow_origins": [],
    "log_requests": True,
    "metrics": None,
}


def configure(max_body_bytes: int, cors_allow_origins: list[str], log_requests: bool, metrics: Any = None) -> None:
    SETTINGS.update(
        max_body_bytes=max_body_bytes,
        cors_allow_origins=list(cors_allow_origins),
        log_requests=log_requests,
        metrics=metrics,
    )


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": data})


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a streamed body passes the limit; any exception layer renders a 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body is over the limit of {limit} bytes")


class BodyLimitMiddleware:
    """413 for bodies over the limit: by Content-Length up front, or while streaming, before any parsing."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = SETTINGS["max_body_bytes"]
        msg = f"request body is over the limit of {limit} bytes"
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    too_big = int(value) > limit
                except ValueError:
                    too_big = False
                if too_big:
                    return await _send_json(send, 413, envelope(413, "request_too_large", msg))
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, envelope(413, "request_too_large", msg))


class DynamicCORSMiddleware:
    """Starlette's CORS middleware when origins are configured; a pass-through otherwise (CORS off)."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._cors: CORSMiddleware | None = None
        self._origins: list[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        origins = SETTINGS["cors_allow_origins"]
        if not origins or scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._cors is None or origins != self._origins:
            self._origins = list(origins)
            self._cors = CORSMiddleware(
                self.app,
                allow_origins=self._origins,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["authorization", "content-type", "x-request-id"],
                expose_headers=["x-request-id"],
            )
        await self._cors(scope, receive, send)


class AccessLogMiddleware:
    """One JSON line per request (request id, route, model, documents, tokens, status, latency, and the
    scorer's queue wait and forward pass) and the
    request metrics (by route template, model and status).

    Handlers put ``model``, ``documents`` and ``tokens`` into ``request.state``; nothing from the body or the
    headers (no document text, no keys) is ever logged.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except asyncio.CancelledError:
            if status == 500:
                status = 499  # the client went away before an answer (nginx's code); not a server error
            raise
        finally:
            state = scope.get("state") or {}
            latency_ms = round((time.monotonic() - start) * 1000, 2)
            metrics = SETTINGS["metrics"]
            if metrics is not None:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                metrics.record(route, state.get("model"), status, latency_ms, state.get("documents"))
            if not SETTINGS["log_requests"]:
                return
            rid = ""
            for key, value in scope.get("headers", []):
                if key == b"x-request-id":
                    rid = value.decode("latin-1")[:128]
            line = {
                "event": "rerank_request",
                "request_id": rid,
                "method": scope.get("method"),
                "route": scope.get("path"),
                "model": state.get("model"),
                "documents": state.get("documents"),
                "tokens": state.get("tokens"),
                "status": status,
                "latency_ms": latency_ms,
                "queue_ms": state.get("queue_ms"),
                "forward_ms": state.get("forward_ms"),
                "preprocess_ms": state.get("preprocess_ms"),
                "score_ms": state.get("score_ms"),
            }
            access_log.info(json.dumps(line))
