"""The representations `evaluate` scores, each a way to label a query from a reference.

Vector representations (`plan.VECTOR_REPRESENTATIONS`) are scored the way users get
them: the recipe, changed as the name says, is fitted on the reference cells alone
(`fit_encoder`, as `atlas build` does) and the query is labelled by `map_cells` on
that in-memory atlas (a query of another species, mapped through orthologs, by the
atlas's cross-species view, fitted as `atlas build` fits it: `with_view`). The
controls swap the model's gene vectors for random ones (`random_vectors`) or a
GO-graph embedding (`graph_baseline`). Expression peers
(`pca_knn`, `logreg_expr`, `logreg_panel`, `celltypist`) are trained on the
reference's log expression.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.build import SPECIES_VOTE, species_view_recipe
from cellvec.cell_index.fitting import fit_encoder
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.readers import ExpressionSource, align_genes
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.tune import choose_readout
from cellvec.errors import CellvecError
from cellvec.evaluation.baselines import EXPRESSION_BASELINES, expression_baseline
from cellvec.evaluation.graph import go_graph_embedding
from cellvec.evaluation.peers import celltypist_predict
from cellvec.evaluation.plan import PEERS, VECTOR_REPRESENTATIONS


class Predictors:
    """Labels a query from a reference, one way per representation name; fitted atlases
    are kept and reused across scenarios with the same reference cells."""

    def __init__(
        self,
        genes_by_model: dict,
        recipe: Recipe,
        k: int,
        seed: int,
        refine_options: dict,
        prior=None,
    ):
        self.genes_by_model, self.recipe, self.k, self.seed = genes_by_model, recipe, k, seed
        self.refine_options = refine_options
        # a pre-trained prior (`cell_index.prior`) the model's representations start from;
        # the controls (random, GO-graph vectors) never do
        self.prior = prior
        self._vectors: dict = {}
        self._atlases: dict = {}  # (name, reference cells) -> fitted atlas, reused across scenarios

    def gene_table(self, model: str, kind: str):
        """The model's gene table, or a copy with random or GO-graph vectors (the controls)."""
        genes = self.genes_by_model[model]
        if kind == "model":
            return genes
        if (model, kind) not in self._vectors:
            if kind == "random":
                rng = np.random.default_rng(self.seed)
                vecs = rng.normal(size=genes.vectors.shape).astype(np.float32)
            else:
                if "go_terms" not in genes.genes.columns:
                    raise CellvecError(
                        "The gene table has no go_terms column: rebuild it with --gene2go."
                    )
                vecs = go_graph_embedding(genes.genes["go_terms"].to_list(), seed=self.seed)
            self._vectors[(model, kind)] = replace(genes, vectors=vecs.astype(np.float32))
        return self._vectors[(model, kind)]

    def parts(self, name: str) -> tuple[dict, str, str, object]:
        """What vector representation `name` is made of: (its changes to the recipe, the
        model, the kind of gene vectors, the prior its refinement starts from: the plan's
        for the model's own vectors, else None). `cellvec:MODEL` is cellvec with another
        model, which no prior was trained for."""
        base, model = name, self.recipe.model
        if name.startswith("cellvec:"):
            base, model = "cellvec", name.split(":", 1)[1]
        changes, kind = VECTOR_REPRESENTATIONS[base]
        prior = self.prior if kind == "model" and model == self.recipe.model else None
        return changes, model, kind, prior

    def fit(
        self,
        name: str,
        ref: ExpressionSource,
        y_ref: np.ndarray,
        calibration_split: float = 0.0,
        broad: np.ndarray | None = None,
    ) -> Atlas:
        """An in-memory atlas of vector representation `name` (`cellvec:MODEL`: cellvec
        with another model) fitted on `ref`, with the read-out `atlas build` would choose
        (`tune.choose_readout`: a small reference chooses it by cross-validation)."""
        changes, model, kind, prior = self.parts(name)
        recipe = Recipe.from_dict({**self.recipe.to_dict(), **changes, "model": model})
        genes = self.gene_table(model, kind)
        fitting = {"seed": self.seed, "refine_options": self.refine_options, "prior": prior}
        recipe, readout, _ = choose_readout(ref, y_ref, genes, recipe, **fitting)
        fit = fit_encoder(ref, y_ref, genes, recipe, calibration_split=calibration_split, **fitting)
        return Atlas.from_fit(name, fit, y_ref, broad_labels=broad, readout=readout)

    def with_view(self, name: str, atlas: Atlas, ref: ExpressionSource, y_ref) -> Atlas:
        """`atlas` (cellvec's, fitted on `ref`) with its cross-species view, fitted as
        `atlas build` fits it (`build.species_view_recipe`, the vote by class size, the
        atlas's read-out), once per atlas: what `map --orthologs` compares a query of
        another species with."""
        if atlas._cross:
            return atlas
        _, model, kind, prior = self.parts(name)
        recipe, refine_options, why = species_view_recipe(atlas.recipe, self.refine_options, prior)
        if why:
            return atlas.with_cross_species(None)  # as `atlas build`: the atlas answers
        fit = fit_encoder(
            ref,
            y_ref,
            self.gene_table(model, kind),
            recipe,
            seed=self.seed,
            refine_options=refine_options,
        )
        view = Atlas.from_fit(name, fit, y_ref, readout=atlas.meta.get("readout", "knn"))
        view.meta["vote"] = SPECIES_VOTE
        return atlas.with_cross_species(view)

    def predict(
        self, name: str, ref: ExpressionSource, y_ref: np.ndarray, query: ExpressionSource, **kw
    ) -> np.ndarray:
        """`query`'s labels by representation `name` trained on (`ref`, `y_ref`).

        Keywords: `shared_genes` (expression peers retrained on the genes both have),
        `atlas` (a vector representation's atlas, already fitted), `min_typicality`,
        `min_confidence` and `orthologs` (for `map_cells`)."""
        if name in EXPRESSION_BASELINES or name in PEERS or name == "logreg_panel":
            return self._expression(name, ref, y_ref, query, kw.get("shared_genes", False))
        atlas = kw.get("atlas")
        if atlas is None:
            key = (name, hash(tuple(ref.obs_names)))
            if key not in self._atlases:
                self._atlases[key] = self.fit(name, ref, y_ref)
            atlas = self._atlases[key]
        if kw.get("orthologs") is not None and name.split(":", 1)[0] == "cellvec":
            atlas = self.with_view(name, atlas, ref, y_ref)
        res = map_cells(
            query,
            atlas,
            k=self.k,
            min_typicality=kw.get("min_typicality", 0.0),
            min_confidence=kw.get("min_confidence", 0.0),
            orthologs=kw.get("orthologs"),
        )
        return res.labels

    def _expression(
        self,
        name: str,
        ref: ExpressionSource,
        y_ref: np.ndarray,
        query: ExpressionSource,
        shared_genes: bool,
    ) -> np.ndarray:
        """An expression peer's labels: on the reference's genes (the query zero-filled),
        or retrained on the genes both share (`logreg_panel`, `shared_genes`)."""
        genes = ref.var_names
        if name == "logreg_panel" or shared_genes:
            have = set(query.var_names)
            genes = [g for g in ref.var_names if g in have]
        x_ref = align_genes(ref.to_csr(), ref.var_names, genes)
        if name == "celltypist":
            return celltypist_predict(
                x_ref,
                y_ref,
                query.to_csr(),
                list(genes),
                test_var_names=list(query.var_names),
                seed=self.seed,
            )
        x_q = align_genes(query.to_csr(), query.var_names, genes)
        base = "logreg_expr" if name == "logreg_panel" else name
        return expression_baseline(base, x_ref, y_ref, x_q, self.k, self.seed)
