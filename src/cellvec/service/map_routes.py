"""The map routes: GET /v1/atlases, POST /v1/atlases/{atlas}/map (JSON, Arrow IPC, or an
h5ad upload rerouted by the guard to /map_h5ad), and the fast path that answers the hot
ones (GET /healthz, POST /map with a JSON or Arrow body and no query options) without
FastAPI's routing and dependency solving."""

import asyncio
import contextlib
import re

# FastAPI resolves endpoint annotations from this module's globals.
from fastapi import File, HTTPException, Query, Request, UploadFile
from fastapi.responses import Response
from pydantic import ValidationError

import cellvec.service.mapping as mapping
from cellvec.errors import CellvecError
from cellvec.service.context import Served
from cellvec.service.mapping import ARROW, ARROW_SCHEMA_DOC
from cellvec.service.responses import error_body, json_response, send_bytes, validation_message

PARSE_IN_THREAD_BYTES = 256 * 1024  # bigger bodies are parsed off the event loop
# h5ad uploads read at once: each may decode to `untrusted.MAX_DECODED_BYTES` (and anndata
# holds a copy or two), so a burst of uploads waits here instead of filling the memory
UPLOAD_SLOTS = 2

MAP_ROUTE = re.compile(r"/v1/atlases/([^/]+)/map")

MAP_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/MapRequest"}},
            ARROW: {"schema": {"type": "string", "format": "binary"}},
        },
    }
}

MAP_DOC = (
    "Map cells given as gene names plus sparse values per cell (JSON, `MapRequest`), as "
    "an Arrow IPC stream, or as a multipart h5ad upload (field `file`). Concurrent "
    "requests are micro-batched; answers are JSON, or Arrow on request.\n\n" + ARROW_SCHEMA_DOC
)


def add_atlas_routes(app, ctx: Served):
    """GET /v1/atlases; returns `answer(atlas, parse, body, arrow, in_thread=False)`, which
    the map routes and the fast path share."""
    store, atlases_cache, batcher = ctx.store, ctx.atlases, ctx.batcher

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
        atlas: str, parse, body: bytes, arrow: bool, in_thread: bool = False, slots=None
    ) -> tuple[bytes, str]:
        """Parse `body` into a job (off the event loop when big, or `in_thread`; holding
        one of `slots`, an asyncio.Semaphore, if given), map it in a batch, answer."""
        served = await served_atlas(atlas)
        if in_thread or len(body) > PARSE_IN_THREAD_BYTES:
            async with slots or contextlib.nullcontext():
                job = await asyncio.get_running_loop().run_in_executor(None, parse, body)
        else:
            job = parse(body)
        res = await batcher.submit((atlas, served.version), served, job, job.n_cells)
        if arrow:
            return mapping.render_arrow(served, job, res), ARROW
        return mapping.render_json(served, job, res), "application/json"

    return answer


def fast_path(answer, healthz_body: bytes):
    """The Guard's `fast(scope, headers, body, send) -> handled?` over `answer`."""

    async def fast(scope, headers: dict, body: bytes, send) -> bool:
        """The two hot routes without FastAPI's routing and dependency solving (same
        answers and errors): GET /healthz, and POST /map with a JSON body or an Arrow body
        without query options. Anything else goes the ordinary way."""
        path = scope["path"]
        if path == "/healthz" and scope["method"] == "GET":
            await send_bytes(send, 200, healthz_body, b"application/json")
            return True
        match = MAP_ROUTE.fullmatch(path)
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
            status, content, media_type = 422, error_body(str(e)), "application/json"
        except ValidationError as e:
            message = validation_message(e.errors(), prefix=("body",))
            status, content, media_type = 422, error_body(message), "application/json"
        except HTTPException as e:
            status, content, media_type = (
                e.status_code,
                error_body(str(e.detail)),
                "application/json",
            )
        await send_bytes(send, status, content, media_type.encode())
        return True

    return fast


def add_map_routes(app, answer):
    """POST /v1/atlases/{atlas}/map and its h5ad-upload twin /map_h5ad (at most
    `UPLOAD_SLOTS` uploads read at once)."""

    uploads = asyncio.Semaphore(UPLOAD_SLOTS)

    async def respond(
        request: Request, atlas: str, parse, body: bytes, in_thread: bool = False, slots=None
    ) -> Response:
        arrow = ARROW in request.headers.get("accept", "")
        content, media_type = await answer(atlas, parse, body, arrow, in_thread, slots)
        return Response(content, media_type=media_type)

    @app.post("/v1/atlases/{atlas}/map", openapi_extra=MAP_SCHEMA, description=MAP_DOC)
    async def map_cells(
        atlas: str,
        request: Request,
        k: int | None = Query(
            None, ge=1, le=200, description="Arrow bodies: neighbours (default: the atlas's)"
        ),
        min_confidence: float = Query(0.0, ge=0, le=1, description="Arrow bodies"),
        min_typicality: float = Query(0.0, ge=0, le=1, description="Arrow bodies"),
        min_mixing: float = Query(
            0.0, ge=0, le=1, description="Arrow bodies: the request's cells are one query"
        ),
        exclude_labels: str = Query(
            "", description="Arrow bodies: labels never given, comma-separated"
        ),
        scores: bool = Query(False, description="Arrow bodies: per-class scores"),
        vectors: bool = Query(False, description="Arrow bodies: cell vectors"),
    ):
        """Map cells (JSON, Arrow IPC or an h5ad upload); `MAP_DOC` says more."""
        body = await request.body()
        ctype = request.headers.get("content-type", "")
        if ctype.startswith(ARROW):
            options = dict(
                k=k,
                min_confidence=min_confidence,
                min_typicality=min_typicality,
                min_mixing=min_mixing,
                exclude_labels=exclude_labels,
            )
            outputs = dict(options=options, scores=scores, vectors=vectors)
            return await respond(request, atlas, _with(mapping.job_from_arrow, outputs), body)
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
        orthologs: UploadFile | None = File(None),
        k: int | None = Query(None, ge=1, le=200),
        min_confidence: float = Query(0.0, ge=0, le=1),
        min_typicality: float = Query(0.0, ge=0, le=1),
        min_mixing: float = Query(0.0, ge=0, le=1),
        exclude_labels: str = Query(""),
        scores: bool = False,
        vectors: bool = False,
    ):
        """Map the cells of an uploaded .h5ad file (and, optionally, an ortholog table)."""
        data = await file.read()
        options = dict(
            k=k,
            min_confidence=min_confidence,
            min_typicality=min_typicality,
            min_mixing=min_mixing,
            exclude_labels=exclude_labels,
            orthologs=await orthologs.read() if orthologs is not None else None,
        )
        # an upload is walked (check_hdf5) and read by anndata: never on the event loop
        outputs = dict(options=options, scores=scores, vectors=vectors)
        parse = _with(mapping.job_from_h5ad, outputs)
        return await respond(request, atlas, parse, data, in_thread=True, slots=uploads)


def _with(parse, options: dict):
    """`parse(body, **options)` as a one-argument function."""

    def run(body):
        return parse(body, **options)

    return run
