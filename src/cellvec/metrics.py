"""Classification metrics in the shape the CLI's `--json` promises, and the stratified
folds that cross-validation (`evaluate`, `atlas build --tune`) scores them on.

Depends on numpy and scikit-learn only (and `cellvec.errors`, which depends on nothing),
so that mapping, tuning and evaluation can all use it without importing one another.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from cellvec.errors import CellvecError

log = logging.getLogger(__name__)

UNASSIGNED = "unassigned"


def classification_metrics(truth, predicted) -> dict:
    """accuracy, macro_f1, balanced_accuracy, per_class, n_cells, unassigned_fraction, confusion.

    Unassigned cells count as errors; macro averages run over the true classes.
    """
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    t = np.asarray(truth).astype(str)
    p = np.asarray(predicted).astype(str)
    classes = sorted(set(t))
    prec, rec, f1, sup = precision_recall_fscore_support(t, p, labels=classes, zero_division=0)
    pred_labels = classes + sorted(set(p) - set(classes))
    cm = confusion_matrix(t, p, labels=pred_labels)[: len(classes)]
    return {
        "accuracy": float((t == p).mean()) if len(t) else 0.0,
        "macro_f1": float(np.mean(f1)) if len(f1) else 0.0,
        "balanced_accuracy": float(balanced_accuracy_score(t, p)) if len(t) else 0.0,
        "per_class": {
            c: {"precision": float(a), "recall": float(b), "f1": float(f), "support": int(s)}
            for c, a, b, f, s in zip(classes, prec, rec, f1, sup)
        },
        "n_cells": int(len(t)),
        "unassigned_fraction": float((p == UNASSIGNED).mean()) if len(p) else 0.0,
        "confusion": {"true": classes, "predicted": pred_labels, "matrix": cm.tolist()},
    }


def metrics_table(metrics: dict) -> str:
    """A plain-text per-class table for the terminal."""
    lines = [f"{'class':<28}{'precision':>10}{'recall':>8}{'f1':>7}{'support':>9}"]
    for c, m in metrics["per_class"].items():
        lines.append(
            f"{c[:27]:<28}{m['precision']:>10.3f}{m['recall']:>8.3f}{m['f1']:>7.3f}{m['support']:>9d}"
        )
    lines.append(
        f"accuracy {metrics['accuracy']:.3f}  macro-F1 {metrics['macro_f1']:.3f}  "
        f"balanced accuracy {metrics['balanced_accuracy']:.3f}  n={metrics['n_cells']:,}  "
        f"unassigned {metrics['unassigned_fraction']:.1%}"
    )
    return "\n".join(lines)


def stratified_folds(y: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Stratified `n_folds`-fold splits of the cells labelled `y`: [(train, test) positions]."""
    from sklearn.model_selection import StratifiedKFold

    counts = np.unique(y, return_counts=True)[1]
    if counts.max() < n_folds:
        raise CellvecError(f"Every class has fewer than {n_folds} cells: use fewer --folds.")
    if counts.min() < n_folds:
        log.info(
            "Classes with fewer than %d cells cannot appear in every fold; they are still scored",
            n_folds,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(
            StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
        )


def mask(n: int, idx: np.ndarray) -> np.ndarray:
    """A boolean mask over `n` cells, True at positions `idx` (a fold's train or test cells)."""
    m = np.zeros(n, dtype=bool)
    m[idx] = True
    return m
