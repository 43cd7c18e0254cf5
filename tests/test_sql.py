import io

import pytest

from cellvec.cell_index.build import build_atlas
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.recipe import Recipe
from cellvec.sql import SQLError, connect_sql, write_result
from helpers import FakeEmbedder, tiny_adata


@pytest.fixture
def full_store(fake_store):
    build_atlas(
        tiny_adata(n_cells=60, seed=1),
        store=fake_store,
        name="tiny",
        label_key="cell_type",
        recipe=Recipe(top_genes=10),
    )
    map_cells(
        tiny_adata(n_cells=30, seed=2, prefix="q"), "tiny", store=fake_store, truth_key="cell_type"
    ).save(fake_store, "q1")
    return fake_store


def test_views_have_stable_names(full_store):
    conn = connect_sql(full_store, text_embedder=FakeEmbedder())
    assert {"genes", "genes_fake", "atlas_tiny", "mapping_q1"} <= set(conn.views)
    assert conn.query("SELECT count(*) AS n FROM genes")["n"][0] == 30
    assert conn.query("SELECT count(*) AS n FROM atlas_tiny")["n"][0] == 60
    df = conn.query(
        "SELECT cellvec_label, avg(cellvec_confidence) AS c FROM mapping_q1 GROUP BY 1 ORDER BY 1"
    )
    assert df["cellvec_label"].to_list() == ["B", "M", "T"]


def test_vector_helpers(full_store):
    conn = connect_sql(full_store, text_embedder=FakeEmbedder())
    near = conn.query("SELECT * FROM nearest_genes('TGENE0', 5)")
    assert near.height == 5 and all(s.startswith("T") for s in near["symbol"])
    like = conn.query("SELECT * FROM genes_like('B cell receptor signaling immunoglobulin', 5)")
    assert all(s.startswith("B") for s in like["symbol"])
    sim = conn.query(
        "SELECT array_cosine_similarity(gene_vector('TGENE0'), gene_vector('TGENE0')) AS s"
    )
    assert sim["s"][0] == pytest.approx(1.0, abs=1e-5)
    assert conn.query("SELECT gene_vector('NOPE') IS NULL AS missing")["missing"][0]


@pytest.mark.parametrize(
    "sql, message",
    [
        ("CREATE TABLE x AS SELECT 1", "CREATE statements are not allowed"),
        ("DELETE FROM genes", "DELETE statements are not allowed"),
        ("COPY (SELECT 1) TO '/tmp/x.csv'", "COPY statements are not allowed"),
        ("INSTALL httpfs", "statements are not allowed"),
        ("SELECT * FROM read_csv('/etc/passwd')", "read_csv\\(\\) is not allowed"),
        ("SELECT * FROM '/etc/passwd'", "/etc/passwd does not exist"),  # no file scans
        ("SET enable_external_access = true", "SET statements are not allowed"),
        ("EXPLAIN SELECT 1", "EXPLAIN statements are not allowed"),
        ("PRAGMA show_tables", "PRAGMA statements are not allowed"),
        ("SELEC 1", "syntax error"),
    ],
)
def test_read_only(full_store, sql, message):
    conn = connect_sql(full_store, text_embedder=FakeEmbedder())
    with pytest.raises(SQLError, match=message):
        conn.query(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "WITH t AS (SELECT label FROM atlas_tiny) SELECT count(*) FROM t",
        "SELECT * FROM nearest_genes('TGENE0', 3)",
        "SELECT * FROM genes_like('immune synapse', 3) -- a comment",
        "/* comment */ SELECT symbol FROM genes LIMIT 2;",
        "FROM genes SELECT symbol LIMIT 1",
        "SHOW TABLES",
        "DESCRIBE genes",
        "SUMMARIZE SELECT gene_id FROM genes",
        "SELECT * FROM range(3) UNION ALL SELECT * FROM generate_series(1, 2)",
        "SELECT * FROM duckdb_views() WHERE NOT internal",
    ],
)
def test_read_queries_pass_the_gate(full_store, sql):
    conn = connect_sql(full_store, text_embedder=FakeEmbedder())
    assert conn.query(sql).height > 0


def test_streamed_output_formats(full_store, tmp_path):
    conn = connect_sql(full_store, text_embedder=FakeEmbedder())
    q = "SELECT symbol, gene_id FROM genes ORDER BY gene_id"
    batches = list(conn.execute(q, batch_rows=7))
    assert len(batches) >= 4 and sum(b.num_rows for b in batches) == 30  # streamed in batches
    buf = io.StringIO()
    assert write_result(conn.execute(q), "csv", buf) == 30
    assert buf.getvalue().splitlines()[0] == "symbol,gene_id"
    buf = io.StringIO()
    write_result(conn.execute(q), "json", buf)
    assert buf.getvalue().count("\n") == 30
    import polars as pl

    write_result(conn.execute(q), "parquet", str(tmp_path / "x.parquet"))
    assert pl.read_parquet(tmp_path / "x.parquet").height == 30


def test_csv_lines_end_with_lf_for_shell_scripts(full_store, tmp_path):
    """`n=$(cellvec sql ... --format csv | tail -1); [ "$n" = 30 ]` must hold: no CR."""
    from click.testing import CliRunner

    from cellvec.cli import cli

    q = "SELECT count(*) AS n FROM genes"
    args = ["sql", q, "--store", str(full_store), "--format", "csv"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.stdout_bytes == b"n\n30\n"
    res = CliRunner().invoke(cli, [*args, "-o", str(tmp_path / "n.csv")])
    assert res.exit_code == 0 and (tmp_path / "n.csv").read_bytes() == b"n\n30\n"


def test_where_filters_on_atlas_and_mapping_views(full_store):
    """Filters are not pushed into Lance (its pushdown refused list columns and string
    filters on mapping tables); DuckDB applies them."""
    conn = connect_sql(full_store, text_embedder=FakeEmbedder())
    atlas = conn.query("SELECT count(*) AS n FROM atlas_tiny WHERE label = 'B'")["n"][0]
    by_label = conn.query("SELECT label, count(*) AS n FROM atlas_tiny GROUP BY 1")
    assert atlas == dict(zip(by_label["label"], by_label["n"]))["B"] > 0
    mapped = conn.query(
        "SELECT count(*) AS n FROM mapping_q1 WHERE cellvec_label = 'T' AND cellvec_confidence > 0"
    )["n"][0]
    assert 0 < mapped < 30
    genes = conn.query("SELECT symbol FROM genes WHERE symbol = 'TGENE0'")
    assert genes["symbol"].to_list() == ["TGENE0"]
