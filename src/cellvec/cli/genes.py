"""`cellvec genes`: build, import and search the gene embedding store."""

from __future__ import annotations

import click

from cellvec.cli.options import emit_json, json_option, model_option, ray_option, store_option


@click.group()
def genes():
    """Build, import and search gene embedding stores."""


@genes.command("build")
@click.option(
    "--gene-info",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="NCBI gene_info(.gz).",
)
@click.option("--gene2go", type=click.Path(exists=True, dir_okay=False), help="NCBI gene2go(.gz).")
@click.option(
    "--summaries",
    type=click.Path(exists=True, dir_okay=False),
    help="Gene summaries: JSON symbol->text (GenePT), TSV/CSV or parquet.",
)
@click.option("--summary-symbol-column", help="Symbol column of a TSV/CSV/parquet summaries file.")
@click.option("--summary-text-column", help="Text column of a TSV/CSV/parquet summaries file.")
@click.option("--species", required=True, help="human, mouse, or an NCBI tax id.")
@model_option("minilm")
@click.option(
    "--base-url", help="OpenAI-compatible server for openai:MODEL (else OPENAI_BASE_URL)."
)
@click.option("--batch-size", default=512, show_default=True, help="Genes per committed batch.")
@store_option
@ray_option
@json_option
def build(
    gene_info,
    gene2go,
    summaries,
    summary_symbol_column,
    summary_text_column,
    species,
    model,
    base_url,
    batch_size,
    store,
    ray,
    as_json,
):
    """Embed every gene of a species into the store (incremental and resumable).

    \b
    Example:
      cellvec genes build --gene-info mouse.gene_info.gz --gene2go mouse.gene2go.gz \\
          --species mouse --model minilm --store store/
      cellvec genes build --gene-info mouse.gene_info.gz --species mouse --store store/ --ray auto
    """
    from cellvec.gene_store import build_gene_store, get_embedder

    embedder = get_embedder(model, base_url=base_url) if base_url else get_embedder(model)
    res = build_gene_store(
        gene_info,
        store=store,
        species=species,
        gene2go=gene2go,
        summaries=summaries,
        summary_symbol_column=summary_symbol_column,
        summary_text_column=summary_text_column,
        embedder=embedder,
        batch_size=batch_size,
        ray=ray or None,
    )
    if as_json:
        emit_json(res.to_dict())
    else:
        click.echo(
            f"{res.table}: {res.n_genes:,} genes ({res.n_embedded:,} embedded, "
            f"{res.n_reused:,} unchanged) in {res.seconds:.1f} s -> {res.store}"
        )


@genes.command("import")
@click.argument("vectors", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, help="Name for these vectors, e.g. genept-ada002.")
@click.option(
    "--gene-info",
    type=click.Path(exists=True, dir_okay=False),
    help="Join symbols to NCBI records (synonyms, Ensembl ids) for better cell matching.",
)
@click.option("--species", help="human, mouse or a tax id (needed with --gene-info).")
@store_option
@json_option
def import_cmd(vectors, model, gene_info, species, store, as_json):
    """Import precomputed gene vectors (.pkl dict, .npz, .parquet) as a store table.

    \b
    Example:
      cellvec genes import GenePT_gene_embedding_ada_text.pickle --model genept --store store/
    """
    from cellvec.gene_store import import_vectors

    res = import_vectors(vectors, store=store, model=model, gene_info=gene_info, species=species)
    if as_json:
        emit_json(res.to_dict())
    else:
        click.echo(
            f"{res.table}: {res.n_genes:,} genes imported (dim {res.meta['dimension']}) -> {res.store}"
        )


@genes.command("search")
@click.argument("query", required=False)
@click.option("--gene", help="Find the genes nearest to this gene instead of a text.")
@model_option()
@click.option("-k", default=10, show_default=True, help="How many genes.")
@store_option
@json_option
def search(query, gene, model, k, store, as_json):
    """Genes whose texts are nearest (cosine) to a free-text query or to a gene.

    \b
    Example:
      cellvec genes search "axon regeneration after optic nerve crush" --store store/ -k 5
    """
    from cellvec.gene_store import GeneStore

    if (query is None) == (gene is None):
        raise click.UsageError("Give a free-text QUERY or --gene SYMBOL (one of them).")
    res = GeneStore(store).search(query, gene=gene, model=model, k=k)
    if as_json:
        emit_json({"query": query, "gene": gene, "results": res.drop("text").to_dicts()})
    else:
        for r in res.iter_rows(named=True):
            click.echo(
                f"{r['rank']:>3}  {r['similarity']:.3f}  {r['symbol']:<14} {r['full_name'] or ''}"
            )
