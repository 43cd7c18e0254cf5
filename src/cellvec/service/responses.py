"""Answers of the HTTP service: JSON bytes (orjson), the `{"error": ...}` body every error
has, and the two ways of sending them (raw ASGI messages on the fast path, Starlette
responses on the ordinary one)."""

from pathlib import Path

from fastapi.responses import Response


def json_bytes(content) -> bytes:
    import orjson

    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


# Where the served stores are (`hide_location`): no error a client reads names them, so
# the server's directories (its user, its layout) stay the server's. Every error body is
# made by `error_body`, whichever route or layer raised it.
_HIDDEN: set[str] = set()
STORE_PLACEHOLDER = "<store>"


def hide_location(location) -> None:
    """Have `error_body` write `STORE_PLACEHOLDER` for `location` (a store's directory,
    resolved, and as given when absolute; or its URI) in every message of this process.
    A relative path as given (`store`) stays: it says nothing of the server, and
    replacing a word such as "store" would garble every message."""
    names = {str(location)}
    if isinstance(location, Path):
        names = {str(location.resolve())} | ({str(location)} if location.is_absolute() else set())
    for name in names:
        if len(name) > 1:
            _HIDDEN.add(name)


def error_body(message: str) -> bytes:
    for name in sorted(_HIDDEN, key=len, reverse=True):
        message = message.replace(name, STORE_PLACEHOLDER)
    return json_bytes({"error": message})


async def send_error(send, status: int, message: str):
    await send_bytes(send, status, error_body(message), b"application/json")


async def send_bytes(send, status: int, body: bytes, media_type: bytes):
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", media_type),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def json_response(content, status: int = 200) -> Response:
    return Response(json_bytes(content), status_code=status, media_type="application/json")


def error_response(status: int, message: str) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json")


def validation_message(errors, prefix=()) -> str:
    msgs = "; ".join(f"{'.'.join(map(str, (*prefix, *e['loc'])))}: {e['msg']}" for e in errors[:5])
    return f"Invalid request: {msgs}"
