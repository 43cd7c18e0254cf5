"""Stratified k-fold evaluation of cellvec's recipe against strong baselines.

Every representation gets the same folds. Gene-vector representations share the
same top-N weights and kNN vote; background removal uses gene vectors only (no
cells, no labels) and the refinement head is trained on each fold's training
cells alone, so nothing is fitted on the held-out cells.

Representations: `pca_knn` (PCA(50) of log expression + kNN), `logreg_expr`
(logistic regression on log expression), `naive_mean` (GenePT-w style weighted
average, no background removal, no refinement), `naive_mean_refined` (the same,
refined), `graph_baseline` (GO co-annotation spectral gene embedding, aggregated
like cellvec), `cellvec_unrefined` (background removal only) and `cellvec` (the
full recipe; `cellvec:<model>` per extra model).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellvec.cell_index.atlas import fit_encoder, labels_of
from cellvec.cell_index.background import apply_background, fit_background
from cellvec.cell_index.knn import exact_knn, vote
from cellvec.cell_index.readers import read_expression
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import apply_head, train_head
from cellvec.cell_index.vectors import match_dataset_genes, top_n_weights, weighted_mean
from cellvec.errors import CellvecError
from cellvec.evaluation.graph import go_graph_embedding
from cellvec.evaluation.metrics import classification_metrics
from cellvec.gene_store.store import GeneStore

log = logging.getLogger(__name__)

BASELINES = (
    "pca_knn",
    "logreg_expr",
    "naive_mean",
    "naive_mean_refined",
    "graph_baseline",
    "cellvec_unrefined",
)


@dataclass
class EvaluationResult:
    """Metrics per representation (pooled over folds), plus optional curves and transfer."""

    dataset: str
    label_key: str
    folds: int
    representations: dict[str, dict]
    data_limited: dict[str, dict[str, float]] = field(default_factory=dict)
    transfer: dict[str, dict] = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self, *, confusion: bool = False) -> dict:
        def strip(m):
            return m if confusion else {k: v for k, v in m.items() if k != "confusion"}

        out = {
            "dataset": self.dataset,
            "label_key": self.label_key,
            "folds": self.folds,
            "recipe": self.recipe,
            "seconds": round(self.seconds, 1),
            "representations": {k: strip(v) for k, v in self.representations.items()},
        }
        if self.data_limited:
            out["data_limited"] = self.data_limited
        if self.transfer:
            out["transfer"] = {k: strip(v) for k, v in self.transfer.items()}
        return out

    def to_markdown(self) -> str:
        lines = [
            f"**{self.dataset}** ({self.label_key}, {self.folds}-fold CV)",
            "",
            "| representation | accuracy | macro-F1 | balanced acc. |",
            "|---|---|---|---|",
        ]
        for name, m in self.representations.items():
            lines.append(
                f"| {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['balanced_accuracy']:.3f} |"
            )
        if self.transfer:
            lines += [
                "",
                "| transfer (no retraining) | accuracy | macro-F1 | balanced acc. |",
                "|---|---|---|---|",
            ]
            for name, m in self.transfer.items():
                lines.append(
                    f"| {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m['balanced_accuracy']:.3f} |"
                )
        if self.data_limited:
            sizes = sorted({int(s) for v in self.data_limited.values() for s in v})
            lines += [
                "",
                "| macro-F1 with n reference cells per class | "
                + " | ".join(map(str, sizes))
                + " |",
                "|---|" + "---|" * len(sizes),
            ]
            for name, curve in self.data_limited.items():
                lines.append(
                    f"| {name} | "
                    + " | ".join(f"{curve.get(str(s), float('nan')):.3f}" for s in sizes)
                    + " |"
                )
        first = next(iter(self.representations.values()))
        classes = list(first["per_class"])
        lines += [
            "",
            "| per-class F1 (support) | "
            + " | ".join(f"{c} ({first['per_class'][c]['support']})" for c in classes)
            + " |",
            "|---|" + "---|" * len(classes),
        ]
        for name, m in self.representations.items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{m['per_class'][c]['f1']:.2f}" for c in classes)
                + " |"
            )
        return "\n".join(lines)


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


def _folds(y: np.ndarray, n_folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    from sklearn.model_selection import StratifiedKFold

    counts = np.unique(y, return_counts=True)[1]
    if counts.max() < n_folds:
        raise CellvecError(f"Every class has fewer than {n_folds} cells: use fewer --folds.")
    if counts.min() < n_folds:
        log.info(
            "Classes with fewer than %d cells cannot appear in every fold; they are still scored",
            n_folds,
        )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return list(
            StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)
        )


def _vector_knn(
    ref: np.ndarray, ref_y: np.ndarray, q: np.ndarray, classes: np.ndarray, k: int
) -> np.ndarray:
    codes = np.searchsorted(classes, ref_y)
    idx, sim = exact_knn(q, ref, k)
    return classes[vote(idx, sim, codes, len(classes)).argmax(1)]


class _Representations:
    """Everything computed once per dataset, then reused by every fold."""

    def __init__(
        self, source, genes_by_model: dict, recipe: Recipe, refine_options: dict, seed: int
    ):
        self.recipe, self.refine_options, self.seed = recipe, refine_options, seed
        self.x = source.to_csr()
        self.models = {}
        for model, genes in genes_by_model.items():
            cols, rows = match_dataset_genes(source.var_names, genes, source.path)
            w = top_n_weights(
                self.x[:, cols], recipe.top_genes, recipe.weighting
            )  # small data: columns copied once
            raw = genes.vectors[rows]
            bg = fit_background(raw, recipe.background)
            self.models[model] = {
                "w": w,
                "raw": raw,
                "basis": apply_background(raw, bg),
                "go": genes.genes["go_terms"].to_list()
                if "go_terms" in genes.genes.columns
                else None,
                "rows": rows,
            }

    def vectors(self, name: str, model: str) -> tuple[np.ndarray, object, np.ndarray]:
        m = self.models[model]
        if name.startswith("naive_mean"):
            basis = m["raw"]
        elif name == "graph_baseline":
            if "graph" not in m:
                if m["go"] is None:
                    raise CellvecError(
                        "The gene table has no go_terms column: rebuild it with --gene2go."
                    )
                emb = go_graph_embedding([m["go"][r] for r in m["rows"]], seed=self.seed)
                m["graph"] = apply_background(emb, fit_background(emb, self.recipe.background))
            basis = m["graph"]
        else:
            basis = m["basis"]
        return weighted_mean(m["w"], basis), m["w"], basis

    def transfer(self, source, y, query, query_y, names, genes, k: int) -> dict[str, dict]:
        """Fit on the whole reference, map `query` with no retraining; metrics per representation."""
        classes = np.unique(y)
        query_genes = set(query.var_names)
        common = [g for g in source.var_names if g in query_genes]
        ref_pos = {g: i for i, g in enumerate(source.var_names)}
        q_pos = {g: i for i, g in enumerate(query.var_names)}
        xr = self.x[:, [ref_pos[g] for g in common]]
        xq = query.to_csr()[:, [q_pos[g] for g in common]]
        recipes = {
            "cellvec": self.recipe,
            "cellvec_unrefined": Recipe.from_dict({**self.recipe.to_dict(), "refine": "none"}),
            "naive_mean": Recipe.from_dict(
                {**self.recipe.to_dict(), "refine": "none", "background": "none"}
            ),
        }
        out = {}
        for name in names:
            if name in EXPRESSION_BASELINES:
                pred = expression_baseline(name, xr, y, xq, k, self.seed)
            elif name in recipes:
                enc, ref_vecs, _ = fit_encoder(
                    source,
                    y,
                    genes,
                    recipes[name],
                    seed=self.seed,
                    refine_options=self.refine_options,
                )
                pred = _vector_knn(ref_vecs, y, enc.encode(query), classes, k)
            else:
                continue  # graph_baseline and naive_mean_refined are scored within the dataset only
            out[name] = classification_metrics(query_y, pred)
            log.info(
                "transfer %-18s accuracy %.3f  macro-F1 %.3f",
                name,
                out[name]["accuracy"],
                out[name]["macro_f1"],
            )
        return out

    def predict(
        self,
        name: str,
        model: str,
        tr: np.ndarray,
        te: np.ndarray,
        y: np.ndarray,
        classes,
        k: int,
        refine: str,
    ) -> np.ndarray:
        if name in EXPRESSION_BASELINES:
            return expression_baseline(name, self.x[tr], y[tr], self.x[te], k, self.seed)
        vecs, w, basis = self.vectors(name, model)
        refined = name in ("cellvec", "naive_mean_refined") or name.startswith("cellvec:")
        if refined and refine != "none":
            head, _ = train_head(
                w[tr],
                basis,
                y[tr] if refine == "supcon" else None,
                mode=refine,
                seed=self.seed,
                **self.refine_options,
            )
            vecs = apply_head(head, vecs)
        return _vector_knn(vecs[tr], y[tr], vecs[te], classes, k)


def evaluate(
    data,
    *,
    label_key: str,
    store,
    models: list[str] | None = None,
    top_genes: int = 200,
    weighting: str = "value",
    background: str = "whiten",
    refine: str = "supcon",
    folds: int = 5,
    k: int = 15,
    baselines: bool = False,
    data_limited: list[int] | None = None,
    query=None,
    query_label_key: str | None = None,
    label_map: dict[str, str] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    transpose: bool = False,
    seed: int = 0,
    refine_options: dict | None = None,
) -> EvaluationResult:
    """Cross-validate representations on one labelled dataset (see module docstring).

    `data_limited`: reference cells per class for a learning curve. `query`: a second
    labelled dataset to map onto the whole of `data` without retraining (transfer).
    """
    t0 = time.perf_counter()
    gs = GeneStore(store)
    models = list(models or [gs.default_model()])
    genes_by_model = {m: gs.load(m) for m in models}
    recipe = Recipe(
        model=models[0],
        top_genes=top_genes,
        weighting=weighting,
        background=background,
        refine=refine,
    )
    source = read_expression(
        data, layer=layer, use_raw=use_raw, gene_column=gene_column, transpose=transpose
    )
    y = labels_of(source, label_key)
    classes = np.unique(y)
    reps = _Representations(source, genes_by_model, recipe, refine_options or {}, seed)
    names = (
        (list(BASELINES) if baselines else []) + ["cellvec"] + [f"cellvec:{m}" for m in models[1:]]
    )
    if refine == "none":
        names = [n for n in names if n != "naive_mean_refined"]
    splits = _folds(y, folds, seed)
    results: dict[str, dict] = {}
    for name in names:
        model = name.split(":", 1)[1] if name.startswith("cellvec:") else models[0]
        pred = np.empty(len(y), dtype=object)
        for tr, te in splits:
            pred[te] = reps.predict(name, model, tr, te, y, classes, k, refine)
        results[name] = classification_metrics(y, pred)
        log.info(
            "%-20s accuracy %.3f  macro-F1 %.3f",
            name,
            results[name]["accuracy"],
            results[name]["macro_f1"],
        )
    curves: dict[str, dict[str, float]] = {}
    if data_limited:
        rng = np.random.default_rng(seed)
        for name in ("pca_knn", "logreg_expr", "cellvec"):
            curve = {}
            for n_per in data_limited:
                pred = np.empty(len(y), dtype=object)
                for tr, te in splits:
                    sub = np.concatenate([rng.permutation(tr[y[tr] == c])[:n_per] for c in classes])
                    pred[te] = reps.predict(
                        name, models[0], np.sort(sub), te, y, classes, k, refine
                    )
                curve[str(n_per)] = classification_metrics(y, pred)["macro_f1"]
            curves[name] = curve
    transfer = {}
    if query is not None:
        q = read_expression(
            query, layer=layer, use_raw=use_raw, gene_column=gene_column, transpose=transpose
        )
        qy = labels_of(q, query_label_key or label_key, label_map=label_map)
        transfer = reps.transfer(source, y, q, qy, names, genes_by_model[models[0]], k)
    return EvaluationResult(
        dataset=Path(str(data)).name if not hasattr(data, "obs") else "<AnnData>",
        label_key=label_key,
        folds=folds,
        representations=results,
        data_limited=curves,
        transfer=transfer,
        recipe=recipe.to_dict(),
        seconds=time.perf_counter() - t0,
    )
