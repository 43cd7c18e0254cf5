"""SQL over the store with DuckDB: Lance tables as views, vector helpers, read-only.

Views (stable names): `genes_<model>` per gene table, `genes` for the default
model, `atlas_<name>` per atlas, `mapping_<name>` per saved mapping. The Lance
datasets are scanned in place (no copy).

Helpers: `gene_vector(symbol)` and `text_embedding(text)` return a gene's vector
or a free text's vector (the default model); `array_cosine_similarity(a, b)` is
DuckDB's; table macros `nearest_genes(symbol, k)` and `genes_like(text, k)`.

Read-only: only SELECT-like statements run; the connection cannot read or write
files, nor install or load extensions (DuckDB's `enable_external_access=false`,
then the configuration is locked).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from cellvec.errors import CellvecError
from cellvec.gene_store.store import GeneStore

log = logging.getLogger(__name__)

ALLOWED = {"SELECT", "EXPLAIN", "PRAGMA"}


class SQLError(CellvecError):
    """A query the SQL layer refuses or DuckDB cannot run."""


class StoreSQL:
    """A read-only DuckDB connection over one store."""

    def __init__(self, store: str | Path | GeneStore, *, text_embedder=None):
        import duckdb
        import numpy as np

        # A GeneStore passed in (the service's) keeps its loaded tables cached across queries.
        self.store = store if isinstance(store, GeneStore) else GeneStore(store)
        self.con = duckdb.connect(":memory:")
        self.views: dict[str, str] = {}
        default = None
        for name in self.store.table_names():
            if name.startswith("_"):
                continue
            tbl = self.store.db.open_table(name)
            if name.startswith("genes_"):
                from cellvec.gene_store.store import read_meta

                if not read_meta(tbl).get("complete"):
                    continue
            self.con.register(name, tbl.to_lance())
            self.views[name] = "gene table" if name.startswith("genes_") else name.split("_", 1)[0]
        models = self.store.models()
        if models:
            default = self.store.default_model()
            gt = self.store.load(default)
            from cellvec.gene_store.store import table_name

            self.con.execute(f"CREATE VIEW genes AS SELECT * FROM {table_name(default)}")
            self.views["genes"] = f"default gene table ({default})"
            dim = gt.dimension
            arr = duckdb.array_type(duckdb.sqltype("FLOAT"), dim)
            index = {s: i for i, s in enumerate(gt.genes["symbol"].to_list())}

            def gene_vector(symbol):
                i = index.get(symbol)
                return None if i is None else gt.vectors[i].tolist()

            @lru_cache(maxsize=256)
            def embed(text):
                from cellvec.gene_store.embedders import get_embedder

                emb = text_embedder or get_embedder(default)
                return np.asarray(emb.embed([text])[0], dtype=np.float32).tolist()

            self.con.create_function(
                "gene_vector",
                gene_vector,
                [duckdb.sqltype("VARCHAR")],
                arr,
                null_handling="special",
                side_effects=False,
            )
            self.con.create_function(
                "text_embedding", embed, [duckdb.sqltype("VARCHAR")], arr, side_effects=False
            )
            self.con.execute(
                "CREATE MACRO nearest_genes(sym, k) AS TABLE "
                "SELECT symbol, full_name, array_cosine_similarity(vector, gene_vector(sym)) AS similarity "
                "FROM genes WHERE symbol <> sym ORDER BY similarity DESC LIMIT k"
            )
            self.con.execute(
                "CREATE MACRO genes_like(q, k) AS TABLE "
                "SELECT symbol, full_name, array_cosine_similarity(vector, text_embedding(q)) AS similarity "
                "FROM genes ORDER BY similarity DESC LIMIT k"
            )
        # DuckDB would push WHERE filters into Lance's scanner, whose conversion refuses
        # list columns (atlas top genes) and string filters on polars-written mapping
        # tables; DuckDB applies them itself instead (columns are still projected).
        self.con.execute("SET disabled_optimizers = 'filter_pushdown'")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        log.info("SQL views: %s", ", ".join(sorted(self.views)) or "none")

    def check(self, sql: str) -> None:
        import duckdb

        try:
            statements = self.con.extract_statements(sql)
        except duckdb.Error as e:
            raise SQLError(f"SQL syntax error: {e}") from e
        if not statements:
            raise SQLError("Empty query.")
        for st in statements:
            kind = st.type.name
            if kind not in ALLOWED:
                raise SQLError(
                    f"{kind} statements are not allowed: cellvec sql is read-only (SELECT only). "
                    "Export results with --format csv|json|parquet instead of COPY."
                )

    def execute(self, sql: str, *, batch_rows: int = 10_000) -> Iterator:
        """Run a read-only query; yields pyarrow RecordBatches (streamed, not materialised)."""
        import duckdb

        self.check(sql)
        try:
            reader = self.con.sql(sql).to_arrow_reader(batch_rows)
        except duckdb.Error as e:
            raise SQLError(f"{type(e).__name__}: {e}") from e
        yield from reader

    def query(self, sql: str):
        """The whole result as a polars DataFrame (for small results)."""
        import polars as pl
        import pyarrow as pa

        batches = list(self.execute(sql))
        if not batches:
            return pl.DataFrame()
        return pl.from_arrow(pa.Table.from_batches(batches))


def connect_sql(store: str | Path, **kwargs) -> StoreSQL:
    """A read-only DuckDB connection over the store's tables (see module docstring)."""
    return StoreSQL(store, **kwargs)


def write_result(batches, fmt: str, out) -> int:
    """Write streamed batches as table/csv/json (to a text stream) or parquet (to a path). Returns rows."""
    import pyarrow as pa

    n = 0
    if fmt == "parquet":
        import pyarrow.parquet as pq

        writer = None
        for b in batches:
            if writer is None:
                writer = pq.ParquetWriter(out, b.schema)
            writer.write_batch(b)
            n += b.num_rows
        if writer is not None:
            writer.close()
        return n
    header = True
    first = True
    for b in batches:
        rows = pa.Table.from_batches([b]).to_pylist()
        n += len(rows)
        if fmt == "json":
            import json

            for r in rows:
                out.write(json.dumps(r, default=str) + "\n")
        elif fmt == "csv":
            import csv

            w = csv.writer(out, lineterminator="\n")  # LF, as DuckDB writes CSV and shells expect
            if header:
                w.writerow(b.schema.names)
                header = False
            for r in rows:
                w.writerow([_cell(v) for v in r.values()])
        else:
            if first:
                out.write(" | ".join(b.schema.names) + "\n")
                out.write("-+-".join("-" * len(c) for c in b.schema.names) + "\n")
                first = False
            for r in rows:
                out.write(" | ".join(_cell(v) for v in r.values()) + "\n")
    return n


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 6:
        return "[" + ", ".join(_cell(x) for x in v[:3]) + f", ... ({len(v)})]"
    return "" if v is None else str(v)
