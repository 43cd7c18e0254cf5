"""Expression-space peers: logistic regression and PCA + kNN on log expression.

A query measured on other genes than the reference is aligned to the reference's
genes with zeros where it has none (what a classifier trained on a fixed gene list
sees); `logreg_panel` is the honest upper reference for a panel: retrained on the
genes the query has.
"""

from __future__ import annotations

import numpy as np

EXPRESSION_BASELINES = ("pca_knn", "logreg_expr")


def expression_baseline(name: str, x_train, y_train, x_test, k: int, seed: int) -> np.ndarray:
    """PCA(50) of log expression + distance-weighted kNN, or logistic regression on log expression."""
    if name == "pca_knn":
        from sklearn.decomposition import PCA
        from sklearn.neighbors import KNeighborsClassifier

        dense_tr, dense_te = x_train.toarray(), x_test.toarray()
        pca = PCA(
            n_components=min(50, dense_tr.shape[0] - 1, dense_tr.shape[1]), random_state=seed
        ).fit(dense_tr)
        knn = KNeighborsClassifier(n_neighbors=min(k, len(y_train)), weights="distance")
        return knn.fit(pca.transform(dense_tr), y_train).predict(pca.transform(dense_te))
    from sklearn.linear_model import LogisticRegression

    return (
        LogisticRegression(max_iter=2000, random_state=seed).fit(x_train, y_train).predict(x_test)
    )
