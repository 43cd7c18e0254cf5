"""SQL over the store with DuckDB: Lance tables as views, vector helpers, read-only.

Views (stable names): `genes_<model>` per gene table, `genes` for the default
model, `atlas_<name>` per atlas, `mapping_<name>` per saved mapping. The Lance
datasets are scanned in place (no copy).

Helpers: `gene_vector(symbol)` and `text_embedding(text)` return a gene's vector
or a free text's vector (the default model); `array_cosine_similarity(a, b)` is
DuckDB's; table macros `nearest_genes(symbol, k)` and `genes_like(text, k)`.

Read-only, whatever the query: `StoreSQL.check` parses the whole statement tree
and runs only one plain SELECT (or WITH ... SELECT) that calls no table function
outside `TABLE_FUNCTIONS` (no EXPLAIN, PRAGMA, SET or CALL wrapper, no `query()`
that would run a string the check never saw). Beneath that gate the connection
cannot touch a file at all (no spill folder, `enable_external_access=false`), nor
install or load extensions, nor see Python variables; then the configuration is
locked. `SQLLimits` bounds what one query may take: time (the Python helpers
included), memory, threads, answer bytes and texts embedded.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cellvec.errors import CellvecError
from cellvec.gene_store.store import GeneStore
from cellvec.gene_store.tables import table_name
from cellvec.storage import Store, read_meta

log = logging.getLogger(__name__)

# The table functions a query may call (in FROM): cellvec's macros, row generators,
# JSON and catalog listings. Anything else (read_csv, glob, query, query_table,
# json_execute_serialized_sql, arrow_scan, enable_logging, ...) is refused by name.
TABLE_FUNCTIONS = frozenset(
    {
        "nearest_genes",
        "genes_like",
        "range",
        "generate_series",
        "unnest",
        "repeat",
        "repeat_row",
        "json_each",
        "json_tree",
        "duckdb_columns",
        "duckdb_constraints",
        "duckdb_databases",
        "duckdb_functions",
        "duckdb_keywords",
        "duckdb_schemas",
        "duckdb_settings",
        "duckdb_tables",
        "duckdb_types",
        "duckdb_views",
        "pragma_table_info",
        "pragma_show",
        "pragma_version",
        "pg_timezone_names",
    }
)


@dataclass(frozen=True)
class SQLLimits:
    """What one query may take. None: no limit of ours (DuckDB's own defaults apply).

    `timeout_s` holds for the Python helpers too (they check it on every call);
    `max_answer_bytes` counts the Arrow bytes read from the answer; `max_texts` is how
    many distinct texts `text_embedding` embeds per query; `memory_limit` and
    `threads` are DuckDB's settings, fixed for the connection's life.
    """

    timeout_s: float | None = None
    max_answer_bytes: int | None = None
    max_texts: int | None = 256
    memory_limit: str | None = None
    threads: int | None = None


# `cellvec sql`: the user's own machine and data, streamed to a file or the terminal;
# no time limit unless --timeout (Ctrl-C stops a query), DuckDB's memory default.
LOCAL_LIMITS = SQLLimits(max_texts=None)
# `POST /v1/sql` (`cellvec serve --enable-sql`): one query cannot hold the server.
SERVICE_LIMITS = SQLLimits(
    timeout_s=10.0, max_answer_bytes=16 * 2**20, memory_limit="1GB", threads=2
)


class SQLError(CellvecError):
    """A query the SQL layer refuses or DuckDB cannot run."""


class SQLTimeoutError(SQLError):
    """A query ran past its time limit (`SQLLimits.timeout_s`)."""


class StoreSQL:
    """A read-only DuckDB connection over one store, bounded by `limits`."""

    def __init__(
        self,
        store: str | Path | Store | GeneStore,
        *,
        text_embedder=None,
        limits: SQLLimits = LOCAL_LIMITS,
    ):
        import duckdb
        import numpy as np

        # A GeneStore passed in (the service's) keeps its loaded tables cached across queries.
        self.genes = store if isinstance(store, GeneStore) else GeneStore(store)
        self.store = self.genes.store
        self.limits = limits
        self.con = duckdb.connect(":memory:")
        self.views: dict[str, str] = {}
        # The running query's budget, read by the Python helpers on every call.
        self._deadline: float | None = None
        self._texts: set[str] = set()
        self._failure: SQLError | None = None
        self._lock = threading.Lock()
        default = None
        for name in self.store.table_names():
            if name.startswith("_"):
                continue
            tbl = self.store.db.open_table(name)
            if name.startswith("genes_") and not read_meta(tbl).get("complete"):
                continue
            self.con.register(name, tbl.to_lance())
            self.views[name] = "gene table" if name.startswith("genes_") else name.split("_", 1)[0]
        models = self.genes.models()
        if models:
            default = self.genes.default_model()
            gt = self.genes.load(default)

            self.con.execute(f"CREATE VIEW genes AS SELECT * FROM {table_name(default)}")
            self.views["genes"] = f"default gene table ({default})"
            dim = gt.dimension
            arr = duckdb.array_type(duckdb.sqltype("FLOAT"), dim)
            index = {s: i for i, s in enumerate(gt.genes["symbol"].to_list())}

            def gene_vector(symbol):
                self._check_deadline()
                i = index.get(symbol)
                return None if i is None else gt.vectors[i].tolist()

            @lru_cache(maxsize=256)
            def embed(text):
                from cellvec.gene_store.embedders import get_embedder

                emb = text_embedder or get_embedder(default)
                return np.asarray(emb.embed([text])[0], dtype=np.float32).tolist()

            def text_embedding(text):
                self._check_deadline()
                self._count_text(text)
                return embed(text)

            self.con.create_function(
                "gene_vector",
                gene_vector,
                [duckdb.sqltype("VARCHAR")],
                arr,
                null_handling="special",
                side_effects=False,
            )
            self.con.create_function(
                "text_embedding",
                text_embedding,
                [duckdb.sqltype("VARCHAR")],
                arr,
                side_effects=False,
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
        self._lock_down()
        log.info("SQL views: %s", ", ".join(sorted(self.views)) or "none")

    def _lock_down(self) -> None:
        """Settings a query cannot change: every one is set before the configuration is locked."""
        # DuckDB would push WHERE filters into Lance's scanner, whose conversion refuses
        # list columns (atlas top genes) and string filters on polars-written mapping
        # tables; DuckDB applies them itself instead (columns are still projected).
        self.con.execute("SET disabled_optimizers = 'filter_pushdown'")
        # No spill folder: DuckDB's default (`.tmp` under the working directory) is put on
        # the allowed list even with external access off, so a query could read and write
        # there. A query that outgrows memory fails instead of spilling to disk.
        self.con.execute("SET temp_directory = ''")
        # No server directory to read back: DuckDB's default secret folder is under the
        # home directory of the user the server runs as (current_setting shows it).
        self.con.execute("SET secret_directory = ''")
        if self.limits.memory_limit is not None:
            self.con.execute("SET memory_limit = ?", [self.limits.memory_limit])
        if self.limits.threads is not None:
            self.con.execute("SET threads = ?", [self.limits.threads])
        # No scans of the caller's Python variables by name (only registered views).
        self.con.execute("SET python_enable_replacements = false")
        self.con.execute("SET autoinstall_known_extensions = false")
        self.con.execute("SET autoload_known_extensions = false")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> StoreSQL:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, sql: str) -> None:
        """Refuse anything but one plain SELECT (or WITH ... SELECT) calling allowed table functions.

        The decision is made on DuckDB's own parse of the whole statement tree
        (`json_serialize_sql`, which serialises SELECT statements only), not on the
        outer statement type: EXPLAIN ANALYZE, PRAGMA and the like can wrap anything.
        """
        import duckdb

        try:
            statements = self.con.extract_statements(sql)
        except duckdb.Error as e:
            raise SQLError(f"SQL syntax error: {e}") from e
        if not statements:
            raise SQLError("Empty query.")
        if len(statements) > 1:
            raise SQLError(
                f"The query holds {len(statements)} statements; cellvec sql runs one at a time: "
                "send them separately."
            )
        kind = statements[0].type.name
        if kind != "SELECT":
            raise SQLError(
                f"{kind} statements are not allowed: cellvec sql is read-only and runs one "
                f"SELECT (or WITH ... SELECT) at a time.{_HINTS.get(kind, '')}"
            )
        [(tree,)] = self.con.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchall()
        try:
            tree = json.loads(tree)
        except RecursionError:
            raise SQLError(
                "The query is nested too deeply to be checked; flatten subqueries into WITH clauses."
            ) from None
        if tree.get("error") or len(tree.get("statements", ())) != 1:
            raise SQLError(
                "Only a plain SELECT (or WITH ... SELECT) may run: "
                f"{tree.get('error_message', 'the query is not one SELECT statement')}."
            )
        for name in _table_functions(tree["statements"]):
            if name not in TABLE_FUNCTIONS:
                raise SQLError(
                    f"Table function {name}() is not allowed: cellvec sql reads only the store's "
                    f"views (see SHOW TABLES). Allowed: {', '.join(sorted(TABLE_FUNCTIONS))}."
                )

    def execute(self, sql: str, *, batch_rows: int = 10_000) -> Iterator:
        """Run a read-only query within `self.limits`; yields pyarrow RecordBatches (streamed).

        Past `limits.timeout_s` the query is interrupted (and the Python helpers refuse
        to go on), raising `SQLTimeoutError`; an answer past `limits.max_answer_bytes`
        raises `SQLError` before the batch that crosses it is yielded.
        """
        import duckdb
        import pyarrow as pa

        self.check(sql)
        timeout = self.limits.timeout_s
        cap = self.limits.max_answer_bytes
        self._texts.clear()
        self._failure = None
        self._deadline = None if timeout is None else time.monotonic() + timeout
        timer = None if timeout is None else threading.Timer(timeout, self.con.interrupt)
        if timer is not None:
            timer.daemon = True
            timer.start()
        try:
            reader = self.con.sql(sql).to_arrow_reader(batch_rows)
            size = 0
            for batch in reader:
                size += batch.nbytes
                if cap is not None and size > cap:
                    raise SQLError(
                        f"The answer is larger than the {cap / 2**20:g} MiB limit; add LIMIT, "
                        "select fewer columns (a vector column is large), or aggregate."
                    )
                yield batch
        except (duckdb.Error, pa.ArrowException, OSError) as e:
            raise self._error(e) from e
        finally:
            if timer is not None:
                timer.cancel()
            self._deadline = None

    def query(self, sql: str):
        """The whole result as a polars DataFrame (for small results)."""
        import polars as pl
        import pyarrow as pa

        batches = list(self.execute(sql))
        if not batches:
            return pl.DataFrame()
        return pl.from_arrow(pa.Table.from_batches(batches))

    def _check_deadline(self) -> None:
        """Called by the Python helpers on every call: DuckDB's interrupt does not stop them."""
        if self._deadline is not None and time.monotonic() > self._deadline:
            raise self._fail(SQLTimeoutError(self._timeout_message()))

    def _count_text(self, text: str) -> None:
        with self._lock:
            if text in self._texts:
                return
            cap = self.limits.max_texts
            if cap is not None and len(self._texts) >= cap:
                raise self._fail(
                    SQLError(
                        f"text_embedding() embeds at most {cap} distinct texts "
                        "per query; compare with the stored gene vectors (the vector column, "
                        "gene_vector()) or split the query."
                    )
                )
            self._texts.add(text)

    def _fail(self, error: SQLError) -> SQLError:
        # DuckDB wraps a helper's exception in its own; execute() raises the original.
        self._failure = error
        return error

    def _timeout_message(self) -> str:
        return (
            f"The query ran past the {self.limits.timeout_s:g} s limit; add LIMIT or a WHERE "
            "filter, or call text_embedding() on fewer texts."
        )

    def _error(self, e: Exception) -> SQLError:
        if self._failure is not None:
            return self._failure
        message = str(e)
        if "INTERRUPT" in message.upper():
            return SQLTimeoutError(self._timeout_message())
        if "Out of Memory" in message:
            return SQLError(
                f"The query needs more memory than the {self.limits.memory_limit or 'DuckDB'} "
                f"limit allows; add LIMIT or a WHERE filter, or aggregate. ({message.splitlines()[0]})"
            )
        return SQLError(f"{type(e).__name__}: {message}")


_HINTS = {
    "MULTI": " PIVOT and UNPIVOT expand into several statements: write the same with GROUP BY "
    "and FILTER (count(*) FILTER (WHERE ...)).",
    "COPY": " Export results with --format csv|json|parquet instead of COPY.",
    "EXPLAIN": " EXPLAIN is refused because it can wrap any statement (EXPLAIN ANALYZE runs it).",
    "PRAGMA": " To list views or columns use SHOW TABLES or DESCRIBE <view>.",
}


def _table_functions(tree) -> Iterator[str]:
    """Names of the table functions called anywhere in a json_serialize_sql tree."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "TABLE_FUNCTION":
                function = node.get("function")
                name = function.get("function_name") if isinstance(function, dict) else None
                yield str(name).lower()
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


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
