"""A real HTTP server on a free local port for the benchmark clients' tests (aiohttp, in the test's loop)."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from aiohttp import web


@asynccontextmanager
async def rerank_server(handler: Callable[[web.Request], Awaitable[web.Response]]) -> AsyncIterator[str]:
    """Serve ``handler`` at POST /v1/rerank on 127.0.0.1; yields the base URL and stops the server after."""
    app = web.Application()
    app.router.add_post("/v1/rerank", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
    finally:
        await runner.cleanup()
