"""POST /v1/sql: read-only SQL over the store's views, when the server enables it."""

import threading

import numpy as np
from fastapi import HTTPException

from cellvec.service.context import Served

# FastAPI resolves endpoint annotations from this module's globals.
from cellvec.service.schemas import SQLRequest


def add_sql_route(
    app,
    ctx: Served,
    *,
    enabled: bool,
    max_rows: int,
    timeout_s: float | None,
    slots: int,
):
    """`slots`: SQL queries at once (each DuckDB connection may take SERVICE_LIMITS'
    memory and threads); one more is answered 503."""
    gene_store = ctx.gene_store
    sql_slots = threading.BoundedSemaphore(slots)

    @app.post("/v1/sql")
    def sql(body: SQLRequest):
        """Read-only SQL over the store's views (enabled with `cellvec serve --enable-sql`)."""
        if not enabled:
            raise HTTPException(
                403, "SQL is disabled on this server; start it with `cellvec serve --enable-sql`."
            )
        from contextlib import closing
        from dataclasses import replace

        from cellvec.sql import SERVICE_LIMITS, SQLTimeoutError, StoreSQL

        limits = replace(SERVICE_LIMITS, timeout_s=timeout_s or SERVICE_LIMITS.timeout_s)
        if not sql_slots.acquire(blocking=False):
            raise HTTPException(503, f"{slots} SQL queries are running already; retry in a moment.")
        rows, truncated, columns = [], False, []
        try:  # one batch of max_rows + 1 rows tells whether the answer was truncated
            with (
                StoreSQL(gene_store, limits=limits) as conn,
                closing(conn.execute(body.query, batch_rows=max_rows + 1)) as batches,
            ):
                for batch in batches:
                    columns = batch.schema.names
                    kept = batch.slice(0, max_rows - len(rows))
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
            "max_rows": max_rows,
        }


def _jsonable(rows):
    """SQL rows as JSON values: NaN and infinities as null, bytes as hex, dates as ISO text."""

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
