"""Stratified k-fold evaluation of cellvec's recipe against expression peers and controls.

Every representation gets the same folds. A vector representation is scored the
way users get it: its recipe is fitted on the fold's reference cells alone
(`fit_encoder`, as `atlas build` does) and the held-out cells are labelled by
`map_cells` on that in-memory atlas; nothing is fitted on held-out cells.

Representations (`evaluation.representations`, named in `evaluation.plan`):
- expression peers: `pca_knn` (PCA(50) + kNN), `logreg_expr` (logistic regression
  on log expression), `logreg_balanced` (the same, each class weighted by the inverse of
  its reference cells), `celltypist` (the real CellTypist 1.7.1, in its own virtual
  environment: `EvaluationPlan(peers=("celltypist",))`);
- `cellvec` (the recipe), `cellvec_unrefined` (no refinement), `naive_mean`
  (GenePT-w: the plain weighted average, no background removal, no centring);
- controls with the same recipe on other gene vectors: `random_vectors` (Gaussian
  vectors of the same size: is the text worth anything?) and `graph_baseline`
  (spectral embedding of the GO co-annotation graph: text-free prior knowledge);
- ablations (`ablations=True`): `head_only` (no gene adapter), `no_center`,
  `top200` (top 200 genes instead of the recipe's N).

Scenarios beyond plain folds (`Scenarios`; `evaluation.scenarios` and
`evaluation.transfer`): a data-limited curve, panels, two levels of labels,
left-out subtypes, a species swap and transfer to a second labelled dataset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

from cellvec import metrics
from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.labels import broad_labels_of, labels_of, reference_labels
from cellvec.cell_index.prior import load_prior
from cellvec.cell_index.readers import ExpressionSource, read_expression
from cellvec.cell_index.recipe import Recipe
from cellvec.errors import CellvecError
from cellvec.evaluation.cross_validation import CrossValidation, score_representations
from cellvec.evaluation.plan import EvaluationPlan, Scenarios
from cellvec.evaluation.representations import Predictors
from cellvec.evaluation.result import EvaluationResult
from cellvec.evaluation.scenarios import (
    data_limited_curves,
    left_out_scores,
    panel_scores,
    two_level_scores,
)
from cellvec.evaluation.transfer import (
    SpeciesSwap,
    read_transfer,
    species_swap_scores,
    swapped_transfer_scores,
    transfer_scores,
)
from cellvec.gene_store.store import GeneStore

log = logging.getLogger(__name__)


def evaluate(
    data,
    *,
    label_key: str,
    store,
    broad_label_key: str | None = None,
    models: list[str] | None = None,
    recipe: Recipe | None = None,
    plan: EvaluationPlan | None = None,
    scenarios: Scenarios | None = None,
) -> EvaluationResult:
    """Cross-validate representations on one labelled dataset (see module docstring).

    `data`: an `ExpressionSource` (or a path or AnnData, read as is). `recipe`: how
    cells become vectors (default `Recipe()`); its model is replaced by `models[0]`
    (default: the store's default model), and each further model is scored as
    `cellvec:MODEL`. `plan`: folds, k, seed and which representations
    (`EvaluationPlan`); `scenarios`: the runs beyond plain folds (`Scenarios`).

    `broad_label_key` (e.g. `cell_type_broad` over `cell_type`) scores every representation
    at the broad level too (a fine label counts as its broad class), and cellvec's own two
    levels with the unassigned call (`scenarios.call`): how many cells whose fine label is
    unassigned still get a broad one, and how many of those are right. The left-out
    scenario then reports how many of a missing subtype's cells get the right broad label.
    """
    t0 = time.perf_counter()
    plan, scenarios = plan or EvaluationPlan(), scenarios or Scenarios()
    swap = SpeciesSwap.of(scenarios)  # read (or refuse) the table before any fold runs
    gs = GeneStore(store)
    models = list(models or [gs.default_model()])
    genes_by_model = {m: gs.load(m) for m in models}
    recipe = recipe or Recipe()
    recipe = replace(
        recipe,
        model=genes_by_model[models[0]].model,
        adapt_genes=recipe.adapt_genes and recipe.refine != "none",
    )
    source = read_expression(data)
    y = labels_of(source, label_key)
    y_broad = broad_labels_of(source, y, broad_label_key) if broad_label_key else None
    prior = load_prior(gs.store, plan.prior, genes_by_model[models[0]]) if plan.prior else None
    if prior is not None:
        recipe = replace(recipe, prior_hash=prior.digest)
    pred = Predictors(
        genes_by_model, recipe, plan.k, plan.seed, dict(plan.refine_options or {}), prior=prior
    )
    names = plan.names(models, recipe.refine)
    if plan.skip_folds and scenarios.transfer is None:
        raise CellvecError("skip_folds leaves nothing to score without a query.")
    splits = [] if plan.skip_folds else metrics.folds(y, plan.folds, plan.seed)
    for sub in scenarios.leave_out if splits else ():
        if sub not in set(y):
            raise CellvecError(f"--leave-out {sub!r} is not a {label_key} of {source.path}.")
    cv = CrossValidation(pred, source, y, splits)

    results, broad = score_representations(cv, names, y_broad)
    scored = _scenario_scores(cv, plan, scenarios, recipe, y_broad)
    swapped: dict = {}
    if swap:
        swapped = {"to": swap.to, "orthologs": swap.table.source, "genes": {}}
        if splits:
            swapped["genes"]["folds"], swapped["folds"] = species_swap_scores(cv, swap, plan.peers)
    transfer = {}
    if scenarios.transfer is not None:
        q, qy = read_transfer(scenarios.transfer, label_key)
        transfer = transfer_scores(cv, names, q, qy)
        if swap:
            swapped["genes"]["transfer"], swapped["transfer"] = swapped_transfer_scores(
                cv, names, q, qy, swap
            )
    return EvaluationResult(
        dataset=Path(source.path).name,
        label_key=label_key,
        folds=plan.folds,
        representations=results,
        transfer=transfer,
        broad=broad,
        broad_label_key=broad_label_key,
        species_swap=swapped,
        recipe=recipe.to_dict(),
        seconds=time.perf_counter() - t0,
        **scored,
    )


def _scenario_scores(
    cv: CrossValidation, plan: EvaluationPlan, scenarios: Scenarios, recipe: Recipe, y_broad
) -> dict:
    """The in-fold scenarios, as `EvaluationResult` fields: `data_limited`, `panels`,
    `two_levels` (with broad labels) and `leave_out` (cellvec and logistic regression)."""
    if not cv.splits:
        return {}
    peers, seed, call = plan.peers, plan.seed, scenarios.call
    out: dict = {}
    if scenarios.data_limited:
        out["data_limited"] = data_limited_curves(
            cv, scenarios.data_limited, peers=peers, refine=recipe.refine, seed=seed
        )
    out["panels"] = panel_scores(cv, scenarios.panels, peers=peers, seed=seed)
    if y_broad is not None:
        out["two_levels"] = two_level_scores(cv, y_broad, call)
    out["leave_out"] = {
        sub: {
            name: left_out_scores(cv, name, sub, call, y_broad)
            for name in ("cellvec", "logreg_expr")
        }
        for sub in scenarios.leave_out
    }
    return out


def evaluate_atlas(
    store,
    name: str,
    *,
    reference: str | Path | ExpressionSource | None = None,
    folds: int = 5,
    seed: int = 0,
) -> dict:
    """An atlas's own cross-validated scores, for its card (`cellvec atlas export
    --evaluate`): its reference (`reference`, a file or an `ExpressionSource`; default the
    file the atlas was built from) scored in `folds` stratified folds with the atlas's
    recipe, k and refinement options (`meta["refine_options"]`), over the cells the atlas
    was built from (`reference_labels`: labelled, and none of the labels it excluded,
    `meta["excluded_labels"]`, which it never predicts). Returns `folds`, `accuracy`,
    `macro_f1`, `per_class_f1` and the `reference` scored."""
    atlas = Atlas.open(store, name)
    reference = reference or atlas.meta.get("source")
    if not isinstance(reference, ExpressionSource) and (
        not reference or not Path(str(reference)).exists()
    ):
        raise CellvecError(
            f"Atlas {name!r}: its reference ({reference}) is not here to cross-validate; give "
            "it with --reference FILE."
        )
    source, _, _, _ = reference_labels(
        read_expression(reference),
        atlas.meta["label_key"],
        broad_label_key=atlas.meta.get("broad_label_key"),
        exclude_labels=list(atlas.meta.get("excluded_labels") or {}),
    )
    recipe = atlas.recipe.choices()
    plan = EvaluationPlan(
        folds=folds,
        k=atlas.k,
        seed=seed,
        representations=("cellvec",),
        refine_options=atlas.meta.get("refine_options"),  # e.g. --level-shift
    )
    ev = evaluate(
        source,
        label_key=atlas.meta["label_key"],
        store=store,
        models=[recipe.model],
        recipe=recipe,
        plan=plan,
    )
    m = ev.representations["cellvec"]
    return {
        "folds": folds,
        "accuracy": round(float(m["accuracy"]), 4),
        "macro_f1": round(float(m["macro_f1"]), 4),
        "per_class_f1": {c: round(float(v["f1"]), 4) for c, v in m["per_class"].items()},
        "reference": str(reference.path if isinstance(reference, ExpressionSource) else reference),
    }
