"""`cellvec atlas`: build and list reference atlases."""

from __future__ import annotations

import click

from cellvec.cli.options import (
    emit_json,
    input_options,
    json_option,
    model_option,
    ray_option,
    recipe_options,
    store_option,
)


def index_option(*, default: str):
    """`--index auto|memory|disk` (the command gets `index_kind`), for build and index."""
    return click.option(
        "--index",
        "index_kind",
        type=click.Choice(["auto", "memory", "disk"]),
        default=default,
        show_default=True,
        help="How the atlas is searched: in memory (faiss), or through a disk-resident Lance "
        "IVF_PQ index for atlases larger than memory; auto puts it on disk when its vectors "
        "would take more than CELLVEC_ATLAS_MEMORY_BUDGET (default 4G). map and serve follow "
        "what the atlas records.",
    )


@click.group()
def atlas():
    """Build and list reference atlases."""


@atlas.command("build")
@click.argument("reference", type=click.Path(exists=True))
@store_option
@click.option("--name", required=True, help="Atlas name (letters, digits, underscores).")
@click.option("--label-key", required=True, help="obs column with the cell labels.")
@click.option(
    "--broad-label-key",
    help="obs column with coarser labels over --label-key (e.g. cell_type_broad): map then "
    "gives a broad label too, even where the fine one is unassigned.",
)
@click.option("--batch-key", help="obs column recorded as the batch of each cell.")
@click.option("--subset", help="Keep cells where obs column equals value(s): COLUMN=V1,V2.")
@model_option()
@recipe_options
@input_options
@click.option("--seed", default=0, show_default=True, help="Seed of the refinement.")
@click.option(
    "-k", type=int, help="Neighbours in the vote, stored as the atlas's default (else 15)."
)
@click.option(
    "--calibration-split",
    default=0.0,
    show_default=True,
    help="Keep this share of each subtype out of refinement to calibrate typicality "
    "(needed by map --min-typicality; 0.1 is a good start).",
)
@click.option(
    "--exclude-labels",
    metavar="L1,L2",
    help="Drop reference cells with these labels (e.g. Doublet,Unknown) before fitting; "
    "recorded in the atlas.",
)
@click.option(
    "--tune",
    is_flag=True,
    help="Choose --top-genes (200, 1000) and -k (5, 10, 15) by 3-fold cross-validation on "
    "the reference; recorded in the atlas. Costs about six refinements.",
)
@index_option(default="auto")
@ray_option
@json_option
def build(
    reference,
    store,
    name,
    label_key,
    broad_label_key,
    batch_key,
    subset,
    model,
    top_genes,
    weighting,
    background,
    refine,
    center,
    adapt_genes,
    layer,
    use_raw,
    gene_column,
    transpose,
    seed,
    k,
    calibration_split,
    exclude_labels,
    tune,
    index_kind,
    ray,
    as_json,
):
    """Embed a labelled REFERENCE (h5ad, 10x, csv, parquet) as an atlas in the store.

    With --ray, Ray workers read the reference's rows, compute its cells' top genes
    and vectors and write the table; refinement is trained in this process.

    \b
    Example:
      cellvec atlas build pbmc.h5ad --store store/ --name pbmc --label-key cell_type \\
          --subset donor=3pv2,5p
      cellvec atlas build pbmc.h5ad --store store/ --name pbmc --label-key cell_type \\
          --broad-label-key cell_type_broad --exclude-labels Doublet --calibration-split 0.1
      cellvec atlas build big.h5ad --store store/ --name big --label-key cell_type --ray auto
    """
    from cellvec.cell_index.atlas import build_atlas
    from cellvec.cli.common import subset_source

    ref = subset_source(
        reference,
        subset,
        layer=layer,
        use_raw=use_raw,
        gene_column=gene_column,
        transpose=transpose,
    )
    a = build_atlas(
        ref,
        store=store,
        name=name,
        label_key=label_key,
        model=model,
        top_genes=top_genes,
        weighting=weighting,
        background=background,
        center=center,
        refine=refine,
        adapt_genes=adapt_genes,
        batch_key=batch_key,
        seed=seed,
        k=k,
        tune=tune,
        calibration_split=calibration_split,
        index=index_kind,
        exclude_labels=exclude_labels,
        broad_label_key=broad_label_key,
        ray=ray or None,
    )
    if as_json:
        emit_json(a.summary())
    else:
        click.echo(
            f"atlas {a.name}: {a.n_cells:,} cells, {len(a.classes)} classes, "
            f"dim {a.dimension}, {a.meta['index']['kind']} index -> {store}"
        )


@atlas.command("index")
@click.argument("name")
@store_option
@index_option(default="disk")
@click.option("--nprobes", type=int, help="IVF partitions probed a query (default: chosen).")
@click.option(
    "--refine-factor", type=int, help="Candidates re-ranked exactly, times k (default: 10)."
)
@ray_option
@json_option
def index_cmd(name, store, index_kind, nprobes, refine_factor, ray, as_json):
    """(Re)build the search index of atlas NAME and record it; map and serve follow it.

    With --ray the disk index is built on a Ray cluster (lance-ray: centroids trained
    once and shared, fragments indexed by the workers, committed once).

    \b
    Example:
      cellvec atlas index census --store store/ --index disk --ray auto
    """
    from cellvec.cell_index.atlas import index_atlas

    params = {"nprobes": nprobes, "refine_factor": refine_factor}
    entry = index_atlas(
        store, name, index=index_kind, params={k: v for k, v in params.items() if v}, ray=ray
    )
    if as_json:
        emit_json({"atlas": name, "index": entry})
    else:
        click.echo(
            f"atlas {name}: {entry['kind']} index"
            + (
                f" ({entry['index_type']}, {entry['num_partitions']:,} partitions, nprobes "
                f"{entry['nprobes']}, refine factor {entry['refine_factor']})"
                if entry["kind"] == "disk"
                else ""
            )
        )


@atlas.command("list")
@store_option
@json_option
def list_cmd(store, as_json):
    """List the atlases of a store with their recipes.

    \b
    Example:
      cellvec atlas list --store store/
    """
    from cellvec.cell_index.atlas import Atlas, list_atlases

    out = [Atlas.describe(store, n) for n in list_atlases(store)]
    if as_json:
        emit_json({"atlases": out})
    else:
        for a in out:
            r = a["recipe"]
            click.echo(
                f"{a['name']:<20} {a['n_cells']:>9,} cells  {len(a['classes']):>3} classes  "
                f"{r['model']} top{r['top_genes']} {r['weighting']} bg={r['background']} refine={r['refine']}"
            )
