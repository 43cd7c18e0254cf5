"""Classification metrics in the shape the CLI's `--json` promises."""

from __future__ import annotations

import numpy as np

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
