"""The encoder: a recipe plus its fitted parts, applied to any expression source, and
`load_encoder`, which reads a stored atlas's fitted parts back from the store."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellvec.cell_index.artifacts import load_artifact
from cellvec.cell_index.background import apply_background
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import adapted_basis, apply_head
from cellvec.cell_index.vectors import (
    GeneBasis,
    cell_vectors,
    fold_duplicates,
    match_dataset_genes,
)
from cellvec.errors import StoreError
from cellvec.gene_store.orthologs import OrthologTable
from cellvec.gene_store.store import GeneStore, GeneTable
from cellvec.storage import StoreLocation

log = logging.getLogger(__name__)

GENE_KEYS = ("gene_gate", "gene_delta")


@dataclass
class CellEncoder:
    """Turns expression into (refined) cell vectors exactly as `recipe` says.

    `refinement` holds what was fitted on the reference cells: `gene_rows` (the
    store rows of the reference's genes), per-gene `gene_gate` / `gene_delta` in
    that order, `cell_mean` and the head's arrays. A query gene the reference
    never measured carries no weight: the reference's vectors never saw it.
    """

    recipe: Recipe
    genes: GeneTable
    background: dict[str, np.ndarray] = field(default_factory=dict)
    refinement: dict[str, np.ndarray] = field(default_factory=dict)
    _bases: dict = field(default_factory=dict, repr=False)

    def basis(
        self,
        var_names: list[str],
        where: str = "dataset",
        *,
        orthologs: OrthologTable | None = None,
    ) -> GeneBasis:
        """The matched, background-transformed, adapted gene vectors of a gene list (cached per
        list and ortholog table: a service sees the same gene panel request after request)."""
        key = (tuple(var_names), orthologs.digest if orthologs is not None else None)
        hit = self._bases.get(key)
        if hit is not None:
            return hit
        cols, rows, fold = fold_duplicates(
            *match_dataset_genes(var_names, self.genes, where, orthologs=orthologs), where
        )
        positions = None
        params = {k: v for k, v in self.refinement.items() if k in GENE_KEYS}
        ref_rows = self.refinement.get("gene_rows")
        if ref_rows is not None:
            twice = len(ref_rows) - len(np.unique(ref_rows))
            if twice:
                # Atlases built before store genes were counted once (`fold_duplicates`):
                # their reference weights split such a gene in two, a query's are summed.
                log.warning(
                    "%s: the atlas lists %d store genes twice (two of its reference's genes "
                    "reached each, split there and summed in queries since); its labels may "
                    "differ from a current atlas's. Rebuild the atlas with `cellvec atlas "
                    "build` to count each gene once.",
                    where,
                    twice,
                )
            order = np.argsort(ref_rows)
            at = np.searchsorted(ref_rows, rows, sorter=order).clip(0, len(ref_rows) - 1)
            positions = order[at]
            known = ref_rows[positions] == rows
            if not known.all():
                log.info(
                    "%s: %s matched genes are not among the atlas's %s genes and are left out",
                    where,
                    f"{int((~known).sum()):,}",
                    f"{len(ref_rows):,}",
                )
            cols, rows, positions = cols[known], rows[known], positions[known]
            if fold is not None:
                # Folds into a gene the atlas lacks change no kept weight (both columns are
                # masked), but they move masked entries within a row, and that changes which
                # of several equal values top_n_weights keeps at the N-th place: measured on
                # the Baron mouse cells onto the human atlas (3 such folds of 117), 486 of
                # 1,886 cells kept other tied genes. Dropping them keeps results as they were.
                fold = fold[:, np.isin(fold[1], cols)]
            params = {k: v[positions] for k, v in params.items()}
        vectors = adapted_basis(apply_background(self.genes.vectors[rows], self.background), params)
        basis = GeneBasis(
            cols,
            rows,
            vectors,
            len(var_names),
            cell_mean=self.refinement.get("cell_mean"),
            positions=positions,
            fold=fold,
        )
        if len(self._bases) >= 32:
            self._bases.pop(next(iter(self._bases)))
        self._bases[key] = basis
        return basis

    def unrefined(
        self,
        source: ExpressionSource,
        basis: GeneBasis | None = None,
        *,
        orthologs: OrthologTable | None = None,
    ) -> np.ndarray:
        """Cell vectors before the head (adapted genes and centring included)."""
        basis = basis or self.basis(source.var_names, source.path, orthologs=orthologs)
        return cell_vectors(source, basis, self.recipe)

    def encode(
        self,
        source: ExpressionSource,
        basis: GeneBasis | None = None,
        *,
        orthologs: OrthologTable | None = None,
    ) -> np.ndarray:
        """Cell vectors of `source`; `orthologs` only changes which store genes its columns
        map to, never the recipe."""
        return apply_head(self.refinement, self.unrefined(source, basis, orthologs=orthologs))


def load_encoder(
    store: str | Path | StoreLocation,
    name: str,
    recipe: Recipe,
    gene_store: GeneStore | None = None,
    genes: GeneTable | None = None,
) -> CellEncoder:
    """The encoder of atlas `name`: its gene table (`genes` when the caller holds it
    already), background transform and head, checked against the hashes its recipe
    records."""
    gene_store = gene_store or GeneStore(store)
    if genes is None or genes.model != recipe.model:
        genes = gene_store.load(recipe.model)
    store = gene_store.store
    if recipe.gene_table_hash and genes.meta.get("content_hash") != recipe.gene_table_hash:
        raise StoreError(
            f"Atlas {name!r} was built on another version of the {recipe.model} gene table "
            f"(hash {recipe.gene_table_hash}, store now {genes.meta.get('content_hash')}). "
            "Rebuild the atlas with `cellvec atlas build`."
        )
    bg = load_artifact(store, recipe.background_hash) if recipe.background_hash else {}
    head = load_artifact(store, recipe.head_hash) if recipe.head_hash else {}
    return CellEncoder(recipe, genes, bg, head)
