"""`cellvec sql`: read-only DuckDB over the store, one query or a shell."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from cellvec.cli.options import store_option


@click.command("sql")
@click.argument("query", required=False)
@store_option
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json", "parquet"]),
    default="table",
    show_default=True,
    help="Output format (json: one object per line).",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    help="Write here instead of stdout (required for parquet).",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Stop a query after this many seconds (default: no limit; Ctrl-C stops one).",
)
def sql_cmd(query, store, fmt, output, timeout):
    """Run read-only SQL (DuckDB) over the store; no QUERY opens an interactive shell.

    \b
    Views: genes, genes_<model>, atlas_<name>, mapping_<name>.
    Helpers: gene_vector(sym), text_embedding(text), array_cosine_similarity(a, b),
             nearest_genes(sym, k), genes_like(text, k).
    \b
    Example:
      cellvec sql "SELECT * FROM genes_like('axon regeneration', 10)" --store store/
    """
    from dataclasses import replace

    from cellvec.sql import LOCAL_LIMITS, connect_sql, write_result

    conn = connect_sql(store, limits=replace(LOCAL_LIMITS, timeout_s=timeout))
    if query is None:
        _shell(conn)
        return
    if fmt == "parquet" and not output:
        raise click.UsageError("--format parquet needs -o FILE.parquet.")
    if output:
        from cellvec._files import check_folder

        check_folder(output)  # named as the user gave it, before the query runs
    result = conn.execute(query)  # a refused or failing query writes nothing
    n = _write_file(result, fmt, Path(output)) if output else write_result(result, fmt, sys.stdout)
    click.echo(f"{n:,} rows", err=True)


def _write_file(result, fmt: str, output: Path) -> int:
    """`write_result` into `output` whole: a query that fails while its rows stream
    leaves `output` as it was."""
    from cellvec._files import replacing
    from cellvec.sql import write_result

    with replacing(output) as tmp:
        if fmt == "parquet":  # no rows: no file, as before
            return write_result(result, fmt, str(tmp))
        with open(tmp, "w", newline="") as fh:
            return write_result(result, fmt, fh)


def _shell(conn):
    from cellvec.errors import CellvecError
    from cellvec.sql import write_result

    with contextlib.suppress(ImportError):
        import readline  # noqa: F401  (history and line editing)
    click.echo(
        f"cellvec SQL (read-only). Views: {', '.join(sorted(conn.views))}. End a query with ';', quit with .quit",
        err=True,
    )
    buf = []
    while True:
        try:
            line = input("cellvec> " if not buf else "   ...> ")
        except EOFError:
            click.echo("", err=True)
            return
        if line.strip() in (".quit", ".exit", "\\q"):
            return
        buf.append(line)
        if line.rstrip().endswith(";"):
            q = "\n".join(buf)
            buf = []
            try:
                write_result(conn.execute(q), "table", sys.stdout)
            except CellvecError as e:
                click.echo(f"Error: {e}", err=True)
