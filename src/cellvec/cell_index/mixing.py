"""Populations an atlas lacks, found by the company query cells keep.

A query cell of a subtype the reference never saw can land inside a known class in
the refined space: with NK left out of a PBMC atlas, NK cells are called CD8 T, and
their nearest atlas neighbours are closer than CD8 T cells' own. No distance or
typicality threshold can flag them. What gives them away is their neighbourhood in
the query and the atlas pooled: nearly all of an NK cell's nearest cells are other
query cells, while the atlas's own CD8 T cells see query cells only at the query's
share. This is kBET's test of local batch composition (Büttner et al., Nat Methods
2019) asked per cell, with the reference and the query as the two batches.

The test runs in the space before the refinement head (`CellEncoder.unrefined`):
the head, trained on the reference's classes, pulls an unseen subtype into its
nearest one. On pbmc3k's 5 folds (`results/pbmc3k.md`), with NK left out, it calls
85% of the NK cells unassigned (typicality: none) and 100% of B cells with B left
out (typicality: 67%), while 2-3% of the known cells come back unassigned from both
tests together. In the refined space it found 13% of NK in a scratch run.

It needs a whole query (a file, not a handful of cells) from the same kind of
experiment as the atlas: when query and atlas do not mix (a chemistry or batch
effect sets every query cell apart), most cells fail it, and `map_cells` then
leaves it off and says so.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from cellvec._progress import progress
from cellvec.cell_index.knn import FlatIndex, without_self

log = logging.getLogger(__name__)

MIXING_K = 15
POOL_MAX = 20_000  # cells of each side in the pooled neighbourhoods
SHRINK = 5.0  # pseudo-cells pulling a class's expected share towards the pooled one
NOT_MIXING = 0.5  # above this share of query cells failing, query and atlas do not mix
BLOCK = 65_536  # query cells searched at a time


def sample_rows(n: int, at_most: int, seed: int = 0) -> np.ndarray:
    """Sorted rows of a uniform sample of `at_most` of `n` rows (all of them when fewer)."""
    if n <= at_most:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=at_most, replace=False))


def mixing_pvalues(
    reference: np.ndarray,
    ref_codes: np.ndarray,
    query: np.ndarray,
    chosen: np.ndarray,
    *,
    k: int = MIXING_K,
    pool_max: int = POOL_MAX,
    seed: int = 0,
) -> np.ndarray:
    """Per query cell, the p-value that its neighbourhood holds no more query cells than
    the atlas's own cells of its chosen class see.

    `reference` and `query`: unit vectors before the head (`reference` may be a sample
    of the atlas, `ref_codes` its class codes); `chosen`: each query cell's class code.
    Both sides are pooled (at most `pool_max` cells of each, sampled with `seed`); every
    cell's `k` nearest other cells in the pool are found. A class's expected query share
    is the mean share around its reference cells, shrunk towards the pooled mean by
    `SHRINK` pseudo-cells (a class with few sampled cells is not over-trusted), and the
    p-value is the binomial tail of the cell's count of query neighbours."""
    from scipy.stats import binom

    t0 = time.perf_counter()
    ref_rows = sample_rows(len(reference), pool_max, seed)
    query_rows = sample_rows(len(query), pool_max, seed + 1)
    n_ref = len(ref_rows)
    pool = np.vstack([reference[ref_rows], query[query_rows]])
    k = min(k, len(pool) - 1)
    if k < 1 or not len(query):
        return np.ones(len(query))
    index = FlatIndex(pool)
    # each pooled cell's own hit is taken out; a query cell outside the pool has none
    own = np.full(len(query), -1, dtype=np.int64)
    own[query_rows] = n_ref + np.arange(len(query_rows))
    query_hits = _query_neighbours(index, query, own, n_ref, k)
    ref_hits = _query_neighbours(index, reference[ref_rows], np.arange(n_ref), n_ref, k)
    n_classes = int(max(ref_codes.max(initial=0), chosen.max(initial=0))) + 1
    codes = ref_codes[ref_rows]
    around = ref_hits / k
    count = np.bincount(codes, minlength=n_classes).astype(np.float64)
    pooled = float(around.mean())
    expected = (np.bincount(codes, weights=around, minlength=n_classes) + SHRINK * pooled) / (
        count + SHRINK
    )
    # a share of 0 would make a single query neighbour impossible: floor it at half a cell
    expected = np.clip(expected, 0.5 / k, 1 - 0.5 / k)
    p = binom.sf(query_hits - 1, k, expected[chosen])
    log.debug(
        "Mixing test: %s query cells against %s atlas cells (pool %s) in %.1f s",
        f"{len(query):,}",
        f"{n_ref:,}",
        f"{len(pool):,}",
        time.perf_counter() - t0,
    )
    return p


def _query_neighbours(
    index: FlatIndex, vectors: np.ndarray, own: np.ndarray, n_ref: int, k: int
) -> np.ndarray:
    """How many of each vector's `k` nearest pooled cells are query cells (pool rows from
    `n_ref` on), its own row `own` left out; searched in blocks so memory stays bounded."""
    out = np.empty(len(vectors), dtype=np.int64)
    small = len(vectors) <= BLOCK  # one block: no progress to show
    with progress(
        total=len(vectors), desc="mixing test", unit="cell", disable=small or None
    ) as bar:
        for start in range(0, len(vectors), BLOCK):
            block = slice(start, start + BLOCK)
            idx, _ = without_self(*index.search(vectors[block], k + 1), k, own[block])
            out[block] = (idx >= n_ref).sum(axis=1)
            bar.update(len(idx))
    return out


def mixes(p: np.ndarray, min_mixing: float) -> bool:
    """Whether the query mixes with the atlas: at most `NOT_MIXING` of its cells have a
    mixing p-value below `min_mixing`. Otherwise (a batch or chemistry effect, or a
    query mostly of types the atlas lacks) the test would only say that, and is not
    applied."""
    return not len(p) or float((p < min_mixing).mean()) <= NOT_MIXING


def unmixed(p: np.ndarray, min_mixing: float, atlas: str) -> np.ndarray | None:
    """The cells to call unassigned (mixing p-value below `min_mixing`), or None, with a
    warning, when the query does not mix with the atlas (`mixes`)."""
    failing = p < min_mixing
    share = float(failing.mean()) if len(p) else 0.0
    if not mixes(p, min_mixing):
        log.warning(
            "%.0f%% of the query's cells have far more query cells around them than %s's own "
            "cells do: query and atlas do not mix (a batch or chemistry effect, or a query "
            "mostly of cell types the atlas lacks), so --min-mixing is not applied. "
            "--min-typicality still is.",
            100 * share,
            atlas,
        )
        return None
    log.info(
        "%s cells (%.1f%%) sit among query cells the atlas has no match for (mixing p < %g)",
        f"{int(failing.sum()):,}",
        100 * share,
        min_mixing,
    )
    return failing
