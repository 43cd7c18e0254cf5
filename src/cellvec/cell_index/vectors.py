"""Cell vectors: expression-weighted averages of the gene vectors of each cell's top genes.

Per chunk of cells: keep the N most-expressed matched genes of each cell (one
vectorised sort over the chunk's non-zeros), turn their values into weights,
and aggregate with one sparse x dense product `W @ E`. No per-cell Python loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from cellvec._progress import progress
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.recipe import Recipe
from cellvec.errors import GeneMatchError
from cellvec.gene_store.embedders.base import normalise_rows
from cellvec.gene_store.resolve import match_genes
from cellvec.gene_store.store import GeneTable

log = logging.getLogger(__name__)

MIN_MATCHED_FRACTION = 0.5
MIN_MATCHED_GENES = 50


def top_n_weights(x: sp.csr_matrix, n: int, weighting: str) -> sp.csr_matrix:
    """Keep each row's `n` largest entries, as weights summing to 1 per row."""
    x = sp.csr_matrix(x)
    x.eliminate_zeros()
    counts = np.diff(x.indptr)
    if counts.size == 0 or counts.max(initial=0) <= n and weighting in ("value", "log1p"):
        w = x.copy()
        ranks = None
    else:
        rows = np.repeat(np.arange(x.shape[0], dtype=np.int64), counts)
        # Sort by row, then by value descending, in one pass: rows are already grouped.
        order = np.lexsort((-x.data, rows))
        ranks = np.empty_like(order)
        ranks[order] = np.arange(order.size) - np.repeat(x.indptr[:-1], counts)
        keep = ranks < n
        new_counts = np.minimum(counts, n)
        indptr = np.concatenate([[0], np.cumsum(new_counts)])
        w = sp.csr_matrix((x.data[keep], x.indices[keep], indptr), shape=x.shape)
        ranks = ranks[keep]
    data = w.data.astype(np.float32, copy=True)
    if weighting == "log1p":
        np.log1p(data, out=data)
    elif weighting == "rank":
        if ranks is None:
            rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
            order = np.lexsort((-w.data, rows))
            ranks = np.empty_like(order)
            ranks[order] = np.arange(order.size) - np.repeat(w.indptr[:-1], np.diff(w.indptr))
        data = (n - ranks).astype(np.float32) / n
    elif weighting == "softmax":
        rows = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
        rowmax = np.zeros(w.shape[0], dtype=np.float32)
        np.maximum.at(rowmax, rows, data)
        data = np.exp(data - rowmax[rows])
    w.data = data
    sums = np.asarray(w.sum(axis=1)).ravel()
    scale = np.divide(1.0, sums, out=np.zeros_like(sums), where=sums > 0).astype(np.float32)
    return sp.csr_matrix(sp.diags(scale) @ w)


@dataclass
class GeneBasis:
    """The gene vectors a dataset's columns map to, after any background transform."""

    columns: np.ndarray      # dataset columns that matched a store gene
    rows: np.ndarray         # their store rows
    vectors: np.ndarray      # len(columns) x dim


def match_dataset_genes(var_names: list[str], genes: GeneTable, where: str = "dataset") -> tuple[np.ndarray, np.ndarray]:
    """Dataset columns and their store rows; refuses too small an overlap with the likely cause."""
    m = match_genes(var_names, genes.genes)
    n, total = m.n_matched, len(var_names)
    counts = m.counts()
    log.info("%s: %s of %s genes matched the %s gene table (%s)", where, f"{n:,}", f"{total:,}", genes.model,
             ", ".join(f"{k} {v:,}" for k, v in counts.items()))
    if n < min(MIN_MATCHED_GENES, total // 2) or n < MIN_MATCHED_FRACTION * total:
        sample = [str(v) for v in var_names[:5]]
        head = [str(v) for v in var_names[:500]]

        def share(pred):
            return sum(map(pred, head)) / max(len(head), 1)

        species = genes.meta.get("species")
        if share(lambda v: v.startswith("ENS")) > 0.5:
            cause = "the dataset uses Ensembl ids: check they are of the store's species, or give symbols (--gene-column)"
        elif species == "human" and share(lambda v: v[:1].isupper() and v[1:].islower()) > 0.5:
            cause = "the names look like mouse symbols (Xxxx) but the store is human: use a mouse store"
        elif species == "mouse" and share(str.isupper) > 0.75:
            cause = "the names look like human symbols (XXXX) but the store is mouse: use a human store"
        else:
            cause = "wrong species or another naming scheme; a var column with symbols can be named with --gene-column"
        raise GeneMatchError(
            f"{where}: only {n:,} of {total:,} genes (e.g. {', '.join(sample)}) match the "
            f"{species or ''} {genes.model} gene table. Likely cause: {cause}."
        )
    cols = np.flatnonzero(m.rows >= 0)
    return cols, m.rows[cols]


def aggregate(x: sp.csr_matrix, basis: GeneBasis, recipe: Recipe) -> np.ndarray:
    """Cell vectors (unit length) of a chunk of log-normalised expression."""
    w = top_n_weights(x[:, basis.columns], recipe.top_genes, recipe.weighting)
    return normalise_rows(np.asarray(w @ basis.vectors, dtype=np.float32))


def cell_vectors(source: ExpressionSource, basis: GeneBasis, recipe: Recipe, *, chunk_size: int = 20_000,
                 desc: str = "cell vectors") -> np.ndarray:
    """Unrefined cell vectors for every cell of `source` (cells x dim)."""
    out = np.empty((source.n_obs, basis.vectors.shape[1]), dtype=np.float32)
    with progress(total=source.n_obs, desc=desc, unit="cell") as bar:
        for sl, block in source.chunks(chunk_size):
            out[sl] = aggregate(block, basis, recipe)
            bar.update(sl.stop - sl.start)
    return out


def weights_matrix(source: ExpressionSource, basis: GeneBasis, recipe: Recipe, chunk_size: int = 20_000) -> sp.csr_matrix:
    """The whole top-N weight matrix (cells x matched genes), for training-time augmentation."""
    parts = [top_n_weights(block[:, basis.columns], recipe.top_genes, recipe.weighting)
             for _, block in source.chunks(chunk_size)]
    return sp.vstack(parts, format="csr")
