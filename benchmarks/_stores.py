"""Gene stores of just the genes the labelled sets in ../shared/data name.

A full species store takes 20-30 minutes to embed on 2 cores; the evaluation needs
only the genes its datasets measure (~3,700 human PBMC genes, ~600 mouse retina
genes), so each store here is built from a gene_info subset in a few minutes and
reused on later runs.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from _common import SHARED

DATASETS = {
    "human": ("pbmc_3chem", "pbmc3k", "pbmc68k_reduced"),
    "mouse": ("macosko2015_amacrine",),
}
SUMMARIES = {s: SHARED / "genes" / f"refseq_summary.{s}.tsv.gz" for s in DATASETS}


def dataset_gene_names(species: str) -> set[str]:
    import anndata as ad

    names: set[str] = set()
    for f in DATASETS[species]:
        names |= {
            str(v).upper()
            for v in ad.read_h5ad(SHARED / "cells" / f"{f}.h5ad", backed="r").var_names
        }
    return names


def ensure_store(
    store: Path, species: str, *, summaries: bool = False, model: str = "minilm"
) -> Path:
    """Build (once) a `model` store of the genes named in `species`' labelled sets."""
    from cellvec.gene_store import GeneStore, build_gene_store

    store = Path(store)
    if store.exists() and model in GeneStore(store).models():
        return store
    names = dataset_gene_names(species)
    store.mkdir(parents=True, exist_ok=True)
    subset = store.parent / f"{store.name}.gene_info"
    with (
        gzip.open(SHARED / "genes" / f"{species}.gene_info.gz", "rt") as src,
        open(subset, "w") as dst,
    ):
        for i, line in enumerate(src):
            p = line.split("\t")
            if i == 0 or p[2].upper() in names or any(s.upper() in names for s in p[4].split("|")):
                dst.write(line)
    build_gene_store(
        subset,
        gene2go=SHARED / "genes" / f"{species}.gene2go.gz",
        summaries=SUMMARIES[species] if summaries else None,
        summary_symbol_column="Symbol" if summaries else None,
        summary_text_column="Summary" if summaries else None,
        species=species,
        store=store,
        model=model,
    )
    return store
