"""The service's front door: a pure-ASGI guard that runs before FastAPI (body limit on
the bytes received, bearer auth, the multipart /map -> /map_h5ad route, the fast paths,
no stack trace to a client), and the FastAPI class that hands every request to it."""

import hmac
import logging

from cellvec.service.responses import send_error

log = logging.getLogger(__name__)

TOKEN_ENV = "CELLVEC_API_TOKEN"


class Guard:
    """Pure ASGI middleware: body limit on the bytes received (whatever Content-Length says,
    chunked uploads included), bearer auth on /v1/*, multipart /map -> /map_h5ad, and no
    stack trace ever sent to a client. The body is read here, once, and replayed."""

    def __init__(self, app, *, token: str | None, max_body_bytes: int, fast=None):
        self.app = app
        self.fast = fast  # async (scope, headers, body, send) -> handled?
        self.token = f"Bearer {token}".encode() if token else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body_bytes:
            return await self._too_large(send, int(length))
        if (
            self.token
            and path.startswith("/v1/")
            and not hmac.compare_digest(headers.get(b"authorization", b""), self.token)
        ):
            return await send_error(
                send,
                401,
                f"Missing or wrong bearer token: send 'Authorization: Bearer <{TOKEN_ENV}>'.",
            )
        if path.endswith("/map") and headers.get(b"content-type", b"").startswith(
            b"multipart/form-data"
        ):
            # DESIGN: /map takes JSON, Arrow or an h5ad upload; uploads go to the upload handler.
            scope = dict(scope, path=path + "_h5ad")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                del chunks  # nothing is kept
                return await self._too_large(send, size, received=True)
            if chunk:
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        replayed = started = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async def tracked(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            if self.fast is None or not await self.fast(scope, headers, body, tracked):
                await self.app(scope, replay, tracked)
        except Exception:  # never a stack trace (nor text/plain) to the client
            log.exception("Unhandled error on %s", path)
            if not started:
                await send_error(send, 500, "Internal error; the server log has the details.")

    async def _too_large(self, send, size: int, received: bool = False):
        what = f"more than {size - 1:,}" if received else f"{size:,}"
        await send_error(
            send,
            413,
            f"Request body of {what} bytes exceeds the limit of {self.max_body_bytes:,}; "
            "split the cells over several requests.",
        )


def guarded_fastapi(**kwargs):
    """A FastAPI app whose `guard` (set once the routes exist) runs first, outside
    Starlette's own middleware stack, which it does not need."""
    from fastapi import FastAPI

    class App(FastAPI):
        """FastAPI behind the Guard: the guard (and its fast paths) runs first, outside
        Starlette's own middleware stack, which it does not need."""

        guard = None

        async def __call__(self, scope, receive, send):
            if self.guard is None:
                return await super().__call__(scope, receive, send)
            await self.guard(scope, receive, send)

    return App(**kwargs)
