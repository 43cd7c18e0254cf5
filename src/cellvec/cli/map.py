"""`cellvec map`: label new cells from a reference atlas."""

from __future__ import annotations

import click

from cellvec.cli.options import STORE_HELP, emit_json, input_options, json_option, store_options


@click.command("map")
@click.argument("query", type=click.Path(exists=True))
@store_options(required=False, help=STORE_HELP + " Not needed with --server.")
@click.option(
    "--server",
    metavar="URL",
    help="Map through a running `cellvec serve` (token from $CELLVEC_API_TOKEN); same outputs.",
)
@click.option("--atlas", "atlas_name", required=True, help="Atlas name.")
@click.option(
    "--out", type=click.Path(dir_okay=False), help="Output .h5ad (labels in obs, vectors in obsm)."
)
@click.option(
    "--table",
    type=click.Path(dir_okay=False),
    help="Also write a per-cell table (.parquet/.csv/.tsv).",
)
@click.option(
    "-k", type=int, help="Neighbours in the vote (default: the atlas's, 15 unless tuned)."
)
@click.option(
    "--min-confidence", default=0.0, show_default=True, help="Below this, a cell is 'unassigned'."
)
@click.option(
    "--min-typicality",
    default=0.0,
    show_default=True,
    help="Below this typicality (calibrated on held-out reference cells: 0.01 calls ~1%% "
    "of cells of known subtypes unassigned), a cell is 'unassigned': not a subtype of this "
    "atlas. Needs an atlas built with --calibration-split.",
)
@click.option(
    "--truth-key", help="obs column with known labels: report accuracy, macro-F1, per class."
)
@click.option(
    "--label-map",
    type=click.Path(exists=True, dir_okay=False),
    help="Rename truth labels to atlas labels (JSON object or two-column CSV/TSV).",
)
@click.option(
    "--orthologs",
    type=click.Path(exists=True, dir_okay=False),
    help="Ortholog table for a query of another species: HCOP/Ensembl (e.g. "
    "hcop_mouse_to_human.csv.gz, either direction) or two columns, query symbol -> store symbol.",
)
@click.option("--subset", help="Keep query cells where obs column equals value(s): COLUMN=V1,V2.")
@click.option("--save-as", help="Also save the mapping in the store (SQL view mapping_<NAME>).")
@input_options
@json_option
def map_cmd(
    query,
    store,
    server,
    atlas_name,
    out,
    table,
    k,
    min_confidence,
    min_typicality,
    truth_key,
    label_map,
    orthologs,
    subset,
    save_as,
    layer,
    use_raw,
    gene_column,
    transpose,
    as_json,
):
    """Map QUERY cells onto an atlas with the atlas's own recipe; no retraining.

    \b
    Example:
      cellvec map pbmc.h5ad --store store/ --atlas pbmc --subset donor=3pv1 \\
          --out mapped.h5ad --truth-key cell_type --min-confidence 0.5
      cellvec map mouse_retina.h5ad --store human_store/ --atlas retina \\
          --orthologs hcop_mouse_to_human.csv.gz --out mapped.h5ad
      cellvec map pbmc.h5ad --server http://127.0.0.1:8000 --atlas pbmc --out mapped.h5ad
    """
    from cellvec.cell_index.mapping import map_cells, read_label_map
    from cellvec.cli.common import subset_source
    from cellvec.evaluation.metrics import metrics_table

    if not (store or server):
        raise click.UsageError("Give --store DIR, or --server URL to map through a service.")
    if save_as and not store:
        raise click.UsageError("--save-as writes into a store: give --store DIR.")
    src = subset_source(
        query, subset, layer=layer, use_raw=use_raw, gene_column=gene_column, transpose=transpose
    )
    options = dict(
        k=k,
        min_confidence=min_confidence,
        min_typicality=min_typicality,
        truth_key=truth_key,
        label_map=read_label_map(label_map) if label_map else None,
        orthologs=orthologs,
    )
    if server:
        from cellvec.client import Client

        res = Client(server).map(src, atlas=atlas_name, **options)
    else:
        res = map_cells(src, atlas_name, store=store, **options)
    if out:
        res.write(out)
    if table:
        res.write(table)
    if save_as:
        res.save(store, save_as)
    if as_json:
        emit_json(res.summary())
        return
    click.echo(
        f"{len(res.cell_ids):,} cells mapped onto {atlas_name} in {res.seconds:.1f} s"
        + (f" -> {out}" if out else "")
    )
    if res.metrics:
        click.echo(metrics_table(res.metrics))
    else:
        for label, n in res.summary()["label_counts"].items():
            click.echo(f"  {label:<28}{n:>8,}")
