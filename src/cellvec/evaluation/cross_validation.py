"""The folds runner: every representation labels each fold's held-out cells from the
other folds' cells, and the labels pooled over folds are scored once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from cellvec.cell_index.labels import pair_counts
from cellvec.cell_index.readers import ExpressionSource
from cellvec.evaluation.representations import Predictors
from cellvec.metrics import classification_metrics, mask

log = logging.getLogger(__name__)


@dataclass
class CrossValidation:
    """A labelled dataset (`source`, its labels `y`), its `splits` ((train indices, test
    indices) per fold) and the `predictors` that label one fold from another."""

    predictors: Predictors
    source: ExpressionSource
    y: np.ndarray
    splits: list[tuple[np.ndarray, np.ndarray]]

    @property
    def n(self) -> int:
        return len(self.y)

    def fold(self, tr: np.ndarray, te: np.ndarray) -> tuple[ExpressionSource, ExpressionSource]:
        """(reference, query): the cells at indices `tr` and `te`."""
        return self.source.subset(mask(self.n, tr)), self.source.subset(mask(self.n, te))

    def predict(self, name: str, ref_cells=None, query_of=None, **kw) -> np.ndarray:
        """Every cell's label by representation `name`, each from the folds it is not in.

        `ref_cells(i, train indices)`: the reference cells kept in fold i (a data-limited
        draw); `query_of(i, query)`: the query as fold i sees it (a panel, renamed genes);
        `kw` go to `Predictors.predict`."""
        out = np.empty(self.n, dtype=object)
        for i, (tr, te) in enumerate(self.splits):
            tr = ref_cells(i, tr) if ref_cells else tr
            q = self.source.subset(mask(self.n, te))
            q = query_of(i, q) if query_of else q
            ref = self.source.subset(mask(self.n, tr))
            out[te] = self.predictors.predict(name, ref, self.y[tr], q, **kw)
        return out

    def score(self, name: str, **kw) -> dict:
        """`classification_metrics` of `predict(name, **kw)`."""
        return classification_metrics(self.y, self.predict(name, **kw))


def score_representations(
    cv: CrossValidation, names: list[str], y_broad: np.ndarray | None
) -> tuple[dict[str, dict], dict[str, dict]]:
    """(metrics per representation, the same at the broad level (a fine label counts as
    its broad class; empty without `y_broad`))."""
    results: dict[str, dict] = {}
    broad: dict[str, dict] = {}
    for name in names if cv.splits else []:
        t = time.perf_counter()
        predicted = cv.predict(name)
        results[name] = classification_metrics(cv.y, predicted)
        if y_broad is not None:
            broad[name] = classification_metrics(y_broad, as_broad(predicted, cv.y, y_broad))
        log.info(
            "%-18s accuracy %.3f  macro-F1 %.3f  (%.0f s)",
            name,
            results[name]["accuracy"],
            results[name]["macro_f1"],
            time.perf_counter() - t,
        )
    return results, broad


def as_broad(predicted: np.ndarray, y_ref: np.ndarray, y_broad_ref: np.ndarray) -> np.ndarray:
    """Predicted fine labels as broad ones: each fine class's most common broad label among
    the reference cells (`y_ref`, `y_broad_ref`); a label the reference lacks stays as is."""
    fine, f = np.unique(np.asarray(y_ref).astype(str), return_inverse=True)
    broad, b = np.unique(np.asarray(y_broad_ref).astype(str), return_inverse=True)
    parent = dict(zip(fine, broad[pair_counts(f, len(fine), b, len(broad)).argmax(1)]))
    labels, inverse = np.unique(predicted.astype(str), return_inverse=True)
    return np.array([parent.get(c, c) for c in labels], dtype=object)[inverse]
