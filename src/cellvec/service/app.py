"""The HTTP API. Start with `cellvec serve --store DIR`; OpenAPI docs at /docs.

Atlases and gene tables load once and are shared by all requests. Each request
checks (at most once a second) whether an atlas's table has a newer committed
version and then loads it whole, so a rebuilt atlas is picked up without a
restart and a reader never sees a half-written table.
"""

import hmac
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

# FastAPI resolves endpoint annotations from this module's globals.
from fastapi import Body, File, Query, UploadFile  # noqa: E402,F401

from cellvec.errors import CellvecError, StoreError
from cellvec.service.schemas import MapRequest, SQLRequest

log = logging.getLogger(__name__)

TOKEN_ENV = "CELLVEC_API_TOKEN"
MAX_BODY_BYTES = 64 * 1024 * 1024


class _State:
    def __init__(self, store: str, version_check_s: float = 1.0):
        from cellvec.gene_store.store import GeneStore

        self.store = store
        self.gene_store = GeneStore(store)
        self.lock = threading.Lock()
        self.atlases: dict[str, tuple[float, object]] = {}
        self.version_check_s = version_check_s

    def atlas(self, name: str):
        from cellvec.cell_index.atlas import ATLAS_PREFIX, Atlas

        now = time.monotonic()
        cached = self.atlases.get(name)
        if cached and now - cached[0] < self.version_check_s:
            return cached[1]
        tbl = self.gene_store.open_table(ATLAS_PREFIX + name)
        if tbl is None:
            raise KeyError(name)
        with self.lock:
            cached = self.atlases.get(name)
            if cached and cached[1].version == tbl.version:
                self.atlases[name] = (now, cached[1])
                return cached[1]
            atlas = Atlas.open(self.store, name)
            atlas.encoder(self.gene_store)
            atlas.index()
            self.atlases[name] = (now, atlas)
            log.info(
                "Loaded atlas %s (version %d, %s cells)",
                name,
                atlas.version,
                f"{len(atlas.vectors):,}",
            )
            return atlas


def create_app(
    store: str | Path,
    *,
    enable_sql: bool = False,
    token: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    sql_max_rows: int = 10_000,
    sql_timeout_s: float = 10.0,
):
    """The FastAPI application over one store. `token` (or $CELLVEC_API_TOKEN) turns on bearer auth."""
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    from cellvec import __version__

    store = str(store)
    if not Path(store).exists():
        raise StoreError(f"No gene store at {store}: build one with `cellvec genes build`.")
    token = token if token is not None else os.environ.get(TOKEN_ENV) or None
    state = _State(store)
    app = FastAPI(
        title="cellvec",
        version=__version__,
        description="Map single cells onto reference atlases; search genes; read-only SQL.",
    )

    def error(status: int, message: str):
        return JSONResponse(status_code=status, content={"error": message})

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > max_body_bytes:
            return error(
                413,
                f"Request body of {int(length):,} bytes exceeds the limit of {max_body_bytes:,}; "
                "split the cells over several requests.",
            )
        if token and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            if not hmac.compare_digest(auth.encode(), f"Bearer {token}".encode()):
                return error(
                    401,
                    f"Missing or wrong bearer token: send 'Authorization: Bearer <{TOKEN_ENV}>'.",
                )
        if request.url.path.endswith("/map") and request.headers.get("content-type", "").startswith(
            "multipart/form-data"
        ):
            # DESIGN: /map takes JSON or an h5ad upload; uploads go to the upload handler.
            request.scope["path"] = request.url.path + "_h5ad"
        try:
            return await call_next(request)
        except Exception:  # never a stack trace to the client
            log.exception("Unhandled error on %s", request.url.path)
            return error(500, "Internal error; the server log has the details.")

    @app.exception_handler(CellvecError)
    async def cellvec_error(request, exc):
        return error(422, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        return error(422, f"Invalid request: {msgs}")

    @app.exception_handler(HTTPException)
    async def http_error(request, exc):
        return error(exc.status_code, str(exc.detail))

    @app.get("/healthz")
    def healthz():
        """Liveness: the process answers."""
        return {"status": "ok", "version": __version__}

    @app.get("/readyz")
    def readyz():
        """Readiness: the store opens and has a complete gene table."""
        try:
            models = state.gene_store.models()
        except Exception as e:  # noqa: BLE001
            return error(503, f"Store not readable: {e}")
        if not models:
            return error(503, "The store has no complete gene table yet.")
        return {"status": "ready", "models": models}

    def get_atlas(name: str):
        try:
            return state.atlas(name)
        except KeyError:
            from cellvec.cell_index.atlas import list_atlases

            raise HTTPException(
                404, f"No atlas {name!r}; atlases: {', '.join(list_atlases(store)) or 'none'}."
            ) from None

    @app.get("/v1/atlases")
    def atlases():
        """Atlases of the store with their recipes and classes."""
        from cellvec.cell_index.atlas import list_atlases

        return {"atlases": [get_atlas(n).summary() for n in list_atlases(store)]}

    def _map(atlas, adata, k, min_confidence, scores):
        from cellvec.cell_index.mapping import map_cells

        res = map_cells(adata, atlas, k=k, min_confidence=min_confidence)
        cells = []
        for i, cid in enumerate(res.cell_ids):
            c = {
                "id": cid,
                "label": str(res.labels[i]),
                "confidence": round(float(res.confidence[i]), 4),
            }
            if scores:
                c["scores"] = {
                    str(cl): round(float(s), 4)
                    for cl, s in zip(res.classes, res.scores[i])
                    if s > 0
                }
            cells.append(c)
        return {"atlas": atlas.name, "n_cells": len(cells), "k": k, "cells": cells}

    @app.post("/v1/atlases/{atlas}/map")
    def map_json(atlas: str, body: MapRequest = Body(...)):
        """Map cells given as gene names plus sparse values per cell."""
        import anndata as ad
        import pandas as pd

        a = get_atlas(atlas)
        x = _cells_to_csr(body.cells, len(body.genes))
        adata = ad.AnnData(
            x,
            obs=pd.DataFrame(index=[c.id for c in body.cells]),
            var=pd.DataFrame(index=body.genes),
        )
        return _map(a, adata, body.k, body.min_confidence, body.scores)

    @app.post("/v1/atlases/{atlas}/map_h5ad")
    def map_h5ad(
        atlas: str,
        file: UploadFile = File(...),
        k: int = Query(15, ge=1, le=200),
        min_confidence: float = Query(0.0, ge=0, le=1),
        scores: bool = False,
    ):
        """Map the cells of an uploaded .h5ad file."""
        import tempfile

        import anndata as ad

        a = get_atlas(atlas)
        with tempfile.NamedTemporaryFile(suffix=".h5ad") as tmp:
            tmp.write(file.file.read())
            tmp.flush()
            try:
                adata = ad.read_h5ad(tmp.name)
            except Exception as e:  # noqa: BLE001
                raise CellvecError(
                    f"The upload is not a readable .h5ad file ({type(e).__name__})."
                ) from e
        return _map(a, adata, k, min_confidence, scores)

    @app.get("/v1/genes/search")
    def gene_search(
        q: str = Query(..., min_length=1, max_length=2000),
        k: int = Query(10, ge=1, le=1000),
        model: str | None = None,
    ):
        """Genes whose texts are nearest to a free-text query."""
        res = state.gene_store.search(q, model=model, k=k)
        return {"query": q, "results": res.drop("text").to_dicts()}

    @app.get("/v1/genes/{symbol}/neighbors")
    def gene_neighbors(symbol: str, k: int = Query(10, ge=1, le=1000), model: str | None = None):
        """Genes nearest to a gene of the store."""
        try:
            res = state.gene_store.search(gene=symbol, model=model, k=k)
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
        from cellvec.sql import StoreSQL

        conn = StoreSQL(state.gene_store)
        timer = threading.Timer(sql_timeout_s, conn.con.interrupt)
        timer.start()
        rows, truncated, columns = [], False, []
        try:
            for batch in conn.execute(body.query):
                columns = batch.schema.names
                for r in batch.to_pylist():
                    if len(rows) >= sql_max_rows:
                        truncated = True
                        break
                    rows.append(r)
                if truncated:
                    break
        except CellvecError as e:
            if "INTERRUPT" in str(e).upper():
                raise HTTPException(
                    408, f"The query ran past the {sql_timeout_s:g} s limit."
                ) from None
            raise
        finally:
            timer.cancel()
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
    return create_app(store, enable_sql=os.environ.get("CELLVEC_ENABLE_SQL") == "1")


def _array(values, kinds: str, what: str, cell_id: str) -> np.ndarray:
    if not isinstance(values, list):
        raise CellvecError(f"Cell {cell_id!r}: {what} must be a list.")
    try:
        arr = np.asarray(values) if values else np.zeros(0, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        arr = np.zeros((0, 0))  # ragged or unconvertible: reported below
    if arr.ndim != 1 or arr.dtype.kind not in kinds:
        raise CellvecError(
            f"Cell {cell_id!r}: {what} must be a flat list of {'integers' if kinds == 'iu' else 'numbers'}."
        )
    return arr


def _cells_to_csr(cells, n_genes: int):
    """Sparse cells x genes matrix from request cells, checked as whole arrays."""
    import scipy.sparse as sp

    idx, vals, indptr = [], [], [0]
    for c in cells:
        i = _array(c.indices, "iu", "indices", c.id)
        v = _array(c.values, "iuf", "values", c.id)
        if len(i) != len(v):
            raise CellvecError(f"Cell {c.id!r}: {len(i)} indices but {len(v)} values.")
        if len(i) and (i.min() < 0 or i.max() >= n_genes):
            raise CellvecError(f"Cell {c.id!r}: gene index out of range 0..{n_genes - 1}.")
        idx.append(i.astype(np.int64))
        vals.append(v.astype(np.float32))
        indptr.append(indptr[-1] + len(i))
    x = sp.csr_matrix(
        (np.concatenate(vals), np.concatenate(idx), np.asarray(indptr)), shape=(len(cells), n_genes)
    )
    x.sum_duplicates()
    return x


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
