"""Gene texts, embedders and the LanceDB gene store."""

from cellvec.gene_store.embedders import available_embedders, get_embedder, register_embedder
from cellvec.gene_store.resolve import GeneMatch, match_genes
from cellvec.gene_store.store import (
    BuildResult,
    GeneStore,
    GeneTable,
    build_gene_store,
    import_vectors,
)

__all__ = [
    "BuildResult",
    "GeneMatch",
    "GeneStore",
    "GeneTable",
    "available_embedders",
    "build_gene_store",
    "get_embedder",
    "import_vectors",
    "match_genes",
    "register_embedder",
]
