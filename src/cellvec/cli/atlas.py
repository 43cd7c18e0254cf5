"""`cellvec atlas`: build, list, export (bundles), import and describe reference atlases."""

from __future__ import annotations

import click

from cellvec.cell_index.recipe import FEW_CELLS, MAX_K, READOUTS
from cellvec.cli.options import (
    emit_json,
    input_options,
    json_option,
    model_option,
    ray_option,
    recipe_options,
    store_option,
    store_options,
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
    """Build, list, export, import and describe reference atlases."""


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
    "-k",
    type=click.IntRange(1, MAX_K),
    help="Neighbours in the vote, stored as the atlas's default (else 15).",
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
@click.option(
    "--readout",
    type=click.Choice(["auto", *READOUTS]),
    default="auto",
    show_default=True,
    help="How map reads the labels off: the k nearest cells' vote, the class centroids, or "
    f"auto: the vote, except that a reference whose median class has fewer than {FEW_CELLS} cells "
    "chooses between the refined vote and the unrefined class centroids by 3-fold "
    "cross-validation on itself (recorded in the atlas; costs three refinements).",
)
@click.option(
    "--level-shift",
    type=click.FloatRange(0.0, 3.0),
    default=0.0,
    show_default=True,
    help="Train the refinement on views whose genes' levels shift together (a log-normal "
    "factor per gene, this sigma, shared by a batch of cells). For an atlas that maps "
    "another species: 1.0 with --weighting softmax; recorded in the atlas.",
)
@click.option(
    "--cross-species/--no-cross-species",
    default=True,
    show_default=True,
    help="Also fit the atlas's cross-species view (--weighting softmax --level-shift 1.0, "
    "stored beside it), which map --orthologs compares cells of another species with. "
    "Costs one more refinement and a second set of vectors.",
)
@click.option(
    "--prior",
    help="Start the refinement from this pre-trained prior of the store (`cellvec prior "
    "build`): for references of a few cells a class; recorded in the atlas.",
)
@index_option(default="auto")
@click.option(
    "--ontology-ids",
    is_flag=True,
    help="Then propose a Cell Ontology id per label (as `cellvec atlas ontology` does; "
    "needs the ontology extra).",
)
@click.option("--tissue", help="Tissue hint for --ontology-ids, e.g. pancreas.")
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
    recipe,
    read_options,
    seed,
    k,
    calibration_split,
    exclude_labels,
    tune,
    readout,
    level_shift,
    cross_species,
    prior,
    index_kind,
    ontology_ids,
    tissue,
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
      cellvec atlas build mouse.h5ad --store store/ --name mouse --label-key cell_type \\
          --calibration-split 0.1
      cellvec map human.h5ad --atlas mouse --store store/ \\
          --orthologs hcop_mouse_to_human.csv.gz --min-typicality 0.01
    """
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cli.common import subset_source

    ref = subset_source(reference, subset, **read_options)
    a = build_atlas(
        ref,
        store=store,
        name=name,
        label_key=label_key,
        broad_label_key=broad_label_key,
        batch_key=batch_key,
        exclude_labels=exclude_labels,
        model=model,
        recipe=recipe,
        options=BuildOptions(
            k=k,
            tune=tune,
            readout=readout,
            calibration_split=calibration_split,
            seed=seed,
            index=index_kind,
            ray=ray or None,
            prior=prior,
            refine_options={"level_shift": level_shift} if level_shift else None,
            cross_species=cross_species,
        ),
    )
    if ontology_ids:
        from cellvec.cell_index.ontology import annotate_atlas

        annotate_atlas(store, name, tissue=tissue)
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

    With --ray the disk index is built on a Ray cluster (centroids and codebook trained here,
    once and shared, fragments indexed by the workers, committed once).

    \b
    Example:
      cellvec atlas index census --store store/ --index disk --ray auto
    """
    from cellvec.cell_index.build import index_atlas

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
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.table import list_atlases

    out = [Atlas.describe(store, n) for n in list_atlases(store)]
    if as_json:
        emit_json({"atlases": out})
    else:
        for a in out:
            r = a["recipe"]
            click.echo(
                f"{a['name']:<20} {a['n_cells']:>9,} cells  {len(a['classes']):>3} classes  "
                f"{r['model']} top{r['top_genes']} {r['weighting']} bg={r['background']} "
                f"skip={r.get('skip_genes', 'none')} refine={r['refine']} readout={a['readout']}"
                + (f" prior={a['prior']}" if a.get("prior") else "")
                + (" +cross-species view" if a.get("cross_species") else "")
            )


@atlas.command("export")
@click.argument("name")
@store_option
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="The bundle folder to write."
)
@click.option("--species", help="Card: species (default: the gene table's).")
@click.option("--tissue", help="Card: tissue, e.g. retina.")
@click.option("--source", "source_", help="Card: where the reference comes from (study, GEO id).")
@click.option("--citation", help="Card: how to cite the reference.")
@click.option("--licence", help="Card: the licence the atlas is shared under, e.g. CC-BY-4.0.")
@click.option(
    "--evaluate",
    "evaluate_",
    is_flag=True,
    help="Cross-validate the atlas's recipe on its reference and put macro-F1 and per-class "
    "F1 on the card (costs one refinement per fold).",
)
@click.option(
    "--reference",
    type=click.Path(exists=True),
    help="The reference to cross-validate with --evaluate (default: the file the atlas was "
    "built from).",
)
@click.option("--folds", default=5, show_default=True, help="Folds of --evaluate.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@json_option
def export_cmd(
    name,
    store,
    out,
    species,
    tissue,
    source_,
    citation,
    licence,
    evaluate_,
    reference,
    folds,
    overwrite,
    as_json,
):
    """Write atlas NAME as a bundle: one folder (a small LanceDB store, card.json and
    manifest.json with the sha256 of every file) that maps anywhere with no gene store.

    Put the folder on a web server or in a bucket as it is; others map onto it with
    `cellvec map QUERY --atlas URL` or import it with `cellvec atlas import`.

    \b
    Example:
      cellvec atlas export rgc --store store/ --out rgc.cellvec --tissue retina \\
          --citation "Tran et al. 2019" --licence CC-BY-4.0 --evaluate
    """
    from cellvec.cell_index.bundle import export_bundle

    card = dict(species=species, tissue=tissue, source=source_, citation=citation, licence=licence)
    if evaluate_:
        from cellvec.evaluation.evaluate import evaluate_atlas

        card["evaluation"] = evaluate_atlas(store, name, reference=reference, folds=folds)
    res = export_bundle(store, name, out, card=card, overwrite=overwrite)
    if as_json:
        emit_json(res.to_dict())
    else:
        click.echo(
            f"bundle {res.path}: atlas {name}, {res.card['n_cells']:,} cells, "
            f"{res.bytes / 2**20:.1f} MiB in {res.files} files, manifest sha256 "
            f"{res.manifest_sha256[:16]}... ({res.seconds:.1f} s)"
        )


@atlas.command("import")
@click.argument("bundle")
@store_option
@click.option("--name", help="Name of the atlas in the store (default: the bundle's).")
@click.option("--replace", is_flag=True, help="Replace an atlas of that name in the store.")
@json_option
def import_cmd(bundle, store, name, replace, as_json):
    """Copy the atlas of BUNDLE (a folder, https://... or s3://...) into a store.

    The store's gene table for the atlas's model must hold the atlas's genes with the
    same vectors (a store without one gets the bundle's); otherwise the import is
    refused, naming the fix.

    \b
    Example:
      cellvec atlas import https://example.org/atlases/rgc.cellvec --store store/
    """
    from cellvec.cell_index.bundle import import_bundle

    res = import_bundle(bundle, store, name=name, replace=replace)
    if as_json:
        emit_json(res)
    else:
        click.echo(
            f"atlas {res['atlas']}: {res['n_cells']:,} cells from {res['source']} -> "
            f"{res['store']} ({res['gene_table']})"
        )


@atlas.command("card")
@click.argument("atlas_ref", metavar="NAME_OR_BUNDLE")
@store_options(required=False, help="The store of atlas NAME (not needed for a bundle).")
@json_option
def card_cmd(atlas_ref, store, as_json):
    """Print what an atlas is: species, tissue, source, citation, licence, cells, genes,
    classes with counts (and F1), recipe, model, cellvec version.

    \b
    Example:
      cellvec atlas card rgc --store store/
      cellvec atlas card https://example.org/atlases/rgc.cellvec --json
    """
    from cellvec.cell_index.bundle import atlas_card, card_text
    from cellvec.fetch import resolve_atlas

    card = atlas_card(*resolve_atlas(store, atlas_ref))
    if as_json:
        emit_json(card)
    else:
        click.echo(card_text(card))


@atlas.command("ontology")
@click.argument("name")
@store_option
@click.option("--tissue", help="Tissue hint, e.g. pancreas (prefers pancreatic terms).")
@click.option(
    "--overrides",
    type=click.Path(exists=True, dir_okay=False),
    help="Two columns, label and CL id (CSV or TSV): these win over every proposal.",
)
@click.option(
    "--markers/--no-markers",
    default=False,
    show_default=True,
    help="Re-rank the text's best terms by how the class's marker genes match each "
    "term's definition (measured on the Baron and PBMC labels: no gain).",
)
@json_option
def ontology_cmd(name, store, tissue, overrides, markers, as_json):
    """Propose a Cell Ontology id for each class of atlas NAME and store them with it;
    map then writes obs['cell_type_ontology_term_id'] and the card shows them.

    Needs the `ontology` extra (pip install 'cellvec[ontology]'). Check the proposals
    (an id is abstained when nothing scores well enough) and correct them with
    --overrides.

    \b
    Example:
      cellvec atlas ontology baron --store store/ --tissue pancreas
      cellvec atlas ontology baron --store store/ --overrides baron_cl.csv --json
    """
    from cellvec.cell_index.ontology import annotate_atlas, read_overrides

    entry = annotate_atlas(
        store,
        name,
        tissue=tissue,
        overrides=read_overrides(overrides) if overrides else None,
        use_markers=markers,
    )
    if as_json:
        emit_json(entry)
        return
    click.echo(f"atlas {name}: Cell Ontology {entry['cl_version']}")
    for label, p in entry["labels"].items():
        click.echo(
            f"  {label[:28]:<30}{p['id'] or '(abstained)':<14}{(p['term'] or '')[:40]:<42}"
            f"{p['how']} {p['score']:.2f}"
        )
