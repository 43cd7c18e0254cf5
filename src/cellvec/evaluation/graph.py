"""A gene embedding made without text: spectral embedding of the GO co-annotation graph.

Genes and GO terms form a bipartite graph (gene2go). The leading singular vectors
of its degree-normalised incidence matrix D_g^-1/2 B D_t^-1/2 embed genes so that
genes sharing (specific) terms lie close: the classic spectral embedding of the
gene-gene co-annotation graph. This is the graph-based baseline the paper
compares language-model embeddings against.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from cellvec.errors import StoreError
from cellvec.gene_store.embedders.base import normalise_rows


def go_graph_embedding(
    go_terms: list[list[str] | None], dim: int = 128, seed: int = 0
) -> np.ndarray:
    """Gene vectors (genes x dim, unit length; genes without GO terms are zero)."""
    from sklearn.decomposition import TruncatedSVD

    vocab: dict[str, int] = {}
    rows, cols = [], []
    for i, terms in enumerate(go_terms):
        for t in sorted(set(terms or ())):  # columns in one order under any hash seed
            rows.append(i)
            cols.append(vocab.setdefault(t, len(vocab)))
    if not vocab:
        raise StoreError(
            "The gene table has no GO terms (build it with --gene2go) for the graph baseline."
        )
    b = sp.csr_matrix(
        (np.ones(len(rows), np.float32), (rows, cols)), shape=(len(go_terms), len(vocab))
    )
    dg = np.asarray(b.sum(1)).ravel()
    dt = np.asarray(b.sum(0)).ravel()
    norm = sp.diags(1 / np.sqrt(np.maximum(dg, 1))) @ b @ sp.diags(1 / np.sqrt(np.maximum(dt, 1)))
    k = min(dim + 1, min(norm.shape) - 1)
    svd = TruncatedSVD(n_components=k, random_state=seed)
    u = svd.fit_transform(norm)[:, 1:]  # the first component only tracks degree
    return normalise_rows(u.astype(np.float32))
