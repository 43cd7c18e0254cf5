"""Cell vectors: expression-weighted averages of the gene vectors of each cell's top genes.

Per chunk of cells: keep the N most-expressed matched genes of each cell (one
vectorised sort over the chunk's non-zeros), turn their values into weights,
and aggregate with one sparse x dense product `W @ E`. No per-cell Python loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp

from cellvec._progress import progress
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.recipe import Recipe
from cellvec.errors import CellvecError, GeneMatchError
from cellvec.gene_store.embedders.base import normalise_rows
from cellvec.gene_store.orthologs import ORTHOLOG_OF_SEVERAL, OrthologTable
from cellvec.gene_store.resolve import match_genes
from cellvec.gene_store.store import GeneTable

log = logging.getLogger(__name__)

MIN_MATCHED_FRACTION = 0.5
MIN_MATCHED_GENES = 50


def top_n_weights(
    x: sp.csr_matrix,
    n: int,
    weighting: str,
    col_mask: np.ndarray | None = None,
    block_rows: int = 2048,
) -> sp.csr_matrix:
    """Keep each row's `n` largest positive entries (among `col_mask` columns), as weights summing to 1.

    Rows are padded into small dense blocks and split with `argpartition` (linear
    time), so no full sort of the non-zeros is needed. Kept entries are ordered by
    value, largest first, within each row.
    """
    x = sp.csr_matrix(x)
    counts = np.diff(x.indptr)
    key = x.data.astype(np.float32, copy=True)
    key[~(key > 0)] = -np.inf
    if col_mask is not None:
        key[~col_mask[x.indices]] = -np.inf
    keep_pos, keep_counts = [], np.zeros(x.shape[0], dtype=np.int64)
    for r0 in range(0, x.shape[0], block_rows):
        r1 = min(r0 + block_rows, x.shape[0])
        lo, hi = x.indptr[r0], x.indptr[r1]
        c = counts[r0:r1]
        width = int(c.max(initial=0))
        if width == 0:
            continue
        rows = np.repeat(np.arange(r1 - r0), c)
        offs = np.arange(hi - lo) - np.repeat(x.indptr[r0:r1] - lo, c)
        pad = np.full((r1 - r0, width), -np.inf, dtype=np.float32)
        pad[rows, offs] = key[lo:hi]
        if width > n:
            part = np.argpartition(-pad, n - 1, axis=1)[:, :n]
        else:
            part = np.broadcast_to(np.arange(width), (r1 - r0, width))
        vals = np.take_along_axis(pad, part, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        part = np.take_along_axis(part, order, axis=1)
        valid = np.take_along_axis(vals, order, axis=1) > -np.inf
        keep_counts[r0:r1] = valid.sum(1)
        keep_pos.append((x.indptr[r0:r1, None] + part)[valid])
    pos = np.concatenate(keep_pos) if keep_pos else np.zeros(0, dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(keep_counts)])
    data = x.data[pos].astype(np.float32)
    if weighting == "log1p":
        np.log1p(data, out=data)
    elif weighting == "rank":
        ranks = np.arange(len(pos)) - np.repeat(indptr[:-1], keep_counts)
        data = (n - ranks).astype(np.float32) / n
    elif weighting in ("softmax", "sqrt"):
        # exp of the log-normalised value: the expression itself (1 + CP10k), or its square
        # root; rows are ordered largest first, so the first entry is the row maximum
        scale = 1.0 if weighting == "softmax" else 0.5
        data = np.exp(
            scale
            * (data - np.repeat(data[indptr[:-1][keep_counts > 0]], keep_counts[keep_counts > 0]))
        )
    sums = (
        np.add.reduceat(data, indptr[:-1][keep_counts > 0])
        if len(data)
        else np.zeros(0, np.float32)
    )
    scale = np.zeros(x.shape[0], dtype=np.float32)
    scale[keep_counts > 0] = 1.0 / sums
    data = data * np.repeat(scale, keep_counts)
    return sp.csr_matrix((data.astype(np.float32), x.indices[pos], indptr), shape=x.shape)


@dataclass
class GeneBasis:
    """The gene vectors a dataset's columns map to, after any background transform."""

    columns: np.ndarray  # dataset columns that matched a store gene
    rows: np.ndarray  # their store rows
    vectors: np.ndarray  # len(columns) x dim
    n_vars: int = 0  # the dataset's number of columns
    cell_mean: np.ndarray | None = None  # subtracted from each cell vector before normalising
    positions: np.ndarray | None = None  # the columns' places in the atlas's own gene list
    # 2 x m: dataset columns (row 0) whose expression is summed into another column (row 1)
    # that reaches the same store gene (`fold_duplicates`); None when every gene is its own
    fold: np.ndarray | None = None

    def __post_init__(self):
        # Query columns reaching one store gene are folded (`fold_duplicates`), so each atlas
        # gene has one place here, and what is summed over `positions` (coverage, the
        # re-aggregated panel) counts it once.
        if self.positions is not None and len(np.unique(self.positions)) < len(self.positions):
            raise CellvecError(
                "A gene basis places two dataset columns at one atlas gene; fold them first "
                "(vectors.fold_duplicates), as CellEncoder.basis does."
            )

    def combine(self, x: sp.csr_matrix) -> sp.csr_matrix:
        """A chunk of the dataset's expression with the folded columns summed into theirs."""
        return fold_columns(x, self._folding)

    def top_weights(self, x: sp.csr_matrix, recipe: Recipe) -> sp.csr_matrix:
        """Each cell's top-gene weights (cells x the dataset's columns) of a chunk of its
        log-normalised expression, as `recipe` says: folded columns summed first, only
        matched columns taken."""
        return top_n_weights(
            self.combine(x), recipe.top_genes, recipe.weighting, col_mask=self.mask
        )

    @cached_property
    def mask(self) -> np.ndarray:
        """True for the dataset columns that matched (computed once per gene list)."""
        m = np.zeros(
            self.n_vars or (int(self.columns.max()) + 1 if len(self.columns) else 0), dtype=bool
        )
        m[self.columns] = True
        return m

    @cached_property
    def full(self) -> np.ndarray:
        """n_vars x dim, zero rows for unmatched columns (never selected: they are masked)."""
        full = np.zeros((len(self.mask), self.vectors.shape[1]), dtype=np.float32)
        full[self.columns] = self.vectors
        return full

    @cached_property
    def _folding(self):
        """`fold_plan` of `fold`, made once (not per chunk)."""
        return fold_plan(self.fold, len(self.mask))


def match_dataset_genes(
    var_names: list[str],
    genes: GeneTable,
    where: str = "dataset",
    *,
    orthologs: OrthologTable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Dataset columns and their store rows; refuses too small an overlap with the likely cause.

    With `orthologs`, genes not in the store by symbol are matched through their orthologs."""
    m = match_genes(var_names, genes.genes, orthologs=orthologs)
    n, total = m.n_matched, len(var_names)
    counts = m.counts()
    log.info(
        "%s: %s of %s genes matched the %s gene table (%s)",
        where,
        f"{n:,}",
        f"{total:,}",
        genes.model,
        ", ".join(f"{k} {v:,}" for k, v in counts.items()),
    )
    if orthologs is not None:
        one, several = counts.get("ortholog", 0), counts.get(ORTHOLOG_OF_SEVERAL, 0)
        log.info(
            "%s: %s genes matched directly, %s through orthologs (%s): %s to their one "
            "ortholog in the store, %s to the best supported of several, %s left out as "
            "ambiguous",
            where,
            f"{n - one - several:,}",
            f"{one + several:,}",
            orthologs.source,
            f"{one:,}",
            f"{several:,}",
            f"{counts.get('ortholog (ambiguous)', 0):,}",
        )
    if n < min(MIN_MATCHED_GENES, total // 2) or n < MIN_MATCHED_FRACTION * total:
        sample = [str(v) for v in var_names[:5]]
        head = [str(v) for v in var_names[:500]]

        def share(pred):
            return sum(map(pred, head)) / max(len(head), 1)

        species = genes.meta.get("species")
        other = " (or an ortholog table, --orthologs FILE)" if orthologs is None else ""
        if share(lambda v: v.startswith("ENS")) > 0.5:
            cause = "the dataset uses Ensembl ids: check they are of the store's species, or give symbols (--gene-column)"
        elif species == "human" and share(lambda v: v[:1].isupper() and v[1:].islower()) > 0.5:
            cause = f"the names look like mouse symbols (Xxxx) but the store is human: use a mouse store{other}"
        elif species == "mouse" and share(str.isupper) > 0.75:
            cause = f"the names look like human symbols (XXXX) but the store is mouse: use a human store{other}"
        else:
            cause = "wrong species or another naming scheme; a var column with symbols can be named with --gene-column"
        raise GeneMatchError(
            f"{where}: only {n:,} of {total:,} genes (e.g. {', '.join(sample)}) match the "
            f"{species or ''} {genes.model} gene table. Likely cause: {cause}."
        )
    cols = np.flatnonzero(m.rows >= 0)
    return cols, m.rows[cols]


def fold_duplicates(
    cols: np.ndarray, rows: np.ndarray, where: str = "dataset"
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One column per store gene: (columns, their store rows, fold) where columns that reach
    a store gene an earlier column already reaches are folded into that first column (fold:
    2 x m, the folded columns and the columns they join; None when there are none).

    Several dataset genes reach one store gene through orthologs (paralogs: human ACSM2A
    and ACSM2B -> mouse Acsm2; mouse Ins1 and Ins2 -> human INS) or synonyms. Counted once
    each, they would fill two top-gene places with one gene vector and give the store gene
    twice the weight its own species would; so their expression is summed (as counts,
    `fold_columns`), which is what a cell of the store's species would show for the one
    gene, and the store gene is counted once."""
    cols, rows = np.asarray(cols), np.asarray(rows)
    _, first, inverse, n = np.unique(
        rows, return_index=True, return_inverse=True, return_counts=True
    )
    if (n == 1).all():
        return cols, rows, None
    keep = np.sort(first)
    extra = np.setdiff1d(np.arange(len(rows)), keep)
    fold = np.stack([cols[extra], cols[first[inverse[extra]]]])
    log.info(
        "%s: %s store genes are reached by 2 or more of its genes (%s genes in all): "
        "their expression is summed and each store gene counted once",
        where,
        f"{int((n > 1).sum()):,}",
        f"{int(n[n > 1].sum()):,}",
    )
    return cols[keep], rows[keep], fold


def fold_plan(fold: np.ndarray | None, n: int) -> tuple[np.ndarray, sp.csr_matrix] | None:
    """What `fold_columns` needs for a dataset of `n` columns, made once per gene list:
    (the columns involved, the n x n matrix moving columns fold[0] onto fold[1]); None
    when nothing is folded."""
    if fold is None or not len(fold[0]):
        return None
    involved = np.zeros(n, dtype=bool)
    involved[fold[0]] = involved[fold[1]] = True
    target = np.arange(n)
    target[fold[0]] = fold[1]
    move = sp.csr_matrix((np.ones(n, dtype=np.float32), (np.arange(n), target)), shape=(n, n))
    return involved, move


def fold_columns(x: sp.csr_matrix, plan: tuple[np.ndarray, sp.csr_matrix] | None) -> sp.csr_matrix:
    """`x` (log-normalised) with the columns of a `fold_plan` summed into theirs, as counts:
    log1p of the sum of expm1; the folded columns end up empty. Columns not involved keep
    their values exactly."""
    if plan is None:
        return x
    involved, move = plan
    x = sp.csr_matrix(x, copy=True)
    hit = involved[x.indices]
    x.data[hit] = np.expm1(x.data[hit])
    y = sp.csr_matrix(x @ move.astype(x.dtype, copy=False))
    y.sort_indices()
    hit = involved[y.indices]
    y.data[hit] = np.log1p(y.data[hit])
    return y


def rows_summing_to_one(w: sp.csr_matrix, data: np.ndarray) -> sp.csr_matrix:
    """`w`'s pattern holding `data` instead, each row scaled to sum to 1 (rows summing to 0
    stay 0): top-gene weights after some of them were changed or dropped."""
    counts = np.diff(w.indptr)
    sums = np.bincount(np.repeat(np.arange(w.shape[0]), counts), weights=data, minlength=w.shape[0])
    data = data / np.repeat(np.where(sums > 0, sums, 1.0), counts)
    return sp.csr_matrix((data.astype(np.float32), w.indices, w.indptr), shape=w.shape)


def weighted_mean(
    w: sp.csr_matrix, gene_vectors: np.ndarray, cell_mean: np.ndarray | None = None
) -> np.ndarray:
    """Cell vectors: rows of `w @ gene_vectors` (weights sum to 1 per cell), less `cell_mean`
    (the background every reference cell shares) when given, scaled to unit length."""
    v = np.asarray(w @ gene_vectors, dtype=np.float32)
    if cell_mean is not None:
        v -= cell_mean
    return normalise_rows(v)


def aggregate(x: sp.csr_matrix, basis: GeneBasis, recipe: Recipe) -> np.ndarray:
    """Cell vectors (unit length, before any head) of a chunk of log-normalised expression."""
    return weighted_mean(basis.top_weights(x, recipe), basis.full, basis.cell_mean)


def iter_cell_vectors(
    source: ExpressionSource,
    basis: GeneBasis,
    recipe: Recipe,
    *,
    chunk_size: int = 20_000,
    desc: str = "cell vectors",
):
    """Yield (slice, unrefined vectors) chunk by chunk: memory stays flat however many cells."""
    with progress(total=source.n_obs, desc=desc, unit="cell") as bar:
        for sl, block in source.chunks(chunk_size):
            yield sl, aggregate(block, basis, recipe)
            bar.update(sl.stop - sl.start)


def cell_vectors(
    source: ExpressionSource,
    basis: GeneBasis,
    recipe: Recipe,
    *,
    chunk_size: int = 20_000,
    desc: str = "cell vectors",
) -> np.ndarray:
    """Unrefined cell vectors for every cell of `source` (cells x dim)."""
    out = np.empty((source.n_obs, basis.vectors.shape[1]), dtype=np.float32)
    for sl, vecs in iter_cell_vectors(source, basis, recipe, chunk_size=chunk_size, desc=desc):
        out[sl] = vecs
    return out


def weights_matrix(
    source: ExpressionSource, basis: GeneBasis, recipe: Recipe, chunk_size: int = 20_000
) -> sp.csr_matrix:
    """The whole top-N weight matrix (cells x dataset genes), for training-time augmentation.

    Use it with `basis.full`."""
    parts = [basis.top_weights(block, recipe) for _, block in source.chunks(chunk_size)]
    return sp.vstack(parts, format="csr")
