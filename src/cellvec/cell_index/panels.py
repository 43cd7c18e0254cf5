"""Re-aggregating the reference over the genes a query measures (its panel).

A query that measures fewer genes than the atlas (a targeted or spatial panel, a
dataset that kept its variable genes) is compared with reference cells described by
the same genes: each reference cell's stored top-gene weights are restricted to the
panel, rescaled to sum to 1 and passed through the stored gene adapter, centre and
head (nothing retrained). `Atlas.vectors_over` and `Atlas.coverage` use these, and
keep the last few panels (`remember`).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from cellvec.cell_index.background import apply_background
from cellvec.cell_index.disk_index import memory_budget, memory_estimate
from cellvec.cell_index.encoder import CellEncoder
from cellvec.cell_index.refine import adapted_basis
from cellvec.cell_index.vectors import weighted_mean


def reaggregate(
    encoder: CellEncoder, w: sp.csr_matrix, positions: np.ndarray | None = None
) -> np.ndarray:
    """Vectors before the head (adapted genes, centred) of reference top-gene weights `w`,
    over the atlas genes at `positions` only (each cell's weights there rescaled to sum
    to 1), or all of them."""
    fitted = encoder.refinement
    if positions is None:
        positions = np.arange(len(fitted["gene_rows"]))
    w = sp.csr_matrix(w[:, positions])
    sums = np.asarray(w.sum(axis=1)).ravel()
    w = sp.csr_matrix(sp.diags(np.where(sums > 0, 1.0 / np.where(sums > 0, sums, 1), 0)) @ w)
    rows = fitted["gene_rows"][positions]
    params = {k: fitted[k][positions] for k in ("gene_gate", "gene_delta") if k in fitted}
    basis = adapted_basis(apply_background(encoder.genes.vectors[rows], encoder.background), params)
    return weighted_mean(w, basis, fitted.get("cell_mean"))


def weight_share(w: sp.csr_matrix, positions: np.ndarray) -> float:
    """The share of the top-gene weight `w` (cells x the atlas's genes) on the genes at
    `positions`: 1.0 when they hold every gene that counts."""
    total = float(w.sum())
    return float(w[:, positions].sum()) / total if total > 0 else 0.0


def fits_in_memory(n_cells: int, dimension: int, top_genes: int) -> bool:
    """Whether re-aggregating a disk atlas over a panel fits the memory budget: its
    top-gene weights (~12 bytes a gene a cell) and a second set of vectors."""
    need = memory_estimate(n_cells, dimension) + 12 * n_cells * int(top_genes)
    return need <= memory_budget()


def even_rows(n_cells: int, n: int) -> np.ndarray:
    """Positions of `n` evenly spaced cells of `n_cells` (all of them when fewer), sorted."""
    return np.unique(np.linspace(0, n_cells - 1, min(n, n_cells)).astype(np.int64))


def panel_key(positions: np.ndarray | None):
    """A cache key for a gene panel (None: the atlas's own genes)."""
    return None if positions is None else hash(np.asarray(positions, np.int64).tobytes())


def remember(cache: dict, key, make, keep: int = 4):
    """`cache[key]`, made by `make()` on a miss; at most `keep` panels are kept besides the
    whole atlas (key None), the oldest dropped first (a service sees a few panels)."""
    if key not in cache:
        if sum(k is not None for k in cache) >= keep:
            cache.pop(next(k for k in cache if k is not None))
        cache[key] = make()
    return cache[key]
