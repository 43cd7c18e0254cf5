"""The encoder: a recipe plus its fitted parts, applied to any expression source."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from cellvec.cell_index.background import apply_background
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import apply_head
from cellvec.cell_index.vectors import GeneBasis, cell_vectors, match_dataset_genes
from cellvec.gene_store.orthologs import OrthologTable
from cellvec.gene_store.store import GeneTable

log = logging.getLogger(__name__)


@dataclass
class CellEncoder:
    """Turns expression into (refined) cell vectors exactly as `recipe` says."""

    recipe: Recipe
    genes: GeneTable
    background: dict[str, np.ndarray] = field(default_factory=dict)
    head: dict[str, np.ndarray] = field(default_factory=dict)
    _bases: dict = field(default_factory=dict, repr=False)

    def basis(
        self,
        var_names: list[str],
        where: str = "dataset",
        *,
        orthologs: OrthologTable | None = None,
    ) -> GeneBasis:
        """The matched, background-transformed gene vectors of a gene list (cached per list and
        ortholog table: a service sees the same gene panel request after request)."""
        key = (tuple(var_names), orthologs.digest if orthologs is not None else None)
        hit = self._bases.get(key)
        if hit is not None:
            return hit
        cols, rows = match_dataset_genes(var_names, self.genes, where, orthologs=orthologs)
        basis = GeneBasis(
            cols, rows, apply_background(self.genes.vectors[rows], self.background), len(var_names)
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
        return apply_head(self.head, self.unrefined(source, basis, orthologs=orthologs))
