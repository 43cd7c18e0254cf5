"""Expression-space peers: logistic regression (plain, and with each class weighted by
the inverse of its reference cells) and PCA + kNN on log expression.

A query measured on other genes than the reference is aligned to the reference's
genes with zeros where it has none (what a classifier trained on a fixed gene list
sees); `logreg_panel` is the honest upper reference for a panel: retrained on the
genes the query has.
"""

from __future__ import annotations

import numpy as np

EXPRESSION_BASELINES = ("pca_knn", "logreg_expr", "logreg_balanced")


def expression_baseline(name: str, x_train, y_train, x_test, k: int, seed: int) -> np.ndarray:
    """PCA(50) of log expression + distance-weighted kNN (`pca_knn`), or logistic regression
    on log expression (`logreg_expr`; `logreg_balanced`: each class weighted by the inverse
    of its reference cells, scikit-learn's `class_weight="balanced"`, so that a large class
    does not win where a query's class mix differs from the reference's)."""
    if name == "pca_knn":
        from sklearn.decomposition import PCA
        from sklearn.neighbors import KNeighborsClassifier

        dense_tr, dense_te = x_train.toarray(), x_test.toarray()
        pca = PCA(
            n_components=min(50, dense_tr.shape[0] - 1, dense_tr.shape[1]), random_state=seed
        ).fit(dense_tr)
        knn = KNeighborsClassifier(n_neighbors=min(k, len(y_train)), weights="distance")
        return knn.fit(pca.transform(dense_tr), y_train).predict(pca.transform(dense_te))
    if name not in EXPRESSION_BASELINES:
        raise ValueError(f"unknown expression baseline {name!r}: one of {EXPRESSION_BASELINES}")
    from sklearn.linear_model import LogisticRegression

    weights = "balanced" if name == "logreg_balanced" else None
    fit = LogisticRegression(max_iter=2000, random_state=seed, class_weight=weights)
    return fit.fit(x_train, y_train).predict(x_test)
