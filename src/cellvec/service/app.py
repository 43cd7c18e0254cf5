"""The HTTP API. Start with `cellvec serve --store DIR`; OpenAPI docs at /docs.

Atlases and gene tables load once and are shared by all requests (and, memory-
mapped, by all worker processes: see `service.atlases`). Each request checks (at
most once a second) whether an atlas's table has a newer committed version and
then loads it whole, so a rebuilt atlas is picked up without a restart and a
reader never sees a half-written table.

The request path is kept short: one pure-ASGI guard (`service.guard`: body limit
on the bytes received, bearer auth, the multipart /map -> /map_h5ad route), a fast
path for the hot routes (`service.map_routes`), async endpoints that parse bodies
with pydantic-core or Arrow, concurrent map requests micro-batched into one encode
and one search (`service.batching`), and answers encoded with orjson (or Arrow IPC).

This module builds the app; the routes live with their job: `service.map_routes`,
`service.gene_routes`, `service.sql_route`, and the health checks here.
"""

import logging
import os
import threading
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from cellvec import __version__
from cellvec.errors import CellvecError, StoreError
from cellvec.gene_store.store import GeneStore
from cellvec.service.atlases import AtlasCache
from cellvec.service.batching import Batcher
from cellvec.service.context import Served
from cellvec.service.gene_routes import add_gene_routes
from cellvec.service.guard import TOKEN_ENV, Guard, guarded_fastapi
from cellvec.service.map_routes import add_atlas_routes, add_map_routes, fast_path
from cellvec.service.mapping import map_jobs
from cellvec.service.responses import (
    error_response,
    hide_location,
    json_bytes,
    validation_message,
)
from cellvec.service.schemas import MapRequest
from cellvec.service.sql_route import add_sql_route
from cellvec.service.threads import env_threads, limit_pools, limit_thread, pool_size
from cellvec.storage import store_location

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024 * 1024
BATCH_WAIT_MS = 2.0
BATCH_MAX_CELLS = 4096
# SQL queries at once (each DuckDB connection may take SERVICE_LIMITS' memory and threads)
SQL_SLOTS = 2


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
    ctx = _served(store, batch_wait_ms, batch_max_cells, cache_dir, threads, preload, freeze_heap)
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    app = guarded_fastapi(
        lifespan=partial(_preload, ctx) if preload else None,
        title="cellvec",
        version=__version__,
        description="Map single cells onto reference atlases; search genes; read-only SQL.",
    )
    app.state.batcher = ctx.batcher
    app.state.atlases = ctx.atlases
    _add_error_handlers(app)
    healthz_body = _add_health_routes(app, ctx, __version__)
    answer = add_atlas_routes(app, ctx)
    app.guard = Guard(
        partial(FastAPI.__call__, app),
        token=token,
        max_body_bytes=max_body_bytes,
        fast=fast_path(answer, healthz_body),
    )
    add_map_routes(app, answer)
    app.openapi = partial(_openapi, app)
    add_gene_routes(app, ctx)
    add_sql_route(
        app,
        ctx,
        enabled=enable_sql,
        max_rows=sql_max_rows,
        timeout_s=sql_timeout_s,
        slots=SQL_SLOTS,
    )
    return app


def _served(store, batch_wait_ms, batch_max_cells, cache_dir, threads, preload, freeze_heap):
    """The store, its gene table, the atlas cache and the batcher, with the numeric thread
    pools of this process sized first."""
    threads = threads or env_threads() or pool_size(1)
    limit_pools(threads)  # numpy's and faiss's pools are loaded by now
    store = store_location(store)
    gene_store = GeneStore(store)  # refuses a missing store, naming it
    # where the store is (a directory, a bucket) is the server's: no client reads it in an error
    hide_location(store.path if store.is_local else store.uri)
    if cache_dir is None and store.is_local:
        cache_dir = store.path / "_serving"
    if cache_dir is not None:
        hide_location(Path(cache_dir))
    atlases = AtlasCache(store, gene_store, cache_dir, freeze_heap=freeze_heap)
    batcher = Batcher(
        map_jobs,
        wait_s=batch_wait_ms / 1000,
        max_cells=batch_max_cells,
        thread_setup=partial(limit_thread, threads),
    )
    preloaded = threading.Event()
    if not preload:
        preloaded.set()
    return Served(store, gene_store, atlases, batcher, preloaded)


@asynccontextmanager
async def _preload(ctx: Served, app):
    """Lifespan: load every atlas in a background thread while the server starts."""

    def warm():
        import pyarrow.compute  # noqa: F401 (first Arrow request would import these)
        import pyarrow.ipc  # noqa: F401

        try:
            ctx.atlases.preload()
        finally:
            ctx.preloaded.set()

    threading.Thread(target=warm, daemon=True, name="cellvec-preload").start()
    yield


def _add_error_handlers(app):
    """Every error is {"error": ...}, none {"detail": ...}: Starlette's own (unknown route
    404, 405, a bad multipart body's 400) included."""
    from fastapi.exceptions import RequestValidationError
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(CellvecError)
    async def cellvec_error(request, exc):
        return error_response(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return error_response(422, validation_message(exc.errors()))

    @app.exception_handler(ValidationError)
    async def pydantic_error(request, exc):
        return error_response(422, validation_message(exc.errors(), prefix=("body",)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        response = error_response(exc.status_code, str(exc.detail))
        response.headers.update(getattr(exc, "headers", None) or {})
        return response


def _add_health_routes(app, ctx: Served, version: str) -> bytes:
    """GET /healthz and /readyz; returns /healthz's body, which the fast path sends too."""
    healthz_body = json_bytes({"status": "ok", "version": version})

    @app.get("/healthz")
    async def healthz():
        """Liveness: the process answers."""
        return Response(healthz_body, media_type="application/json")

    @app.get("/readyz")
    def readyz():
        """Readiness: the store opens, has a complete gene table, and the atlases are loaded."""
        if not ctx.preloaded.is_set():
            return error_response(503, "Loading the atlases; retry in a moment.")
        try:
            models = ctx.gene_store.models()
        except Exception:  # noqa: BLE001 (the reason is the operator's: in the log)
            log.exception("readyz: the store could not be read")
            return error_response(503, "The store is not readable; the server log says why.")
        if not models:
            return error_response(503, "The store has no complete gene table yet.")
        return {"status": "ready", "models": models}

    return healthz_body


def _openapi(app):
    """The OpenAPI schema, with `MapRequest` (the map route reads its body itself)."""
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
