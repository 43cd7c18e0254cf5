"""Compose one text per gene from its NCBI record, GO terms and summary.

The template is versioned: a gene store records `TEMPLATE_VERSION`, and a change
of template changes the text hashes, so an incremental rebuild re-embeds exactly
the genes whose text changed.

Template ``ncbi-v1`` (parts without data are left out)::

    {symbol}: {full name}. A {type_of_gene} gene of {species}.
    Summary: {summary}
    Molecular function: {GO terms}. Biological process: {GO terms}.
    Cellular component: {GO terms}.
    Also known as: {synonyms}. Other designations: {designations}.

At most `MAX_GO_TERMS` GO terms per category and `MAX_DESIGNATIONS` designations
are kept (in file order): long tails add tokens, not meaning, and the models
truncate at 256-512 tokens anyway.
"""

from __future__ import annotations

import hashlib

import polars as pl

from cellvec.gene_store.sources import TAX_NAMES

TEMPLATE_VERSION = "ncbi-v1"
MAX_GO_TERMS = 15
MAX_DESIGNATIONS = 5


def _joined(col: str, n: int, sep: str, prefix: str, suffix: str = ".") -> pl.Expr:
    lst = pl.col(col).list.head(n)
    return (
        pl.when(pl.col(col).is_not_null() & (pl.col(col).list.len() > 0))
        .then(pl.concat_str(pl.lit(prefix), lst.list.join(sep), pl.lit(suffix)))
        .otherwise(None)
    )


def compose_texts(
    genes: pl.DataFrame, go: pl.DataFrame | None = None, summaries: pl.DataFrame | None = None
) -> pl.DataFrame:
    """Add `text` and `text_hash` columns to a gene_info frame (see module docstring)."""
    df = genes
    if go is not None:
        df = df.join(go, on="gene_id", how="left")
    else:
        df = df.with_columns(
            *(
                pl.lit(None, dtype=pl.List(pl.String)).alias(c)
                for c in ("go_function", "go_process", "go_component")
            )
        )
    if summaries is not None:
        df = df.join(summaries, on="symbol", how="left")
    else:
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("summary"))
    species = pl.col("tax_id").replace_strict(TAX_NAMES, default=None, return_dtype=pl.String)
    species = pl.coalesce(
        species, pl.concat_str(pl.lit("taxon "), pl.col("tax_id").cast(pl.String))
    )
    gene_type = pl.col("type_of_gene").fill_null("")
    parts = [
        pl.concat_str(
            pl.col("symbol"),
            pl.lit(": "),
            pl.col("full_name").fill_null(pl.col("symbol")),
            pl.lit("."),
        ),
        pl.concat_str(pl.lit("A "), gene_type, pl.lit(" gene of "), species, pl.lit(".")),
        pl.when(pl.col("summary").is_not_null())
        .then(pl.concat_str(pl.lit("Summary: "), pl.col("summary")))
        .otherwise(None),
        _joined("go_function", MAX_GO_TERMS, "; ", "Molecular function: "),
        _joined("go_process", MAX_GO_TERMS, "; ", "Biological process: "),
        _joined("go_component", MAX_GO_TERMS, "; ", "Cellular component: "),
        _joined("synonyms", 20, ", ", "Also known as: "),
        _joined("other_designations", MAX_DESIGNATIONS, "; ", "Other designations: "),
    ]
    df = df.with_columns(pl.concat_str(parts, separator=" ", ignore_nulls=True).alias("text"))
    hashes = [text_hash(t) for t in df["text"].to_list()]
    return df.with_columns(pl.Series("text_hash", hashes, dtype=pl.String))


def text_hash(text: str) -> str:
    """A short, stable (unsalted) digest of a gene text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]
