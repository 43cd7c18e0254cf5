"""`atlas build --tune`: choose top-N and k by cross-validation on the reference itself.

The defaults (top 1,000 genes, k = 15) were chosen on the labelled sets we have;
a user's reference may differ (many tiny subtypes want a smaller k, a panel of a
few hundred genes makes top-N moot). Each top-N is fitted once per fold exactly
as `atlas build` fits it, and each k is scored on the same fitted fold, so the
grid costs one refinement per top-N and fold. Nothing outside the reference is
looked at.
"""

from __future__ import annotations

import logging

import numpy as np

from cellvec import metrics
from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.fitting import fit_encoder
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.recipe import Recipe
from cellvec.metrics import classification_metrics, mask

log = logging.getLogger(__name__)

TOP_GENES = (200, 1000)
KS = (5, 10, 15)


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
) -> tuple[int, int, dict]:
    """(best top-N, best k, {"top_genes=N k=K": macro-F1}) from `folds`-fold CV on the reference.
    Ties go to the larger top-N and k (the defaults)."""
    labels = np.asarray(labels, dtype=object)
    n = len(labels)
    splits = metrics.folds(labels, folds, seed)
    scores: dict[str, float] = {}
    for top in top_genes:
        preds = {k: np.empty(n, dtype=object) for k in ks}
        rec = Recipe.from_dict({**recipe.to_dict(), "top_genes": top})
        for tr, te in splits:
            fit = fit_encoder(
                source.subset(mask(n, tr)),
                labels[tr],
                genes,
                rec,
                seed=seed,
                refine_options=refine_options,
            )
            atlas = Atlas.from_fit("tune", fit, labels[tr])
            query = source.subset(mask(n, te))
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
