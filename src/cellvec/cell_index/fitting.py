"""Fitting a recipe on a reference: background, centre, gene adapter and head.

Only the reference is looked at. The fitted arrays are saved as artifacts in the
store and named by their hashes in the recipe, so that `encoder.load_encoder`
gives a query the same encoder later.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from cellvec.cell_index.artifacts import array_hash, save_artifact
from cellvec.cell_index.background import apply_background, fit_background
from cellvec.cell_index.calibration import calibration_cells
from cellvec.cell_index.encoder import CellEncoder
from cellvec.cell_index.parallel import top_gene_weights
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import RefineOptions, encode_weights, fit_refinement
from cellvec.cell_index.vectors import (
    GeneBasis,
    fold_duplicates,
    match_dataset_genes,
    weights_matrix,
)
from cellvec.gene_store.programs import has_names, program_mask
from cellvec.gene_store.store import GeneTable

log = logging.getLogger(__name__)


@dataclass
class FittedReference:
    """What fitting a recipe on a reference gives: the encoder, the reference's vectors and
    top-gene weights (cells x the reference's genes, for re-aggregation over a query's
    genes) and the refinement report."""

    encoder: CellEncoder
    vectors: np.ndarray | None  # None when Ray workers compute them (fit_encoder(ray=...))
    weights: sp.csr_matrix
    report: dict
    held_out: np.ndarray | None = None  # cells kept out of refinement, for calibration
    blocks: list | None = None  # the Ray workers' weight blocks (Arrow), when ray was given

    @property
    def dimension(self) -> int:
        """The length of the atlas's vectors: the head's output, else the gene vectors'."""
        head = self.encoder.refinement.get("w2")
        return int(head.shape[1]) if head is not None else self.encoder.genes.dimension

    def basis(self) -> np.ndarray:
        """The reference genes' vectors after the background transform (before the adapter)."""
        enc = self.encoder
        return apply_background(enc.genes.vectors[enc.refinement["gene_rows"]], enc.background)


def fit_encoder(
    source: ExpressionSource,
    labels: np.ndarray | None,
    genes,
    recipe: Recipe,
    *,
    store: str | Path | None = None,
    seed: int = 0,
    refine_options: dict | None = None,
    calibration_split: float = 0.0,
    ray: str | bool | None = None,
    prior=None,
) -> FittedReference:
    """Fit background, centre, gene adapter and head on a reference (nothing else sees it).

    `calibration_split`: a stratified share of each class's cells (classes of 5 cells
    or more) is kept out of refinement; they stay in the atlas and calibrate typicality.
    `ray` (an address, see `cellvec._ray`): the top genes of each cell are computed by
    Ray workers, and the reference's vectors are left to them too (`vectors` is None,
    `blocks` holds the workers' weight blocks for `parallel.write_atlas`).
    `prior` (a `prior.Prior`): the background is the prior's, and refinement starts from
    its gene gates and corrections and its head (see `cell_index.prior`)."""
    if prior is not None:
        prior.check(recipe, genes)
    cols, rows, fold = fold_duplicates(
        *skip_program(
            *match_dataset_genes(source.var_names, genes, source.path),
            genes,
            recipe.skip_genes,
            source.path,
        ),
        source.path,
    )
    bg = prior.background if prior else fit_background(genes.vectors[rows], recipe.background)
    vecs = apply_background(genes.vectors[rows], bg)
    basis = GeneBasis(cols, rows, vecs, len(source.var_names), fold=fold)
    blocks = None
    if ray:
        w, blocks = top_gene_weights(source, basis, recipe, ray=ray)
    else:
        w = sp.csr_matrix(weights_matrix(source, basis, recipe)[:, cols])
    held = calibration_cells(labels, calibration_split, seed) if calibration_split else None
    train = slice(None) if held is None else ~held
    # with a prior, refinement starts from its gene vectors: `vecs` with its gates g0 and
    # corrections d0 applied
    start, g0, d0 = prior.start(vecs, rows) if prior else (vecs, None, None)
    params, report = fit_refinement(
        w[train],
        start,
        None if recipe.refine != "supcon" else np.asarray(labels)[train],
        recipe=recipe,
        options=RefineOptions.from_dict(refine_options),
        seed=seed,
        head=prior.head if prior else None,
    )
    if prior:
        params = prior.compose(params, g0, d0)
        report = {**report, "prior": prior.provenance()}
    refinement = {"gene_rows": rows.astype(np.int64), **params}
    recipe = Recipe.from_dict(
        {
            **recipe.to_dict(),
            "model": genes.model,
            "dimension": genes.dimension,
            "gene_table_hash": genes.meta.get("content_hash"),
            "background_hash": _hash_or_save(store, bg),
            "head_hash": _hash_or_save(store, refinement),
            "prior_hash": prior.digest if prior else None,
        }
    )
    encoder = CellEncoder(recipe, genes, bg, refinement)
    if held is not None:
        report = {**report, "calibration_cells": int(held.sum())}
    vectors = None if ray else encode_weights(w, vecs, params)
    return FittedReference(encoder, vectors, w, report, held, blocks)


def skip_program(
    cols: np.ndarray, rows: np.ndarray, genes: GeneTable, program: str, where: str = "reference"
) -> tuple[np.ndarray, np.ndarray]:
    """The matched (columns, store rows) less the genes of `program` (the recipe's
    `skip_genes`): the atlas's gene list never holds them, so a query's own copies carry
    no weight either."""
    if program != "none" and not has_names(genes.genes):
        log.warning(
            "%s: the %s gene table has no NCBI full names (vectors imported without "
            "--gene-info), so the %s genes cannot be found and none are left out. Import "
            "the vectors with --gene-info to leave them out.",
            where,
            genes.model,
            program,
        )
    skip = program_mask(genes.genes, program)[rows]
    if skip.any():
        log.info(
            "%s: %s %s genes left out of the cell vectors (recipe skip_genes=%s)",
            where,
            f"{int(skip.sum()):,}",
            program,
            program,
        )
    return cols[~skip], rows[~skip]


def _hash_or_save(store, arrays: dict) -> str | None:
    if not arrays:
        return None
    return save_artifact(store, arrays) if store is not None else array_hash(arrays)
