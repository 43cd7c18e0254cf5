"""`cellvec sql`, `serve`, `report`, `explain` and `demo`."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import click

from cellvec.cell_index.recipe import REFINES
from cellvec.cli.options import emit_json, json_option, store_option


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
def sql_cmd(query, store, fmt, output):
    """Run read-only SQL (DuckDB) over the store; no QUERY opens an interactive shell.

    \b
    Views: genes, genes_<model>, atlas_<name>, mapping_<name>.
    Helpers: gene_vector(sym), text_embedding(text), array_cosine_similarity(a, b),
             nearest_genes(sym, k), genes_like(text, k).
    \b
    Example:
      cellvec sql "SELECT * FROM genes_like('axon regeneration', 10)" --store store/
    """
    from cellvec.sql import connect_sql, write_result

    conn = connect_sql(store)
    if query is None:
        _shell(conn)
        return
    if fmt == "parquet" and not output:
        raise click.UsageError("--format parquet needs -o FILE.parquet.")
    if fmt == "parquet":
        n = write_result(conn.execute(query), fmt, output)
    elif output:
        with open(output, "w", newline="") as fh:
            n = write_result(conn.execute(query), fmt, fh)
    else:
        n = write_result(conn.execute(query), fmt, sys.stdout)
    click.echo(f"{n:,} rows", err=True)


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


@click.command("serve")
@store_option
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True)
@click.option(
    "--enable-sql", is_flag=True, help="Expose POST /v1/sql (read-only, row and time limits)."
)
@click.option(
    "--workers",
    default=1,
    show_default=True,
    help="Server processes (each loads the atlases it serves; throughput grows with cores).",
)
def serve_cmd(store, host, port, enable_sql, workers):
    """Serve the HTTP API (OpenAPI docs at /docs). Bearer auth when $CELLVEC_API_TOKEN is set.

    \b
    Example:
      CELLVEC_API_TOKEN=secret cellvec serve --store store/ --port 8000 --enable-sql
    """
    import os

    import uvicorn

    from cellvec.service.app import create_app

    if workers == 1:
        uvicorn.run(
            create_app(store, enable_sql=enable_sql), host=host, port=port, log_level="info"
        )
        return
    create_app(store, enable_sql=enable_sql)  # fail here, once, on a bad store
    os.environ["CELLVEC_STORE"] = str(Path(store).resolve())
    os.environ["CELLVEC_ENABLE_SQL"] = "1" if enable_sql else "0"
    uvicorn.run(
        "cellvec.service.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
    )


@click.command("report")
@click.argument("mapped", type=click.Path(exists=True, dir_okay=False))
@store_option
@click.option(
    "--atlas",
    "atlas_name",
    help="Atlas the cells were mapped onto (default: the one recorded in MAPPED).",
)
@click.option(
    "--truth-key", help="obs column with known labels (adds confusion matrix and per-class F1)."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for report.html and PNGs.",
)
def report_cmd(mapped, store, atlas_name, truth_key, out):
    """Write an HTML report (UMAP, confusion, per-class F1, confidence, recipe) for a mapped .h5ad.

    \b
    Example:
      cellvec report mapped.h5ad --store store/ --truth-key cell_type --out report/
    """
    import anndata as ad

    from cellvec.cell_index.atlas import Atlas
    from cellvec.errors import CellvecError
    from cellvec.evaluation.metrics import classification_metrics
    from cellvec.report import write_report

    a = ad.read_h5ad(mapped)
    for key in ("cellvec_label", "cellvec_confidence"):
        if key not in a.obs.columns:
            raise CellvecError(
                f"{mapped}: no obs['{key}']; write it with `cellvec map ... --out {Path(mapped).name}`."
            )
    name = atlas_name or a.uns.get("cellvec", {}).get("atlas")
    if not name:
        raise CellvecError(f"{mapped}: the atlas is not recorded; give --atlas.")
    atlas = Atlas.open(store, name)
    metrics = None
    if truth_key:
        if truth_key not in a.obs.columns:
            raise CellvecError(f"{mapped}: no obs column {truth_key!r}.")
        metrics = classification_metrics(
            a.obs[truth_key].astype(str), a.obs["cellvec_label"].astype(str)
        )
    path = write_report(
        out,
        ref_vectors=atlas.vectors,
        ref_labels=atlas.labels.astype(str),
        query_vectors=a.obsm["X_cellvec"],
        query_labels=a.obs["cellvec_label"].astype(str).to_numpy(),
        confidence=a.obs["cellvec_confidence"].to_numpy(),
        recipe=atlas.recipe.to_dict(),
        metrics=metrics,
        summary={"mapped": mapped, "atlas": name, "cells": a.n_obs},
        min_confidence=float(a.uns.get("cellvec", {}).get("min_confidence", 0.0)),
    )
    click.echo(str(path))


@click.command("explain")
@click.argument("reference", type=click.Path(exists=True))
@store_option
@click.option("--atlas", "atlas_name", required=True)
@click.option("--subtype", help="Explain this subtype: driving genes and nearest gene texts.")
@click.option(
    "--scores",
    type=click.Path(exists=True, dir_okay=False),
    help="Per-subtype scores (two-column CSV/TSV or JSON): the direction that follows them.",
)
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="With --scores: per-cell positions (.parquet/.csv).",
)
@click.option("-n", "n_genes", default=20, show_default=True)
@json_option
def explain_cmd(reference, store, atlas_name, subtype, scores, out, n_genes, as_json):
    """Explain a subtype of an atlas, or find the direction that follows per-subtype scores.

    \b
    Example:
      cellvec explain ref.h5ad --store store/ --atlas rgc --subtype "W3B" -n 15
      cellvec explain ref.h5ad --store store/ --atlas rgc --scores survival.csv --out positions.parquet
    """
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.explain import explain_subtype, score_direction
    from cellvec.cell_index.mapping import read_label_map

    if (subtype is None) == (scores is None):
        raise click.UsageError("Give --subtype or --scores (one of them).")
    atlas = Atlas.open(store, atlas_name)
    if subtype:
        res = explain_subtype(atlas, subtype, reference, n_genes=n_genes)
        if as_json:
            emit_json(res)
            return
        click.echo(f"{subtype}: {res['n_cells']:,} cells. Genes driving its centroid:")
        for d in res["drivers"]:
            click.echo(
                f"  {d['symbol']:<14} weight {d['mean_weight']:.4f}  contribution {d['contribution']:.4f}"
            )
        click.echo("Nearest gene texts:")
        for t in res["nearest_gene_texts"]:
            click.echo(f"  {t['symbol']:<14} {t['similarity']:.3f}  {'; '.join(t['go_terms'][:4])}")
        return
    raw = read_label_map(scores)
    _, cells, report = score_direction(atlas, {k: float(v) for k, v in raw.items()})
    if out:
        (cells.write_parquet if out.endswith(".parquet") else cells.write_csv)(out)
    if as_json:
        emit_json(report)
    else:
        click.echo(
            f"direction over {len(report['subtypes'])} subtypes; correlation with the scores r={report['pearson_r']:.3f}"
        )
        for s, p in sorted(report["mean_position"].items(), key=lambda kv: kv[1]):
            click.echo(f"  {s:<28}{p:+.3f}")


@click.command("demo")
@click.option("--out", default="demo_output", show_default=True, type=click.Path(file_okay=False))
@click.option(
    "--data",
    type=click.Path(exists=True, file_okay=False),
    help="Folder with the demo data (default: shipped).",
)
@click.option("--refine", type=click.Choice(REFINES), default="supcon", show_default=True)
def demo_cmd(out, data, refine):
    """The whole pipeline on shipped data, offline: gene store, atlas, refinement, mapping, report.

    \b
    Example:
      cellvec demo --out demo_output/
    """
    from cellvec.demo import run_demo

    summary = run_demo(out, data_dir=data, refine=refine)
    click.echo("")
    click.echo(
        "cellvec demo: PBMC 68k (reduced), 10 cell types; reference 70% / query 30% of the cells"
    )
    click.echo(f"  accuracy            {summary['accuracy']:.3f}")
    click.echo(f"  macro-F1            {summary['macro_f1']:.3f}")
    click.echo(f"  balanced accuracy   {summary['balanced_accuracy']:.3f}")
    click.echo(
        f"  unassigned          {summary['unassigned_fraction']:.1%} (confidence < {summary['min_confidence']})"
    )
    click.echo(f"  time                {summary['seconds']:.0f} s")
    click.echo(f"  report              {summary['report']}")
