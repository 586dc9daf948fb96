"""Mounting the console in the aggregator app: its pages, its static files, its redirects."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Lifespan, Message, Receive, Scope, Send

from services.console import adapters, gallery, generate, routes
from services.console.auth import SIGNIN_PATH, SignInRequired

STATIC_DIR = Path(__file__).parent / "static"
CONSOLE_PREFIX = "/console"
SECURITY_HEADERS = [
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    ),
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
]


def _sign_in_first(request: Request, _error: Exception) -> Response:
    if request.headers.get("HX-Request"):
        return Response(status_code=204, headers={"HX-Redirect": SIGNIN_PATH})
    return RedirectResponse(SIGNIN_PATH, status_code=303)


class ConsoleHeaders:
    """Security headers on every console response (scripts only from the platform itself)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(CONSOLE_PREFIX):
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith(f"{CONSOLE_PREFIX}/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += SECURITY_HEADERS[:-1] if static else SECURITY_HEADERS
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def _close_on_shutdown(app: FastAPI) -> None:
    """Close the console's inference client when the app stops (tests may swap in another)."""
    inner: Lifespan[FastAPI] = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with inner(app) as state:
            try:
                yield state
            finally:
                app.state.console_inference_http.close()

    app.router.lifespan_context = lifespan


def mount_console(app: FastAPI) -> None:
    """The console's routes under /console and its vendored assets under /console/static."""
    app.include_router(routes.router)
    app.include_router(adapters.router)
    app.include_router(generate.router)
    app.include_router(gallery.router)
    app.state.console_inference_http = generate.make_inference_http(app.state.resources.settings)
    app.state.console_gallery_pending = gallery.Pending()
    _close_on_shutdown(app)
    app.mount(f"{CONSOLE_PREFIX}/static", StaticFiles(directory=STATIC_DIR), name="console-static")
    app.add_exception_handler(SignInRequired, _sign_in_first)
    app.add_middleware(ConsoleHeaders)
