"""Red-team attacks on the read-only SQL layer (issue 20), through the library, the CLI
(`cellvec sql`) and the service (`POST /v1/sql`). Each test fails if its fix is undone."""

import re
import time

import duckdb
import pytest
from click.testing import CliRunner

from cellvec.cli import cli
from cellvec.sql import SERVICE_LIMITS, SQLError, SQLLimits, SQLTimeoutError, StoreSQL
from helpers import FakeEmbedder


class SlowEmbedder(FakeEmbedder):
    """A model that takes 20 ms a text: 200 texts hold a query for 4 s."""

    def embed_batch(self, texts):
        time.sleep(0.02 * len(texts))
        return super().embed_batch(texts)


def client(store, **options):
    from fastapi.testclient import TestClient

    from cellvec.service import create_app

    return TestClient(create_app(store, enable_sql=True, preload=False, **options))


def run_cli(store, query, *options):
    return CliRunner().invoke(cli, ["sql", query, "--store", str(store), *options])


# Attack 2: statements that wrap, or run, something other than a SELECT.
WRAPPED = [
    ("EXPLAIN ANALYZE CREATE TABLE t AS SELECT 42", "EXPLAIN statements are not allowed"),
    ("EXPLAIN ANALYZE DROP VIEW genes", "EXPLAIN statements are not allowed"),
    ("/* a */ EXPLAIN ANALYZE CREATE VIEW v AS SELECT 1 -- b", "EXPLAIN statements"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO 'p.csv'", "EXPLAIN statements are not allowed"),
    ("EXPLAIN SELECT 1", "EXPLAIN statements are not allowed"),
    ("PRAGMA version", "PRAGMA statements are not allowed"),
    ("CALL pragma_version()", "CALL statements are not allowed"),
    ("RESET threads", "statements are not allowed"),
    ("SELECT 1; DROP VIEW genes", "2 statements"),
    ("SELECT * FROM query('SELECT 42')", "query() is not allowed"),
    ("SELECT * FROM query_table('genes')", "query_table() is not allowed"),
    ("SELECT (SELECT count(*) FROM main.query('SELECT 1')) AS n", "query() is not allowed"),
    (
        "SELECT * FROM json_execute_serialized_sql(json_serialize_sql('SELECT 1'))",
        "json_execute_serialized_sql() is not allowed",
    ),
    ("WITH f AS (SELECT * FROM glob('*')) SELECT * FROM f", "glob() is not allowed"),
]


@pytest.mark.parametrize("sql, message", WRAPPED)
def test_only_a_plain_select_runs_whatever_wraps_it(fake_store, sql, message):
    conn = StoreSQL(fake_store, text_embedder=FakeEmbedder())
    with pytest.raises(SQLError, match=re.escape(message)):
        conn.query(sql)
    assert conn.query("SELECT count(*) AS n FROM genes")["n"][0] == 30  # nothing dropped
    assert "t" not in conn.query("SHOW TABLES")["name"].to_list()  # nothing created


def test_explain_analyze_is_refused_by_the_cli_and_the_service(fake_store):
    res = run_cli(fake_store, "EXPLAIN ANALYZE CREATE TABLE t AS SELECT 42")
    assert res.exit_code != 0 and "EXPLAIN statements are not allowed" in res.output
    r = client(fake_store).post("/v1/sql", json={"query": "EXPLAIN ANALYZE DROP VIEW genes"})
    assert r.status_code == 422 and "EXPLAIN statements are not allowed" in r.json()["error"]


# Attack 3: DuckDB's default spill folder (`.tmp` in the working directory) is on the
# allowed list even with external access off.
def test_no_file_access_through_the_spill_folder(fake_store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "x.txt").write_text("secret")
    conn = StoreSQL(fake_store, text_embedder=FakeEmbedder())
    settings = conn.con.sql(
        "SELECT current_setting('temp_directory'), current_setting('allowed_directories')"
    ).fetchall()
    assert settings == [("", [])]
    # Beneath the gate (which refuses read_text by name), DuckDB itself refuses the folder.
    for sql in [
        "SELECT * FROM read_text('.tmp/x.txt')",
        "EXPLAIN ANALYZE COPY (SELECT 1) TO '.tmp/p.csv'",
    ]:
        with pytest.raises(duckdb.Error, match="disabled by configuration"):
            conn.con.sql(sql).fetchall()
    assert sorted(p.name for p in (tmp_path / ".tmp").iterdir()) == ["x.txt"]
    with pytest.raises(SQLError, match="read_text"):
        conn.query("SELECT * FROM read_text('.tmp/x.txt')")
    with pytest.raises(duckdb.Error, match="locked"):
        conn.con.execute("SET temp_directory = '.tmp'")


# Attack 4: a Python helper held a query far past the server's time limit.
SLOW = "SELECT count(text_embedding('y gene ' || range::VARCHAR)) AS n FROM range(200)"


def test_time_limit_holds_for_python_helpers(fake_store):
    conn = StoreSQL(fake_store, text_embedder=SlowEmbedder(), limits=SQLLimits(timeout_s=0.5))
    t0 = time.monotonic()
    with pytest.raises(SQLTimeoutError, match="0.5 s limit"):
        conn.query(SLOW)
    assert time.monotonic() - t0 < 2.0  # 4 s if the helper ignored the limit
    assert conn.query("SELECT count(*) AS n FROM genes")["n"][0] == 30  # the next query runs


def test_time_limit_over_http_and_on_the_cli(fake_store, monkeypatch):
    import cellvec.gene_store.embedders as registry

    monkeypatch.setattr(registry, "get_embedder", lambda spec, **kw: SlowEmbedder())
    t0 = time.monotonic()
    r = client(fake_store, sql_timeout_s=0.5).post("/v1/sql", json={"query": SLOW})
    assert r.status_code == 408 and "0.5 s limit" in r.json()["error"]
    assert time.monotonic() - t0 < 3.0
    res = run_cli(fake_store, SLOW, "--timeout", "0.5")
    assert res.exit_code != 0 and "0.5 s limit" in res.output


def test_text_embedding_is_capped_per_query(fake_store):
    conn = StoreSQL(fake_store, text_embedder=FakeEmbedder(), limits=SQLLimits(max_texts=8))
    eight = "SELECT count(text_embedding('t' || (range % 8)::VARCHAR)) AS n FROM range(50)"
    assert conn.query(eight)["n"][0] == 50  # repeats are not counted twice
    with pytest.raises(SQLError, match="at most 8 distinct texts"):
        conn.query("SELECT count(text_embedding('t' || range::VARCHAR)) AS n FROM range(9)")
    r = client(fake_store).post(
        "/v1/sql",
        json={"query": "SELECT count(text_embedding('t' || range::VARCHAR)) FROM range(300)"},
    )
    assert r.status_code == 422 and "at most 256 distinct texts" in r.json()["error"]
    local = StoreSQL(fake_store, text_embedder=FakeEmbedder())  # the CLI's: the user's machine
    many = "SELECT count(text_embedding('t' || range::VARCHAR)) AS n FROM range(300)"
    assert local.query(many)["n"][0] == 300


def test_sql_queries_at_once_are_bounded(fake_store, monkeypatch):
    """Each query's connection may take SERVICE_LIMITS' memory and threads: 40 at once
    (anyio's thread pool) would be 40 GB."""
    import cellvec.service.app as app_module

    monkeypatch.setattr(app_module, "SQL_SLOTS", 0)  # every slot taken
    r = client(fake_store).post("/v1/sql", json={"query": "SELECT 1 AS one"})
    assert r.status_code == 503 and "retry" in r.json()["error"]


# Attack 8: one answer row of 100 MB, and no bound on DuckDB's memory.
def test_answer_bytes_are_capped_over_http(fake_store):
    c = client(fake_store)
    r = c.post("/v1/sql", json={"query": "SELECT repeat('x', 20000000) AS big"})
    assert r.status_code == 422
    assert "16 MiB limit" in r.json()["error"] and "LIMIT" in r.json()["error"]
    r = c.post(
        "/v1/sql",
        json={
            "query": "SELECT current_setting('memory_limit') AS m, current_setting('threads') AS t"
        },
    )
    import duckdb

    with duckdb.connect(":memory:") as con:  # DuckDB's own rendering of SERVICE_LIMITS'
        con.execute("SET memory_limit = ?", [SERVICE_LIMITS.memory_limit])
        [(expected,)] = con.execute("SELECT current_setting('memory_limit')").fetchall()
    assert r.status_code == 200
    assert r.json()["rows"] == [{"m": expected, "t": SERVICE_LIMITS.threads}]


def test_memory_limit_refuses_a_query_that_outgrows_it(fake_store):
    assert SERVICE_LIMITS.memory_limit == "1GB" and SERVICE_LIMITS.threads == 2
    conn = StoreSQL(fake_store, text_embedder=FakeEmbedder(), limits=SQLLimits(memory_limit="32MB"))
    with pytest.raises(SQLError, match="32MB limit"):
        conn.query("SELECT count(DISTINCT range) AS n FROM range(10000000)")


def test_no_setting_shows_a_server_directory(fake_store):
    """current_setting('secret_directory') showed the home directory of the user the
    server runs as (/root/.duckdb/stored_secrets)."""
    from pathlib import Path

    conn = StoreSQL(fake_store, text_embedder=FakeEmbedder())
    values = conn.con.sql("SELECT name, value FROM duckdb_settings()").fetchall()
    home = str(Path.home())  # "/" in some containers: then any path would match it
    shown = [(n, v) for n, v in values if "/.duckdb" in str(v) or (home != "/" and home in str(v))]
    assert not shown
    with client(fake_store) as c:
        r = c.post("/v1/sql", json={"query": "SELECT current_setting('secret_directory') AS s"})
    assert r.status_code == 200 and r.json()["rows"] == [{"s": ""}], r.text
