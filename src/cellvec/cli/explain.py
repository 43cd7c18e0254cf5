"""`cellvec explain`: the genes that drive a subtype, or a direction following per-subtype scores."""

from __future__ import annotations

from pathlib import Path

import click

from cellvec._files import replacing
from cellvec.cli.options import emit_json, json_option, store_option


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
    help="With --scores: per-cell positions (.parquet/.csv/.tsv).",
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
    from cellvec.cell_index.result import TABLE_SUFFIXES, check_output, write_table

    if (subtype is None) == (scores is None):
        raise click.UsageError("Give --subtype or --scores (one of them).")
    if out:
        check_output(out, TABLE_SUFFIXES)
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
        with replacing(out) as tmp:
            write_table(cells, tmp, Path(out).suffix.lower())
    if as_json:
        emit_json(report)
    else:
        click.echo(
            f"direction over {len(report['subtypes'])} subtypes; correlation with the scores r={report['pearson_r']:.3f}"
        )
        for s, p in sorted(report["mean_position"].items(), key=lambda kv: kv[1]):
            click.echo(f"  {s:<28}{p:+.3f}")
