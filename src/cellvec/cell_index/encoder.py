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
from cellvec.gene_store.store import GeneTable

log = logging.getLogger(__name__)


@dataclass
class CellEncoder:
    """Turns expression into (refined) cell vectors exactly as `recipe` says."""

    recipe: Recipe
    genes: GeneTable
    background: dict[str, np.ndarray] = field(default_factory=dict)
    head: dict[str, np.ndarray] = field(default_factory=dict)

    def basis(self, var_names: list[str], where: str = "dataset") -> GeneBasis:
        cols, rows = match_dataset_genes(var_names, self.genes, where)
        return GeneBasis(cols, rows, apply_background(self.genes.vectors[rows], self.background), len(var_names))

    def unrefined(self, source: ExpressionSource, basis: GeneBasis | None = None) -> np.ndarray:
        basis = basis or self.basis(source.var_names, source.path)
        return cell_vectors(source, basis, self.recipe)

    def encode(self, source: ExpressionSource, basis: GeneBasis | None = None) -> np.ndarray:
        return apply_head(self.head, self.unrefined(source, basis))
