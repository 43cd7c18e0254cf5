"""`cellvec map`: label new cells from a reference atlas."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import click

from cellvec.cell_index.recipe import MAX_K
from cellvec.cli.options import (
    STORE_HELP,
    emit_json,
    input_options,
    json_option,
    ray_option,
    store_options,
)


@click.command("map")
@click.argument("query", type=click.Path(exists=True))
@store_options(required=False, help=STORE_HELP + " Not needed with --server.")
@click.option(
    "--server",
    metavar="URL",
    help="Map through a running `cellvec serve` (token from $CELLVEC_API_TOKEN); same outputs.",
)
@click.option(
    "--atlas",
    "atlas_name",
    required=True,
    help="Atlas name in --store, or a bundle (`cellvec atlas export`): a folder, https://... "
    "or s3://..., fetched once into $CELLVEC_CACHE and verified; no --store then.",
)
@click.option(
    "--out", type=click.Path(dir_okay=False), help="Output .h5ad (labels in obs, vectors in obsm)."
)
@click.option(
    "--table",
    type=click.Path(dir_okay=False),
    help="Also write a per-cell table (.parquet/.csv/.tsv).",
)
@click.option(
    "-k",
    type=click.IntRange(1, MAX_K),
    help="Neighbours in the vote (default: the atlas's, 15 unless tuned).",
)
@click.option(
    "--min-confidence", default=0.0, show_default=True, help="Below this, a cell is 'unassigned'."
)
@click.option(
    "--min-typicality",
    default=0.0,
    show_default=True,
    help="Below this typicality (calibrated on held-out reference cells: 0.01 calls ~1% "
    "of cells of known subtypes unassigned), a cell is 'unassigned': not a subtype of this "
    "atlas. Needs an atlas built with --calibration-split. With --orthologs, calibrated on "
    "those cells with their genes' levels shifted, as another species shifts them.",
)
@click.option(
    "--min-mixing",
    default=0.0,
    show_default=True,
    help="Below this mixing p-value (0.01 is a good start), a cell is 'unassigned': far more "
    "of its nearest cells in query and atlas pooled are query cells than the atlas's own "
    "cells of its label see, as for a subtype the atlas lacks that sits inside a known one. "
    "Judges the whole query file; left off, with a warning, when query and atlas do not mix.",
)
@click.option(
    "--truth-key", help="obs column with known labels: report accuracy, macro-F1, per class."
)
@click.option(
    "--broad-truth-key",
    help="obs column with known broad labels: score the atlas's broad level too.",
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
    "hcop_mouse_to_human.csv.gz, either direction) or two columns, query symbol -> store symbol. "
    "The query is compared with the atlas's cross-species view (atlas build --cross-species, "
    "the default).",
)
@click.option(
    "--exclude-labels",
    metavar="L1,L2",
    help="Labels never to answer with (e.g. Doublet,Unknown): reference cells carrying one "
    "are skipped in the search, and k others found.",
)
@click.option(
    "--cluster-key",
    help="Query obs column of clusters (e.g. leiden): per cluster, the majority label, its "
    "share, mean confidence and unassigned share (printed, in uns['cellvec_clusters'], and "
    "in the store as mapping_<NAME>_clusters with --save-as).",
)
@click.option("--subset", help="Keep query cells where obs column equals value(s): COLUMN=V1,V2.")
@click.option("--save-as", help="Also save the mapping in the store (SQL view mapping_<NAME>).")
@input_options
@ray_option
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
    min_mixing,
    truth_key,
    broad_truth_key,
    label_map,
    orthologs,
    exclude_labels,
    cluster_key,
    subset,
    save_as,
    read_options,
    ray,
    as_json,
):
    """Map QUERY cells onto an atlas with the atlas's own recipe; no retraining.

    \b
    Example:
      cellvec map pbmc.h5ad --store store/ --atlas pbmc --subset donor=3pv1 \\
          --out mapped.h5ad --truth-key cell_type --min-confidence 0.5
      cellvec map mouse_retina.h5ad --store human_store/ --atlas retina \\
          --orthologs hcop_mouse_to_human.csv.gz --out mapped.h5ad
      cellvec map pbmc.h5ad --store store/ --atlas pbmc --exclude-labels Doublet,Unknown --json
      cellvec map pbmc.h5ad --store store/ --atlas pbmc --cluster-key leiden --save-as run1
      cellvec map pbmc.h5ad --server http://127.0.0.1:8000 --atlas pbmc --out mapped.h5ad
      cellvec map big.h5ad --store store/ --atlas pbmc --out mapped.h5ad --ray auto
      cellvec map q.h5ad --atlas https://example.org/atlases/rgc.cellvec --out mapped.h5ad
    """
    from cellvec.cell_index.mapping import map_cells, read_label_map
    from cellvec.cell_index.result import check_mapping_name, check_output
    from cellvec.cli.common import subset_source
    from cellvec.fetch import resolve_atlas

    if server and ray:
        raise click.UsageError(
            "--ray computes vectors here; with --server the service does: give one of them."
        )
    if save_as and not store:
        raise click.UsageError("--save-as writes into a store: give --store DIR.")
    # checked before mapping: a mistyped output or name costs no mapping time
    for path in (out, table):
        if path:
            check_output(path)
            if Path(path).resolve() == Path(query).resolve():
                raise click.UsageError(f"{path} is the query file: write the output elsewhere.")
    if out and table and Path(out).resolve() == Path(table).resolve():
        raise click.UsageError(f"--out and --table both name {out}: give two files.")
    if save_as:
        check_mapping_name(save_as)
    if not server:  # an atlas of --store, or a bundle (fetched once, verified: a store)
        store, atlas_name = resolve_atlas(store, atlas_name)
    src = subset_source(query, subset, **read_options)
    options = dict(
        k=k,
        min_confidence=min_confidence,
        min_typicality=min_typicality,
        min_mixing=min_mixing,
        truth_key=truth_key,
        broad_truth_key=broad_truth_key,
        label_map=read_label_map(label_map) if label_map else None,
        orthologs=orthologs,
        exclude_labels=exclude_labels,
        cluster_key=cluster_key,
    )
    if server:  # the same call, answered by the service
        from cellvec.client import Client

        res = map_cells(src, Client(server).atlas(atlas_name), **options)
    else:
        res = map_cells(src, atlas_name, store=store, ray=ray or None, **options)
    _write_outputs(res, out, table, store, save_as)
    if as_json:
        emit_json(res.summary())
        return
    _show(res, atlas_name, out, cluster_key)


def _write_outputs(res, out, table, store, save_as) -> None:
    """--out and --table written to temporaries, the mapping saved (--save-as), and only
    then the files renamed into place: a failure before the renames leaves neither file."""
    from cellvec._files import replacing

    with ExitStack() as staging:
        for path in (out, table):
            if path:
                res.write_as(staging.enter_context(replacing(path)), Path(path).suffix.lower())
        if save_as:
            res.save(store, save_as)


def _show(res, atlas_name: str, out, cluster_key) -> None:
    """The mapping in plain text: time, mixing test, each level's table, clusters."""
    click.echo(
        f"{len(res.cell_ids):,} cells mapped onto {atlas_name} in {res.seconds:.1f} s"
        + (f" -> {out}" if out else "")
    )
    summary = res.summary()
    if "mixing" in summary:
        m = summary["mixing"]
        click.echo(
            f"mixing test: {m['below_fraction']:.1%} of cells below p {m['min_mixing']:g}"
            + ("" if m["applied"] else " (not applied: query and atlas do not mix)")
        )
    click.echo(level_table(res.metrics, summary["label_counts"]))
    if res.broad is not None:
        broad = summary["broad"]
        click.echo(
            f"broad level ({broad['label_key']}): {broad['broad_only_fraction']:.1%} of cells "
            "have a broad label only (their fine label is unassigned)"
        )
        click.echo(level_table(res.broad.metrics, broad["label_counts"]))
    if res.clusters is not None:
        click.echo(cluster_table(summary["clusters"], cluster_key, broad=res.broad is not None))


def level_table(metrics: dict | None, label_counts: dict[str, int]) -> str:
    """One level's metrics against known labels, or without them its cells per label."""
    from cellvec.metrics import metrics_table

    if metrics:
        return metrics_table(metrics)
    return "\n".join(f"  {label:<28}{n:>8,}" for label, n in label_counts.items())


def cluster_table(rows: list[dict], key: str, *, broad: bool) -> str:
    """The per-cluster summary (`MappingResult.cluster_summary` rows) as a plain-text table."""
    lines = [
        f"{key[:14]:<15}{'cells':>7}  {'majority label':<24}{'share':>6}{'mean conf':>10}"
        f"{'unassigned':>11}" + (f"  {'broad label':<16}{'share':>6}" if broad else "")
    ]
    for r in rows:
        lines.append(
            f"{r['cluster'][:14]:<15}{r['n_cells']:>7,}  {r['label'][:23]:<24}"
            f"{r['label_share']:>6.2f}{r['mean_confidence']:>10.3f}{r['unassigned_share']:>11.2f}"
            + (f"  {r['label_broad'][:15]:<16}{r['label_broad_share']:>6.2f}" if broad else "")
        )
    return "\n".join(lines)
