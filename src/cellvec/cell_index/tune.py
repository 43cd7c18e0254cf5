"""Choices made by cross-validation on the reference itself: `atlas build --tune` (top-N
and k) and, for a small reference, the read-out (`choose_readout`).

The defaults (top 1,000 genes, k = 15) were chosen on the labelled sets we have;
a user's reference may differ (many tiny subtypes want a smaller k, a panel of a
few hundred genes makes top-N moot). Each top-N is fitted once per fold exactly
as `atlas build` fits it, and each k is scored on the same fitted fold, so the
grid costs one refinement per top-N and fold. Nothing outside the reference is
looked at.

A reference whose median class has fewer than `FEW_CELLS` cells can over-fit its
refinement: on benchmarks/data_limited.py's draws at 5 cells a class, pbmc3k's refined
kNN scored 0.698 where the unrefined vectors' class centroids scored 0.778, while on
amacrine the refined kNN won (0.812 against 0.664). Neither wins on every set, so each
small reference chooses between them by its own cross-validation (`choose_readout`;
what that gives: results/data_limited.md).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import numpy as np

from cellvec import metrics
from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.fitting import fit_encoder
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.recipe import FEW_CELLS, Recipe
from cellvec.metrics import classification_metrics, mask

log = logging.getLogger(__name__)

TOP_GENES = (200, 1000)
KS = (5, 10, 15)
# the inner fits' per-fold lines (genes matched, cells mapped) say nothing new: kept quiet
INNER_LOGGERS = (
    "cellvec.cell_index.vectors",
    "cellvec.cell_index.mapping",
    "cellvec.cell_index.prior",
)
# the read-outs a small reference chooses from: (recipe changes, read-out); the first is
# the default recipe and wins ties
READOUT_CANDIDATES = {
    "refined kNN": ({}, "knn"),
    "unrefined centroid": ({"refine": "none", "adapt_genes": False}, "centroid"),
}


def _fold_atlases(source, labels, splits, genes, recipe, readout="knn", **fit_options):
    """(in-memory atlas of the fold's reference, the fold's query, its indices) per split:
    `recipe` fitted as `atlas build` fits it (`fit_options`: seed, refine_options), with
    the repeated INFO lines of the inner fits and of the caller's mapping kept quiet."""
    n = len(labels)
    for tr, te in splits:
        with _quiet_inner_fits():  # also while the caller maps the fold's query
            fit = fit_encoder(source.subset(mask(n, tr)), labels[tr], genes, recipe, **fit_options)
            atlas = Atlas.from_fit("fold", fit, labels[tr], readout=readout)
            yield atlas, source.subset(mask(n, te)), te


@contextmanager
def _quiet_inner_fits():
    """Only warnings from the inner folds' fitting and mapping (their INFO lines repeat)."""
    loggers = [logging.getLogger(name) for name in INNER_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(max(lg.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def tune_recipe(
    source: ExpressionSource,
    labels: np.ndarray,
    genes,
    recipe: Recipe,
    *,
    folds: int = 3,
    seed: int = 0,
    refine_options: dict | None = None,
    top_genes: tuple[int, ...] = TOP_GENES,
    ks: tuple[int, ...] = KS,
    prior=None,
) -> tuple[int, int, dict]:
    """(best top-N, best k, {"top_genes=N k=K": macro-F1}) from `folds`-fold CV on the reference.
    Ties go to the larger top-N and k (the defaults). `prior`: each fold starts from it, as
    the atlas will."""
    labels = np.asarray(labels, dtype=object)
    n = len(labels)
    splits = metrics.folds(labels, folds, seed)
    scores: dict[str, float] = {}
    for top in top_genes:
        preds = {k: np.empty(n, dtype=object) for k in ks}
        rec = Recipe.from_dict({**recipe.to_dict(), "top_genes": top})
        for atlas, query, te in _fold_atlases(
            source,
            labels,
            splits,
            genes,
            rec,
            seed=seed,
            refine_options=refine_options,
            prior=prior,
        ):
            for k in ks:
                preds[k][te] = map_cells(query, atlas, k=k).labels
        for k in ks:
            scores[f"top_genes={top} k={k}"] = classification_metrics(labels, preds[k])["macro_f1"]
            log.info(
                "tune: top_genes=%d k=%d macro-F1 %.3f", top, k, scores[f"top_genes={top} k={k}"]
            )
    best = max(
        ((t, k) for t in top_genes for k in ks),
        key=lambda tk: (round(scores[f"top_genes={tk[0]} k={tk[1]}"], 4), tk[0], tk[1]),
    )
    log.info("tune: chose top_genes=%d, k=%d", *best)
    return best[0], best[1], {key: round(v, 4) for key, v in scores.items()}


def choose_readout(
    source: ExpressionSource,
    labels: np.ndarray,
    genes,
    recipe: Recipe,
    *,
    folds: int = 3,
    seed: int = 0,
    refine_options: dict | None = None,
    prior=None,
) -> tuple[Recipe, str, dict | None]:
    """(recipe, read-out, {candidate: macro-F1} or None): for a reference whose median class
    has fewer than `FEW_CELLS` cells and a recipe with supervised refinement, the
    candidate of `READOUT_CANDIDATES` with the best `folds`-fold macro-F1 on the
    reference (ties go to the refined kNN); otherwise the recipe as given, read by kNN,
    and no scores. `prior`: every candidate's folds start from it, as the atlas will (the
    unrefined candidate takes its background and gene gates and corrections)."""
    labels = np.asarray(labels, dtype=object)
    counts = np.unique(labels, return_counts=True)[1]
    if recipe.refine != "supcon" or np.median(counts) >= FEW_CELLS:
        return recipe, "knn", None
    folds = min(folds, int(counts.max()))  # 2 cells a class still allow 2 folds
    if folds < 2:
        log.warning(
            "few cells: no class has two cells, so no read-out can be cross-validated; the "
            "atlas is read by the refined kNN (choose with `atlas build --readout`)"
        )
        return recipe, "knn", None
    splits = metrics.folds(labels, folds, seed)
    scores = {}
    log.info(
        "few cells (median class %d): choosing the read-out by %d-fold CV on the reference",
        int(np.median(counts)),
        folds,
    )
    for name, (changes, readout) in READOUT_CANDIDATES.items():
        rec = Recipe.from_dict({**recipe.to_dict(), **changes})
        pred = np.empty(len(labels), dtype=object)
        for atlas, query, te in _fold_atlases(
            source,
            labels,
            splits,
            genes,
            rec,
            readout,
            seed=seed,
            refine_options=refine_options,
            prior=prior,
        ):
            pred[te] = map_cells(query, atlas).labels
        scores[name] = round(classification_metrics(labels, pred)["macro_f1"], 4)
    best = max(scores, key=lambda c: (scores[c], c == "refined kNN"))
    log.info(
        "few cells: %d-fold macro-F1 on the reference %s; chose the %s",
        folds,
        ", ".join(f"{c} {v:.3f}" for c, v in scores.items()),
        best,
    )
    changes, readout = READOUT_CANDIDATES[best]
    return Recipe.from_dict({**recipe.to_dict(), **changes}), readout, scores
