"""The HTTP API. Start with `cellvec serve --store DIR`; OpenAPI docs at /docs.

Atlases and gene tables load once and are shared by all requests (and, memory-
mapped, by all worker processes: see `service.atlases`). Each request checks (at
most once a second) whether an atlas's table has a newer committed version and
then loads it whole, so a rebuilt atlas is picked up without a restart and a
reader never sees a half-written table.

The request path is kept short: one pure-ASGI guard (body limit on the bytes
received, bearer auth, the multipart /map -> /map_h5ad route), async endpoints
that parse bodies with pydantic-core or Arrow, concurrent map requests
micro-batched into one encode and one search (`service.batching`), and answers
encoded with orjson (or Arrow IPC).
"""

import asyncio
import hmac
import logging
import os
import re
import threading
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import numpy as np

# FastAPI resolves endpoint annotations from this module's globals.
from fastapi import File, Query, Request, UploadFile  # noqa: E402,F401

from cellvec.errors import CellvecError, StoreError
from cellvec.service.mapping import ARROW, ARROW_SCHEMA_DOC
from cellvec.service.schemas import MapRequest, SQLRequest

log = logging.getLogger(__name__)

TOKEN_ENV = "CELLVEC_API_TOKEN"
MAX_BODY_BYTES = 64 * 1024 * 1024
BATCH_WAIT_MS = 2.0
BATCH_MAX_CELLS = 4096
PARSE_IN_THREAD_BYTES = 256 * 1024  # bigger bodies are parsed off the event loop
# SQL queries at once (each DuckDB connection may take SERVICE_LIMITS' memory and threads)
SQL_SLOTS = 2


def _json_bytes(content) -> bytes:
    import orjson

    return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def _error_body(message: str) -> bytes:
    return _json_bytes({"error": message})


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
            return await _send_error(
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
                await _send_error(send, 500, "Internal error; the server log has the details.")

    async def _too_large(self, send, size: int, received: bool = False):
        what = f"more than {size - 1:,}" if received else f"{size:,}"
        await _send_error(
            send,
            413,
            f"Request body of {what} bytes exceeds the limit of {self.max_body_bytes:,}; "
            "split the cells over several requests.",
        )


async def _send_error(send, status: int, message: str):
    await _send(send, status, _error_body(message), b"application/json")


async def _send(send, status: int, body: bytes, media_type: bytes):
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


def _fastapi_class():
    from fastapi import FastAPI

    class App(FastAPI):
        """FastAPI behind the Guard: the guard (and its fast paths) runs first, outside
        Starlette's own middleware stack, which it does not need."""

        guard = None

        async def __call__(self, scope, receive, send):
            if self.guard is None:
                return await super().__call__(scope, receive, send)
            await self.guard(scope, receive, send)

    return App


def _App(**kwargs):
    return _fastapi_class()(**kwargs)


def create_app(
    store: str | Path,
    *,
    enable_sql: bool = False,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    sql_max_rows: int = 10_000,
    sql_timeout_s: float | None = None,
    batch_wait_ms: float = BATCH_WAIT_MS,
    batch_max_cells: int = BATCH_MAX_CELLS,
    cache_dir: str | Path | None = None,
    threads: int | None = None,
    preload: bool = True,
    freeze_heap: bool = False,
):
    """The FastAPI application over one store. `token` (or $CELLVEC_API_TOKEN) turns on bearer auth.

    `batch_wait_ms`: how long a map request may wait for others to share its encode and
    search (0: no batching). `cache_dir`: where atlases are written for memory-mapping
    (default `<store>/_serving` for a local store; a store in a bucket is not copied
    anywhere: its atlases are held in memory unless `cache_dir` names a local folder).
    `threads`: threads of each numeric pool (numpy's BLAS, faiss's OpenMP, torch) in
    this process, set process-wide (an app inside another program sizes that program's
    pools too); None: the number `cellvec serve` chose ($CELLVEC_THREADS, the cores
    shared out between its workers), else the cores this process may use (see
    `service.threads`). `preload`: load every atlas in the background
    when the server starts, so no request waits for it. `freeze_heap`: for a process that
    only serves (`cellvec serve` sets it), keep its heap as loaded out of the garbage
    collector's full passes (`AtlasCache.settle_heap`); not for an app inside another
    program, whose garbage in cycles would then never be collected.
    """
    from fastapi import FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from cellvec import __version__
    from cellvec.gene_store.store import GeneStore
    from cellvec.service import mapping
    from cellvec.service.atlases import AtlasCache
    from cellvec.service.batching import Batcher
    from cellvec.service.threads import env_threads, limit_pools, limit_thread, pool_size
    from cellvec.storage import store_location

    threads = threads or env_threads() or pool_size(1)
    limit_pools(threads)  # numpy's and faiss's pools are loaded by now
    store = store_location(store)
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    gene_store = GeneStore(store)  # refuses a missing store, naming it
    if cache_dir is None and store.is_local:
        cache_dir = store.path / "_serving"
    atlases_cache = AtlasCache(store, gene_store, cache_dir, freeze_heap=freeze_heap)
    batcher = Batcher(
        mapping.map_jobs,
        wait_s=batch_wait_ms / 1000,
        max_cells=batch_max_cells,
        thread_setup=partial(limit_thread, threads),
    )

    sql_slots = threading.BoundedSemaphore(SQL_SLOTS)
    preloaded = threading.Event()
    if not preload:
        preloaded.set()

    @asynccontextmanager
    async def lifespan(app):
        def warm():
            import pyarrow.compute  # noqa: F401 (first Arrow request would import these)
            import pyarrow.ipc  # noqa: F401

            try:
                atlases_cache.preload()
            finally:
                preloaded.set()

        threading.Thread(target=warm, daemon=True, name="cellvec-preload").start()
        yield

    app = _App(
        lifespan=lifespan if preload else None,
        title="cellvec",
        version=__version__,
        description="Map single cells onto reference atlases; search genes; read-only SQL.",
    )
    app.state.batcher = batcher
    app.state.atlases = atlases_cache

    def json_response(content, status: int = 200) -> Response:
        import orjson

        return Response(
            orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY),
            status_code=status,
            media_type="application/json",
        )

    def error(status: int, message: str):
        return Response(_error_body(message), status_code=status, media_type="application/json")

    @app.exception_handler(CellvecError)
    async def cellvec_error(request, exc):
        return error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error(422, _validation_message(exc.errors()))

    @app.exception_handler(ValidationError)
    async def pydantic_error(request, exc):
        return error(422, _validation_message(exc.errors(), prefix=("body",)))

    # Starlette's own (unknown route 404, 405, a bad multipart body's 400) included: every
    # error is {"error": ...}, none {"detail": ...}
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        response = error(exc.status_code, str(exc.detail))
        response.headers.update(getattr(exc, "headers", None) or {})
        return response

    healthz_body = _json_bytes({"status": "ok", "version": __version__})

    @app.get("/healthz")
    async def healthz():
        """Liveness: the process answers."""
        return Response(healthz_body, media_type="application/json")

    @app.get("/readyz")
    def readyz():
        """Readiness: the store opens, has a complete gene table, and the atlases are loaded."""
        if not preloaded.is_set():
            return error(503, "Loading the atlases; retry in a moment.")
        try:
            models = gene_store.models()
        except Exception as e:  # noqa: BLE001
            return error(503, f"Store not readable: {e}")
        if not models:
            return error(503, "The store has no complete gene table yet.")
        return {"status": "ready", "models": models}

    def get_atlas(name: str):
        try:
            return atlases_cache.get(name)
        except KeyError:
            from cellvec.cell_index.table import list_atlases

            raise HTTPException(
                404, f"No atlas {name!r}; atlases: {', '.join(list_atlases(store)) or 'none'}."
            ) from None

    async def served_atlas(name: str):
        hit = atlases_cache.current(name)
        if hit is not None:
            return hit
        return await asyncio.get_running_loop().run_in_executor(None, get_atlas, name)

    @app.get("/v1/atlases")
    def atlases():
        """Atlases of the store with their recipes and classes."""
        from cellvec.cell_index.table import list_atlases

        return json_response({"atlases": [get_atlas(n).summary() for n in list_atlases(store)]})

    async def answer(
        atlas: str, parse, body: bytes, arrow: bool, in_thread: bool = False
    ) -> tuple[bytes, str]:
        """Parse `body` into a job (off the event loop when big, or `in_thread`), map it in
        a batch, answer."""
        served = await served_atlas(atlas)
        if in_thread or len(body) > PARSE_IN_THREAD_BYTES:
            job = await asyncio.get_running_loop().run_in_executor(None, parse, body)
        else:
            job = parse(body)
        res = await batcher.submit((atlas, served.version), served, job, job.n_cells)
        if arrow:
            return mapping.render_arrow(served, job, res), ARROW
        return mapping.render_json(served, job, res), "application/json"

    async def respond(
        request: Request, atlas: str, parse, body: bytes, in_thread: bool = False
    ) -> Response:
        arrow = ARROW in request.headers.get("accept", "")
        content, media_type = await answer(atlas, parse, body, arrow, in_thread)
        return Response(content, media_type=media_type)

    map_route = re.compile(r"/v1/atlases/([^/]+)/map")

    async def fast(scope, headers: dict, body: bytes, send) -> bool:
        """The two hot routes without FastAPI's routing and dependency solving (same
        answers and errors): GET /healthz, and POST /map with a JSON body or an Arrow body
        without query options. Anything else goes the ordinary way."""
        path = scope["path"]
        if path == "/healthz" and scope["method"] == "GET":
            await _send(send, 200, healthz_body, b"application/json")
            return True
        match = map_route.fullmatch(path)
        if match is None or scope["method"] != "POST" or scope["query_string"]:
            return False
        ctype = headers.get(b"content-type", b"")
        if ctype.startswith(b"application/json"):
            parse = mapping.job_from_json
        elif ctype.startswith(ARROW.encode()):
            parse = mapping.job_from_arrow
        else:
            return False
        arrow = ARROW.encode() in headers.get(b"accept", b"")
        try:
            content, media_type = await answer(match.group(1), parse, body, arrow)
            status = 200
        except CellvecError as e:
            status, content, media_type = 422, _error_body(str(e)), "application/json"
        except ValidationError as e:
            message = _validation_message(e.errors(), prefix=("body",))
            status, content, media_type = 422, _error_body(message), "application/json"
        except HTTPException as e:
            status, content, media_type = (
                e.status_code,
                _error_body(str(e.detail)),
                "application/json",
            )
        await _send(send, status, content, media_type.encode())
        return True

    app.guard = Guard(
        partial(FastAPI.__call__, app), token=token, max_body_bytes=max_body_bytes, fast=fast
    )

    map_schema = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/MapRequest"}},
                ARROW: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    }

    map_doc = (
        "Map cells given as gene names plus sparse values per cell (JSON, `MapRequest`), as "
        "an Arrow IPC stream, or as a multipart h5ad upload (field `file`). Concurrent "
        "requests are micro-batched; answers are JSON, or Arrow on request.\n\n" + ARROW_SCHEMA_DOC
    )

    @app.post("/v1/atlases/{atlas}/map", openapi_extra=map_schema, description=map_doc)
    async def map_cells(
        atlas: str,
        request: Request,
        k: int | None = Query(
            None, ge=1, le=200, description="Arrow bodies: neighbours (default: the atlas's)"
        ),
        min_confidence: float = Query(0.0, ge=0, le=1, description="Arrow bodies"),
        min_typicality: float = Query(0.0, ge=0, le=1, description="Arrow bodies"),
        scores: bool = Query(False, description="Arrow bodies: per-class scores"),
        vectors: bool = Query(False, description="Arrow bodies: cell vectors"),
    ):
        """Map cells (JSON, Arrow IPC or an h5ad upload); `map_doc` says more."""
        body = await request.body()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(ARROW):
            options = dict(
                k=k,
                min_confidence=min_confidence,
                min_typicality=min_typicality,
                scores=scores,
                vectors=vectors,
            )
            return await respond(request, atlas, _with(mapping.job_from_arrow, options), body)
        if ctype and not ctype.startswith("application/json"):
            raise HTTPException(
                415, f"Content-Type {ctype!r}: send application/json, {ARROW} or an h5ad upload."
            )
        return await respond(request, atlas, mapping.job_from_json, body)

    @app.post("/v1/atlases/{atlas}/map_h5ad")
    async def map_h5ad(
        atlas: str,
        request: Request,
        file: UploadFile = File(...),
        k: int | None = Query(None, ge=1, le=200),
        min_confidence: float = Query(0.0, ge=0, le=1),
        min_typicality: float = Query(0.0, ge=0, le=1),
        scores: bool = False,
        vectors: bool = False,
    ):
        """Map the cells of an uploaded .h5ad file."""
        data = await file.read()
        options = dict(
            k=k,
            min_confidence=min_confidence,
            min_typicality=min_typicality,
            scores=scores,
            vectors=vectors,
        )
        # an upload is walked (check_hdf5) and read by anndata: never on the event loop
        parse = _with(mapping.job_from_h5ad, options)
        return await respond(request, atlas, parse, data, in_thread=True)

    def openapi():
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            req = MapRequest.model_json_schema(ref_template="#/components/schemas/{model}")
            comps.update(req.pop("$defs", {}))
            comps["MapRequest"] = req
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/v1/genes/search")
    def gene_search(
        q: str = Query(..., min_length=1, max_length=2000),
        k: int = Query(10, ge=1, le=1000),
        model: str | None = None,
    ):
        """Genes whose texts are nearest to a free-text query."""
        res = gene_store.search(q, model=model, k=k)
        return {"query": q, "results": res.drop("text").to_dicts()}

    @app.get("/v1/genes/{symbol}/neighbors")
    def gene_neighbors(symbol: str, k: int = Query(10, ge=1, le=1000), model: str | None = None):
        """Genes nearest to a gene of the store."""
        try:
            res = gene_store.search(gene=symbol, model=model, k=k)
        except StoreError as e:
            if "is not in the" in str(e):
                raise HTTPException(404, str(e)) from None
            raise
        return {"gene": symbol, "results": res.drop("text").to_dicts()}

    @app.post("/v1/sql")
    def sql(body: SQLRequest):
        """Read-only SQL over the store's views (enabled with `cellvec serve --enable-sql`)."""
        if not enable_sql:
            raise HTTPException(
                403, "SQL is disabled on this server; start it with `cellvec serve --enable-sql`."
            )
        from contextlib import closing
        from dataclasses import replace

        from cellvec.sql import SERVICE_LIMITS, SQLTimeoutError, StoreSQL

        limits = replace(SERVICE_LIMITS, timeout_s=sql_timeout_s or SERVICE_LIMITS.timeout_s)
        if not sql_slots.acquire(blocking=False):
            raise HTTPException(
                503, f"{SQL_SLOTS} SQL queries are running already; retry in a moment."
            )
        rows, truncated, columns = [], False, []
        try:  # one batch of max_rows + 1 rows tells whether the answer was truncated
            with (
                StoreSQL(gene_store, limits=limits) as conn,
                closing(conn.execute(body.query, batch_rows=sql_max_rows + 1)) as batches,
            ):
                for batch in batches:
                    columns = batch.schema.names
                    kept = batch.slice(0, sql_max_rows - len(rows))
                    rows.extend(kept.to_pylist())
                    if kept.num_rows < batch.num_rows:
                        truncated = True
                        break
        except SQLTimeoutError as e:
            raise HTTPException(408, str(e)) from None
        finally:
            sql_slots.release()
        return {
            "columns": columns,
            "rows": _jsonable(rows),
            "truncated": truncated,
            "max_rows": sql_max_rows,
        }

    return app


def create_app_from_env():
    """App factory for multi-process serving (`cellvec serve --workers N`): settings from the environment."""
    store = os.environ.get("CELLVEC_STORE")
    if not store:
        raise StoreError(
            "CELLVEC_STORE is not set; start the server with `cellvec serve --store DIR`."
        )
    return create_app(
        store,
        enable_sql=os.environ.get("CELLVEC_ENABLE_SQL") == "1",
        batch_wait_ms=float(os.environ.get("CELLVEC_BATCH_WAIT_MS", BATCH_WAIT_MS)),
        cache_dir=os.environ.get("CELLVEC_CACHE_DIR") or None,
        freeze_heap=True,
    )


def _with(parse, options: dict):
    """`parse(body, **options)` as a one-argument function."""

    def run(body):
        return parse(body, **options)

    return run


def _validation_message(errors, prefix=()) -> str:
    msgs = "; ".join(f"{'.'.join(map(str, (*prefix, *e['loc'])))}: {e['msg']}" for e in errors[:5])
    return f"Invalid request: {msgs}"


def _jsonable(rows):
    def conv(v):
        if isinstance(v, float) and not np.isfinite(v):
            return None
        if isinstance(v, (bytes, bytearray)):
            return v.hex()
        if isinstance(v, list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if hasattr(v, "isoformat"):
            return v.isoformat()
        return v

    return [{k: conv(v) for k, v in r.items()} for r in rows]
