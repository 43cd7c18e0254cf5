"""Gene stores of just the genes the labelled sets in ../shared/data name.

A full species store takes 20-30 minutes to embed on 2 cores; the evaluation needs
only the genes its datasets measure (~3,700 human PBMC genes, ~600 mouse retina
genes), so each store here is built from a gene_info subset in a few minutes and
reused on later runs.

The Baron 2016 pancreas pair (20,125 human, 14,877 mouse genes) has stores of its
own, so that the within-species stores stay the ones results/summary.md was made with.
`baron_human` and `baron_mouse` hold the genes that carry a cell's vector, chosen without
labels: those among the top 1,000 genes of at least 5% of the file's cells, or among
the top 100 of at least 0.5% (4,763 human and 5,002 mouse genes; 88% and 87% of the
top-gene weight; every hormone gene: INS, GCG, SST, PPY, Ins1, Ins2). A gene outside
the store is unmatched, so cellvec sees these genes only. `baron_human_all` and
`baron_mouse_all` hold every gene of each file that NCBI gene_info names (19,747 and
14,852), the stores issue 22 was measured with: about 15 minutes of embedding on 2
idle cores (22-28 genes/s; 3-5 genes/s when the cores were shared).
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

from _common import SHARED

DATASETS = {
    "human": ("pbmc_3chem", "pbmc3k", "pbmc68k_reduced"),
    "mouse": ("macosko2015_amacrine",),
}
# Stores named for the sets they cover, beside the per-species ones: name -> (species, sets,
# which genes: "carrying" those that carry the cells' vectors, `carrying_genes`; "all"
# every gene the files measure, as a user's store of the species would hold them).
NAMED = {
    "baron_human": ("human", ("baron2016_pancreas_human",), "carrying"),
    "baron_mouse": ("mouse", ("baron2016_pancreas_mouse",), "carrying"),
    "baron_human_all": ("human", ("baron2016_pancreas_human",), "all"),
    "baron_mouse_all": ("mouse", ("baron2016_pancreas_mouse",), "all"),
}
SUMMARIES = {s: SHARED / "genes" / f"refseq_summary.{s}.tsv.gz" for s in DATASETS}


def dataset_gene_names(
    species: str, sets: tuple[str, ...] | None = None, genes: str = "carrying"
) -> set[str]:
    """Upper-cased names of every gene of `species`' labelled sets, or of the files `sets`
    (by stem) of the genes that carry their cells (`carrying_genes`), or all of them
    (`genes` "all")."""
    names: set[str] = set()
    for f in sets or DATASETS[species]:
        path = SHARED / "cells" / f"{f}.h5ad"
        picked = carrying_genes(path) if sets and genes == "carrying" else file_genes(path)
        names |= {str(v).upper() for v in picked}
    return names


@functools.cache
def file_genes(path: Path) -> tuple[str, ...]:
    """The gene names of the h5ad file `path` (its var_names), read once per file."""
    import anndata as ad

    return tuple(ad.read_h5ad(path, backed="r").var_names)


@functools.cache
def carrying_genes(path: Path, share: float = 0.05, share_top: float = 0.005) -> tuple[str, ...]:
    """Genes among the top 1,000 (log-normalised) of at least `share` of the cells of
    `path`, or among the top 100 of at least `share_top`: no labels used. Computed once
    per file (a run asks for each file's several times)."""
    import numpy as np

    from cellvec.cell_index.readers import read_expression
    from cellvec.cell_index.vectors import top_n_weights

    src = read_expression(path)
    x = src.to_csr()
    wide = np.asarray((top_n_weights(x, 1000, "value") > 0).sum(0)).ravel()
    narrow = np.asarray((top_n_weights(x, 100, "value") > 0).sum(0)).ravel()
    keep = (wide >= share * x.shape[0]) | (narrow >= share_top * x.shape[0])
    return tuple(g for g, k in zip(src.var_names, keep) if k)


def ensure_store(
    store: Path,
    species: str,
    *,
    summaries: bool = False,
    model: str = "minilm",
    sets: tuple[str, ...] | None = None,
    genes: str = "carrying",
) -> Path:
    """A `model` store at `store` of the genes named in `species`' labelled sets (or in
    the h5ad files `sets` of ../shared/data/cells, by stem: `genes` of them, see
    `dataset_gene_names`), built once, and built again when the genes or texts it should
    hold changed since: the names it was built for are recorded beside it, and the build
    is incremental (only genes whose text it lacks are embedded)."""
    from cellvec.gene_store import GeneStore

    store = Path(store)
    names = sorted(dataset_gene_names(species, sets, genes))
    wanted = "\n".join([f"summaries={summaries}", *names])
    made_for = store.parent / f"{store.name}.{model}.genes"
    built = store.exists() and model in GeneStore(store).models()
    if built and made_for.exists() and made_for.read_text() == wanted:
        return store
    subset_store(store, species, set(names), model=model, summaries=summaries)
    made_for.write_text(wanted)
    return store


def subset_store(
    store: Path, species: str, names: set[str], *, model: str = "minilm", summaries: bool = False
) -> Path:
    """Build a `model` store at `store` of the NCBI genes of `species` whose symbol or a
    synonym is in `names` (upper-cased), from ../shared/data/genes."""
    from cellvec.gene_store import build_gene_store

    store = Path(store)
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


def ensure_named_store(stores: Path, name: str, *, model: str = "minilm") -> Path:
    """The store `stores/name` of a NAMED set (e.g. `baron_mouse`), by `ensure_store`."""
    species, sets, genes = NAMED[name]
    return ensure_store(Path(stores) / name, species, model=model, sets=sets, genes=genes)
