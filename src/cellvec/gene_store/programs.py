"""Gene programs a recipe can leave out of the cell vectors, found by the store's own
NCBI names (any species, no symbol patterns).

`ribosomal`: the cytosolic ribosomal proteins (RPL*, RPS*, RPLP*, RPSA, the FAU and
UBA52 fusions, their paralogs and pseudogenes). Every cell expresses them, at a level
set by its size, growth and the protocol more than by what it is, and that level moves
between species and protocols. Measured on the Baron 2016 pancreas (human cells carry
far more ribosomal weight than mouse cells), the refinement of a mouse atlas had learned
"more ribosomal weight = alpha" (mouse alpha cells do carry more than mouse beta cells),
and 382 of 623 human beta cells went to alpha. Not in the program: the mitochondrial
ribosomal proteins (MRPL*, MRPS*), the S6 kinases and binding proteins, whose names
also say "ribosomal protein".
"""

from __future__ import annotations

import numpy as np
import polars as pl

from cellvec.errors import CellvecError

# NCBI names of what is not a cytosolic ribosomal protein though the name says so; the
# misspelling "mitchondrial" is NCBI's own (mouse Mrps7).
_NOT_RIBOSOMAL = r"kinase|binding|mito?chondrial|laminin|domain"

PROGRAMS = ("none", "ribosomal")


def has_names(genes: pl.DataFrame) -> bool:
    """Whether a gene table has the NCBI full names `program_mask` reads (a table of
    vectors imported without gene_info has none)."""
    return "full_name" in genes.columns and genes["full_name"].null_count() < len(genes)


def program_mask(genes: pl.DataFrame, program: str) -> np.ndarray:
    """True for the rows of a gene table (`GeneTable.genes`) in `program` (`PROGRAMS`)."""
    if program not in PROGRAMS:
        raise CellvecError(
            f"Unknown gene program {program!r}; choose one of {', '.join(PROGRAMS)}."
        )
    if program == "none" or not has_names(genes):
        return np.zeros(len(genes), dtype=bool)
    name = pl.col("full_name").fill_null("").str.to_lowercase()
    hit = name.str.contains("ribosomal protein") & ~name.str.contains(_NOT_RIBOSOMAL)
    return genes.select(hit.alias("hit"))["hit"].to_numpy().astype(bool)
