"""Stratified k-fold evaluation of cellvec's recipe against expression peers and controls.

Every representation gets the same folds. A vector representation is scored the
way users get it: its recipe is fitted on the fold's reference cells alone
(`fit_encoder`, as `atlas build` does) and the held-out cells are labelled by
`map_cells` on that in-memory atlas; nothing is fitted on held-out cells.

Representations:
- expression peers: `pca_knn` (PCA(50) + kNN), `logreg_expr` (logistic regression
  on log expression), `celltypist` (the real CellTypist 1.7.1, in its own virtual
  environment: `peers=("celltypist",)`);
- `cellvec` (the recipe), `cellvec_unrefined` (no refinement), `naive_mean`
  (GenePT-w: the plain weighted average, no background removal, no centring);
- controls with the same recipe on other gene vectors: `random_vectors` (Gaussian
  vectors of the same size: is the text worth anything?) and `graph_baseline`
  (spectral embedding of the GO co-annotation graph: text-free prior knowledge);
- ablations (`ablations=True`): `head_only` (no gene adapter), `no_center`,
  `top200` (top 200 genes instead of the recipe's N).

Scenarios beyond plain folds: a data-limited curve (n reference cells per class),
panels (the query keeps a random share of the genes: cellvec re-aggregates the
reference over them; expression peers see zeros for the rest, `logreg_panel` is
retrained on the panel), left-out subtypes (how many of an unseen subtype's cells
come back unassigned) and transfer to a second labelled dataset.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.fitting import fit_encoder
from cellvec.cell_index.labels import broad_labels_of, labels_of, pair_counts, reference_labels
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.readers import ExpressionSource, read_expression
from cellvec.cell_index.recipe import Recipe
from cellvec.errors import CellvecError
from cellvec.evaluation.baselines import EXPRESSION_BASELINES, align, expression_baseline
from cellvec.gene_store.store import GeneStore
from cellvec.metrics import UNASSIGNED, classification_metrics, mask, stratified_folds

log = logging.getLogger(__name__)

# name -> (recipe changes, gene vectors)
VECTOR_REPRESENTATIONS = {
    "cellvec": ({}, "model"),
    "cellvec_unrefined": ({"refine": "none", "adapt_genes": False}, "model"),
    "naive_mean": (
        {"refine": "none", "adapt_genes": False, "background": "none", "center": False},
        "model",
    ),
    "random_vectors": ({}, "random"),
    "graph_baseline": ({}, "go_graph"),
    "head_only": ({"adapt_genes": False}, "model"),
    "no_center": ({"center": False}, "model"),
    "top200": ({"top_genes": 200}, "model"),
}
BASELINES = (
    "pca_knn",
    "logreg_expr",
    "naive_mean",
    "graph_baseline",
    "random_vectors",
    "cellvec_unrefined",
)
ABLATIONS = ("head_only", "no_center", "top200")
CALIBRATION_SPLIT = 0.1  # held out of refinement in the left-out scenario, for typicality
PEERS = ("celltypist",)


@dataclass
class EvaluationResult:
    """Metrics per representation (pooled over folds), plus curves and scenarios."""

    dataset: str
    label_key: str
    folds: int
    representations: dict[str, dict]
    data_limited: dict[str, dict[str, float]] = field(default_factory=dict)
    panels: dict[str, dict[str, dict]] = field(default_factory=dict)
    leave_out: dict[str, dict[str, dict]] = field(default_factory=dict)
    transfer: dict[str, dict] = field(default_factory=dict)
    broad: dict[str, dict] = field(default_factory=dict)  # each representation, broad level
    two_levels: dict = field(default_factory=dict)  # cellvec's calls at both levels
    broad_label_key: str | None = None
    species_swap: dict = field(default_factory=dict)  # the query in another species' symbols
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
        if self.panels:
            out["panels"] = {
                f: {k: strip(v) for k, v in reps.items()} for f, reps in self.panels.items()
            }
        if self.leave_out:
            out["leave_out"] = self.leave_out
        if self.transfer:
            out["transfer"] = {k: strip(v) for k, v in self.transfer.items()}
        if self.broad:
            out["broad_label_key"] = self.broad_label_key
            out["broad"] = {k: strip(v) for k, v in self.broad.items()}
        if self.two_levels:
            out["two_levels"] = self.two_levels
        if self.species_swap:
            sw = self.species_swap
            out["species_swap"] = {
                **{k: v for k, v in sw.items() if k not in ("folds", "transfer")},
                **{
                    part: {k: strip(v) for k, v in sw[part].items()}
                    for part in ("folds", "transfer")
                    if part in sw
                },
            }
        return out

    def to_markdown(self) -> str:
        lines = [f"**{self.dataset}** ({self.label_key}, {self.folds}-fold CV)", ""]
        columns = ["accuracy", "macro-F1", "balanced acc."]

        def cells(m: dict) -> list[str]:
            return [f"{m[k]:.3f}" for k in ("accuracy", "macro_f1", "balanced_accuracy")]

        if self.representations:
            lines += _grid(
                "representation",
                columns,
                {n: cells(m) for n, m in self.representations.items()},
            )
        if self.broad:
            lines += [""] + _grid(
                f"broad level ({self.broad_label_key}; a fine label counts as its broad class)",
                columns,
                {n: cells(m) for n, m in self.broad.items()},
            )
        if self.two_levels:
            t = self.two_levels
            lines += [
                "",
                f"cellvec with the unassigned call (min_confidence {t['min_confidence']:g}, "
                f"min_typicality {t['min_typicality']:g}; atlas with a "
                f"{t['calibration_split']:g} calibration split):",
                "",
            ]
            lines += _grid(
                "level",
                ["macro-F1", "accuracy", "unassigned", "macro-F1 without the call"],
                {
                    lvl: [
                        f"{t[lvl]['macro_f1']:.3f}",
                        f"{t[lvl]['accuracy']:.3f}",
                        f"{t[lvl]['unassigned_fraction']:.3f}",
                        f"{t[lvl]['macro_f1_without']:.3f}",
                    ]
                    for lvl in ("fine", "broad")
                },
            )
            lines += [
                "",
                f"Of the cells whose fine label is unassigned ({t['fine_unassigned']:,}), "
                f"{t['broad_given']:,} get a broad label, {t['broad_right']:,} of them the "
                "right one.",
            ]
        if self.species_swap:
            sw = self.species_swap
            for part in ("folds", "transfer"):
                if part not in sw:
                    continue
                kept, total = sw["genes"][part]
                lines += [
                    "",
                    f"The query renamed to {sw['to']} symbols through {sw['orthologs']} "
                    f"(one-to-one orthologs: {kept:,} of {total:,} genes keep a name); cellvec "
                    "maps it back with `orthologs=`, the expression peers get the kept genes "
                    "under their own names:",
                    "",
                ]
                same = self.representations if part == "folds" else self.transfer
                lines += _grid(
                    f"{'cross-validated' if part == 'folds' else 'transfer'}, query as {sw['to']}",
                    columns + ["macro-F1 in its own species"],
                    {
                        n: cells(m) + [f"{same[n]['macro_f1']:.3f}" if n in same else "–"]
                        for n, m in sw[part].items()
                    },
                )
        if self.transfer:
            lines += [""] + _grid(
                "transfer (no retraining)",
                columns,
                {n: cells(m) for n, m in self.transfer.items()},
            )
        if self.data_limited:
            sizes = sorted({int(s) for v in self.data_limited.values() for s in v})
            lines += [""] + _grid(
                "macro-F1 with n reference cells per class",
                map(str, sizes),
                {
                    n: [f"{curve.get(str(s), float('nan')):.3f}" for s in sizes]
                    for n, curve in self.data_limited.items()
                },
            )
        if self.panels:
            names = dict.fromkeys(n for reps in self.panels.values() for n in reps)
            lines += [""] + _grid(
                "macro-F1 with a share of the genes in the query",
                self.panels,
                {
                    n: [
                        f"{reps[n]['macro_f1']:.3f}" if n in reps else "–"
                        for reps in self.panels.values()
                    ]
                    for n in names
                },
            )
        if self.leave_out:
            broad = any(
                "broad_right" in m for reps in self.leave_out.values() for m in reps.values()
            )
            rows = {
                f"{sub} | {n}": [
                    f"{m['unassigned']:.2f}"
                    + (
                        f" ({m['by_typicality']:.2f} / {m['by_mixing']:.2f})"
                        if "by_mixing" in m
                        else ""
                    ),
                    f"{m['mislabelled']:.2f}",
                    f"{m['known_macro_f1']:.3f} / {m['known_macro_f1_without']:.3f}",
                ]
                + ([f"{m['broad_right']:.2f}"] if broad else [])
                for sub, reps in self.leave_out.items()
                for n, m in reps.items()
            }
            lines += [""] + _grid(
                "left-out subtype | representation",
                [
                    "unassigned (by typicality / by mixing)",
                    "mislabelled",
                    "known macro-F1 with / without the unassigned call",
                ]
                + (["right broad label"] if broad else []),
                rows,
            )
        if self.representations:
            first = next(iter(self.representations.values()))
            classes = list(first["per_class"])
            lines += [""] + _grid(
                "per-class F1 (support)",
                [f"{c} ({first['per_class'][c]['support']})" for c in classes],
                {
                    n: [f"{m['per_class'][c]['f1']:.2f}" for c in classes]
                    for n, m in self.representations.items()
                },
            )
        return "\n".join(lines)


def _grid(title: str, columns, rows: dict[str, list[str]]) -> list[str]:
    """A markdown table: `title` over the row names, then one column per entry."""
    columns = list(columns)
    n = len(columns) + title.count("|")
    out = [f"| {title} | " + " | ".join(columns) + " |", "|---|" + "---|" * n]
    return out + [f"| {name} | " + " | ".join(cells) + " |" for name, cells in rows.items()]


class _Predictors:
    """Labels a query from a reference, one way per representation name."""

    def __init__(
        self,
        genes_by_model: dict,
        recipe: Recipe,
        k: int,
        seed: int,
        refine_options: dict,
    ):
        self.genes_by_model, self.recipe, self.k, self.seed = genes_by_model, recipe, k, seed
        self.refine_options = refine_options
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
                from cellvec.evaluation.graph import go_graph_embedding

                if "go_terms" not in genes.genes.columns:
                    raise CellvecError(
                        "The gene table has no go_terms column: rebuild it with --gene2go."
                    )
                vecs = go_graph_embedding(genes.genes["go_terms"].to_list(), seed=self.seed)
            self._vectors[(model, kind)] = replace(genes, vectors=vecs.astype(np.float32))
        return self._vectors[(model, kind)]

    def fit(
        self,
        name: str,
        ref: ExpressionSource,
        y_ref: np.ndarray,
        calibration_split: float = 0.0,
        broad: np.ndarray | None = None,
    ) -> Atlas:
        base, model = name, None
        if name.startswith("cellvec:"):
            base, model = "cellvec", name.split(":", 1)[1]
        changes, kind = VECTOR_REPRESENTATIONS[base]
        model = model or self.recipe.model
        recipe = Recipe.from_dict({**self.recipe.to_dict(), **changes, "model": model})
        fit = fit_encoder(
            ref,
            y_ref,
            self.gene_table(model, kind),
            recipe,
            seed=self.seed,
            refine_options=self.refine_options,
            calibration_split=calibration_split,
        )
        return Atlas.from_fit(name, fit, y_ref, broad_labels=broad)

    def predict(
        self, name: str, ref: ExpressionSource, y_ref: np.ndarray, query: ExpressionSource, **kw
    ) -> np.ndarray:
        if name in EXPRESSION_BASELINES or name in PEERS or name == "logreg_panel":
            genes = ref.var_names
            if name == "logreg_panel" or kw.get("shared_genes"):  # retrained on shared genes
                have = set(query.var_names)
                genes = [g for g in ref.var_names if g in have]
            x_ref = align(ref.to_csr(), ref.var_names, genes)
            if name == "celltypist":
                from cellvec.evaluation.peers import celltypist_predict

                return celltypist_predict(
                    x_ref,
                    y_ref,
                    query.to_csr(),
                    list(genes),
                    test_var_names=list(query.var_names),
                    seed=self.seed,
                )
            x_q = align(query.to_csr(), query.var_names, genes)
            base = "logreg_expr" if name == "logreg_panel" else name
            return expression_baseline(base, x_ref, y_ref, x_q, self.k, self.seed)
        atlas = kw.get("atlas")
        if atlas is None:
            key = (name, hash(tuple(ref.obs_names)))
            if key not in self._atlases:
                self._atlases[key] = self.fit(name, ref, y_ref)
            atlas = self._atlases[key]
        res = map_cells(
            query,
            atlas,
            k=self.k,
            min_typicality=kw.get("min_typicality", 0.0),
            min_confidence=kw.get("min_confidence", 0.0),
            orthologs=kw.get("orthologs"),
        )
        return res.labels


def evaluate(
    data,
    *,
    label_key: str,
    store,
    models: list[str] | None = None,
    top_genes: int = 1000,
    weighting: str = "value",
    background: str = "whiten",
    center: bool = True,
    refine: str = "supcon",
    adapt_genes: bool = True,
    folds: int = 5,
    k: int = 15,
    baselines: bool = False,
    ablations: bool = False,
    peers: tuple[str, ...] = (),
    data_limited: list[int] | None = None,
    panels: list[float] | None = None,
    leave_out: list[str] | None = None,
    min_typicality: float = 0.01,
    min_mixing: float = 0.01,
    min_confidence: float = 0.0,
    broad_label_key: str | None = None,
    species_swap: str | None = None,
    orthologs=None,
    query=None,
    query_label_key: str | None = None,
    label_map: dict[str, str] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    transpose: bool = False,
    seed: int = 0,
    refine_options: dict | None = None,
    skip_folds: bool = False,
    representations: list[str] | None = None,
) -> EvaluationResult:
    """Cross-validate representations on one labelled dataset (see module docstring).

    `data_limited`: reference cells per class for a learning curve. `panels`: shares
    of the genes kept in the query. `leave_out`: subtypes left out of the reference
    (`min_typicality` and `min_mixing` are the unassigned thresholds scored there). `query`: a second
    labelled dataset mapped onto the whole of `data` without retraining (transfer);
    `skip_folds` scores only that. `representations` names exactly which to score in
    folds and transfer (default: cellvec, plus what `baselines`, `peers` and
    `ablations` add); an empty list runs only the scenarios.

    `broad_label_key` (e.g. `cell_type_broad` over `cell_type`) scores every representation
    at the broad level too (a fine label counts as its broad class), and cellvec's own two
    levels with the unassigned call (`min_confidence`, `min_typicality`): how many cells
    whose fine label is unassigned still get a broad one, and how many of those are right.
    The left-out scenario then reports how many of a missing subtype's cells get the
    right broad label.

    `species_swap` ("mouse" or "human", with an `orthologs` table such as HCOP's): each
    fold's query (and the transfer `query`) is renamed to that species' symbols through
    the table's one-to-one orthologs (other genes dropped, as a real cross-species query
    lacks them) and mapped onto the unchanged reference: cellvec through `orthologs=`,
    the expression peers (logistic regression zero-filled and retrained on the kept
    genes, CellTypist) on the kept genes under their own names.
    """
    t0 = time.perf_counter()
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise CellvecError(f"Unknown peer {unknown[0]!r}; choose from {', '.join(PEERS)}.")
    if species_swap:  # read (or refuse) the table before any fold runs
        table = _ortholog_table(orthologs)
        mapping = table.one_to_one(species_swap)
    gs = GeneStore(store)
    models = list(models or [gs.default_model()])
    genes_by_model = {m: gs.load(m) for m in models}
    recipe = Recipe(
        model=genes_by_model[models[0]].model,
        top_genes=top_genes,
        weighting=weighting,
        background=background,
        center=center,
        refine=refine,
        adapt_genes=adapt_genes and refine != "none",
    )
    source = read_expression(
        data, layer=layer, use_raw=use_raw, gene_column=gene_column, transpose=transpose
    )
    y = labels_of(source, label_key)
    n = len(y)
    y_broad = None
    if broad_label_key:
        y_broad = broad_labels_of(source, y, broad_label_key)
    pred = _Predictors(genes_by_model, recipe, k, seed, refine_options or {})
    names = (
        (list(BASELINES) if baselines else [])
        + list(peers)
        + (list(ABLATIONS) if ablations else [])
        + ["cellvec"]
        + [f"cellvec:{m}" for m in models[1:]]
    )
    if representations is not None:
        known = set(VECTOR_REPRESENTATIONS) | set(EXPRESSION_BASELINES) | set(PEERS)
        bad = [r for r in representations if r not in known and not r.startswith("cellvec:")]
        if bad:
            raise CellvecError(
                f"Unknown representation {bad[0]!r}; choose from {', '.join(sorted(known))}."
            )
        names = list(representations)
    if refine == "none":
        names = [x for x in names if x not in ("cellvec_unrefined", "head_only")]
    if skip_folds and query is None:
        raise CellvecError("skip_folds leaves nothing to score without a query.")
    splits = [] if skip_folds else stratified_folds(y, folds, seed)

    def cross_validate(name, ref_cells=None, query_of=None, **kw) -> np.ndarray:
        out = np.empty(n, dtype=object)
        for i, (tr, te) in enumerate(splits):
            tr = ref_cells(i, tr) if ref_cells else tr
            q = source.subset(mask(n, te))
            q = query_of(i, q) if query_of else q
            out[te] = pred.predict(name, source.subset(mask(n, tr)), y[tr], q, **kw)
        return out

    results: dict[str, dict] = {}
    broad: dict[str, dict] = {}
    for name in names if splits else []:
        t = time.perf_counter()
        predicted = cross_validate(name)
        results[name] = classification_metrics(y, predicted)
        if y_broad is not None:
            broad[name] = classification_metrics(y_broad, _as_broad(predicted, y, y_broad))
        log.info(
            "%-18s accuracy %.3f  macro-F1 %.3f  (%.0f s)",
            name,
            results[name]["accuracy"],
            results[name]["macro_f1"],
            time.perf_counter() - t,
        )

    curves: dict[str, dict[str, float]] = {}
    classes = np.unique(y)
    if data_limited and splits:
        # cellvec_unrefined: the language-model prior without refinement, which small
        # references can over-fit (results/data_limited.md)
        for name in [
            "pca_knn",
            "logreg_expr",
            *peers,
            "random_vectors",
            *(["cellvec_unrefined"] if refine != "none" else []),
            "cellvec",
        ]:
            curve = {}
            for n_per in data_limited:
                rng = np.random.default_rng(seed)

                def few(i, tr, n_per=n_per, rng=rng):
                    return np.sort(
                        np.concatenate([rng.permutation(tr[y[tr] == c])[:n_per] for c in classes])
                    )

                curve[str(n_per)] = classification_metrics(y, cross_validate(name, ref_cells=few))[
                    "macro_f1"
                ]
            curves[name] = curve
            log.info("data-limited %-14s %s", name, curve)

    panel_results: dict[str, dict[str, dict]] = {}
    for share in (panels or []) if splits else []:
        reps = {}
        for name in ["logreg_expr", "logreg_panel", "pca_knn", *peers, "random_vectors", "cellvec"]:

            def panel(i, q, share=share):
                rng = np.random.default_rng([seed, i, int(share * 1000)])
                keep = rng.random(len(q.var_names)) < share
                return q.subset_genes(keep)

            reps[name] = classification_metrics(y, cross_validate(name, query_of=panel))
            log.info("panel %.0f%% %-14s macro-F1 %.3f", 100 * share, name, reps[name]["macro_f1"])
        panel_results[f"{share:g}"] = reps

    two_levels = {}
    if y_broad is not None and splits:
        two_levels = _two_level_scores(
            pred, source, y, y_broad, splits, min_confidence, min_typicality
        )
    left: dict[str, dict[str, dict]] = {}
    call = dict(min_typicality=min_typicality, min_confidence=min_confidence, min_mixing=min_mixing)
    for sub in (leave_out or []) if splits else []:
        if sub not in set(y):
            raise CellvecError(f"--leave-out {sub!r} is not a {label_key} of {source.path}.")
        left[sub] = {
            name: _left_out_scores(pred, name, source, y, splits, sub, call, y_broad)
            for name in ["cellvec", "logreg_expr"]
        }

    swap: dict = {}
    if species_swap:
        swap = {"to": species_swap, "orthologs": table.source, "genes": {}}
        if splits:
            swap["genes"]["folds"], swap["folds"] = _species_swap_scores(
                pred, source, y, species_swap, table, mapping, peers, cross_validate
            )

    transfer = {}
    if query is not None:
        q = read_expression(
            query, layer=layer, use_raw=use_raw, gene_column=gene_column, transpose=transpose
        )
        qy = labels_of(q, query_label_key or label_key, label_map=label_map)
        for name in names:
            # another study: expression peers are trained on the genes both share, as a
            # careful user would (zero-filling the rest sank PCA + kNN to 0.28 on 68k -> 3k)
            transfer[name] = classification_metrics(
                qy, pred.predict(name, source, y, q, shared_genes=True)
            )
            log.info(
                "transfer %-18s accuracy %.3f  macro-F1 %.3f",
                name,
                transfer[name]["accuracy"],
                transfer[name]["macro_f1"],
            )
        if species_swap:
            q_as, q_kept = translate(q, mapping)
            swap["genes"]["transfer"] = (len(q_kept.var_names), len(q.var_names))
            swap["transfer"] = {}
            for name in names:
                translated = name not in EXPRESSION_BASELINES and name not in PEERS
                swap["transfer"][name] = classification_metrics(
                    qy,
                    pred.predict(
                        name,
                        source,
                        y,
                        q_as if translated else q_kept,
                        shared_genes=True,
                        orthologs=table if translated else None,
                    ),
                )
                log.info(
                    "transfer as %s %-12s macro-F1 %.3f",
                    species_swap,
                    name,
                    swap["transfer"][name]["macro_f1"],
                )
    return EvaluationResult(
        dataset=Path(str(data)).name if not hasattr(data, "obs") else "<AnnData>",
        label_key=label_key,
        folds=folds,
        representations=results,
        data_limited=curves,
        panels=panel_results,
        leave_out=left,
        transfer=transfer,
        broad=broad,
        two_levels=two_levels,
        broad_label_key=broad_label_key,
        species_swap=swap,
        recipe=recipe.to_dict(),
        seconds=time.perf_counter() - t0,
    )


def translate(source: ExpressionSource, mapping: dict[str, str]):
    """(`source` with its genes renamed through `mapping` (upper-cased symbol -> symbol;
    genes without one dropped, a repeated name kept once), the same kept genes under their
    own names)."""
    import pandas as pd

    names = pd.Series(source.var_names, dtype=str).str.upper().map(mapping)
    keep = (names.notna() & ~names.duplicated()).to_numpy()
    if not keep.any():
        raise CellvecError(
            f"{source.path}: none of its {len(keep):,} genes has a one-to-one ortholog in the "
            "table: --species-swap names the other species, and --orthologs a table of both."
        )
    kept = source.subset_genes(keep)
    return replace(kept, var_names=names[keep].tolist()), kept


def _ortholog_table(orthologs):
    """The `--species-swap` ortholog table (a table or its file), or an error naming one."""
    from cellvec.gene_store.orthologs import OrthologTable, read_orthologs

    if orthologs is None:
        raise CellvecError(
            "--species-swap needs an ortholog table: --orthologs hcop_mouse_to_human.csv.gz "
            "(HCOP/Ensembl, either direction) or a two-column file."
        )
    return orthologs if isinstance(orthologs, OrthologTable) else read_orthologs(orthologs)


def _species_swap_scores(pred, source, y, to, table, mapping, peers, cross_validate):
    """((genes kept, genes), metrics per representation) with each fold's query renamed to
    `to` symbols: cellvec maps it through the table, the expression peers see the kept
    genes (see `evaluate`)."""
    kept = len(translate(source, mapping)[1].var_names)
    log.info(
        "Species swap: %d of %d genes have a one-to-one %s ortholog",
        kept,
        len(source.var_names),
        to,
    )
    scores = {}
    for name in ["logreg_expr", "logreg_panel", *peers, "cellvec"]:
        translated = name == "cellvec"
        scores[name] = classification_metrics(
            y,
            cross_validate(
                name,
                query_of=lambda i, q, t=translated: translate(q, mapping)[0 if t else 1],
                orthologs=table if translated else None,
            ),
        )
        log.info("query as %s %-12s macro-F1 %.3f", to, name, scores[name]["macro_f1"])
    return (kept, len(source.var_names)), scores


def _as_broad(predicted: np.ndarray, y_ref: np.ndarray, y_broad_ref: np.ndarray) -> np.ndarray:
    """Predicted fine labels as broad ones: each fine class's most common broad label among
    the reference cells (`y_ref`, `y_broad_ref`); a label the reference lacks stays as is."""
    fine, f = np.unique(np.asarray(y_ref).astype(str), return_inverse=True)
    broad, b = np.unique(np.asarray(y_broad_ref).astype(str), return_inverse=True)
    parent = dict(zip(fine, broad[pair_counts(f, len(fine), b, len(broad)).argmax(1)]))
    labels, inverse = np.unique(predicted.astype(str), return_inverse=True)
    return np.array([parent.get(c, c) for c in labels], dtype=object)[inverse]


def _two_level_scores(pred, source, y, y_broad, splits, min_confidence, min_typicality) -> dict:
    """cellvec's fine and broad calls in the same folds, each fold's atlas built with a
    calibration split and both levels: each level's metrics with and without the
    unassigned call, and how many cells whose fine label is unassigned get a broad one."""
    n = len(y)
    out = {k: np.empty(n, dtype=object) for k in ("fine", "broad", "fine_free", "broad_free")}
    for tr, te in splits:
        ref, q = source.subset(mask(n, tr)), source.subset(mask(n, te))
        atlas = pred.fit(
            "cellvec", ref, y[tr], calibration_split=CALIBRATION_SPLIT, broad=y_broad[tr]
        )
        for suffix, conf, typ in (("", min_confidence, min_typicality), ("_free", 0.0, 0.0)):
            res = map_cells(q, atlas, k=pred.k, min_confidence=conf, min_typicality=typ)
            out["fine" + suffix][te] = res.labels
            out["broad" + suffix][te] = res.broad.labels
    result = {
        "min_confidence": min_confidence,
        "min_typicality": min_typicality,
        "calibration_split": CALIBRATION_SPLIT,
    }
    for lvl, truth in (("fine", y), ("broad", y_broad)):
        m = classification_metrics(truth, out[lvl])
        result[lvl] = {
            **{
                k: m[k]
                for k in ("accuracy", "macro_f1", "balanced_accuracy", "unassigned_fraction")
            },
            "macro_f1_without": classification_metrics(truth, out[lvl + "_free"])["macro_f1"],
            "per_class": m["per_class"],
        }
    lost = out["fine"] == UNASSIGNED
    given = lost & (out["broad"] != UNASSIGNED)
    result.update(
        fine_unassigned=int(lost.sum()),
        broad_given=int(given.sum()),
        broad_right=int((given & (out["broad"] == y_broad)).sum()),
    )
    return result


def _left_out_scores(pred, name, source, y, splits, sub, call: dict, y_broad=None) -> dict:
    """Leave subtype `sub` out of every fold's reference (built with a calibration split)
    and map the whole held-out fold with the unassigned call `call` (map_cells'
    `min_typicality`, `min_confidence` and `min_mixing`): the share of `sub`'s cells
    called unassigned or given another label, and the known subtypes' macro-F1 with and
    without the call.
    For cellvec, the share of `sub`'s cells each test refuses (`by_typicality`: typicality
    or confidence; `by_mixing`: the mixing test), which may overlap.
    With broad labels (`y_broad`), the share of `sub`'s cells given their right broad
    label (cellvec's broad call; an expression peer's label counts as its broad class)."""
    n = len(y)
    with_call = np.empty(n, dtype=object)
    without = np.empty(n, dtype=object)
    broad_call = np.empty(n, dtype=object)
    by_typicality, by_mixing = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    for tr, te in splits:
        tr = tr[y[tr] != sub]
        ref = source.subset(mask(n, tr))
        q = source.subset(mask(n, te))
        if name in EXPRESSION_BASELINES:
            without[te] = with_call[te] = pred.predict(name, ref, y[tr], q)
            if y_broad is not None:
                broad_call[te] = _as_broad(with_call[te], y[tr], y_broad[tr])
            continue
        broad = y_broad[tr] if y_broad is not None else None
        atlas = pred.fit(name, ref, y[tr], calibration_split=CALIBRATION_SPLIT, broad=broad)
        res = map_cells(q, atlas, k=pred.k, **call)
        with_call[te] = res.labels
        by_typicality[te] = (res.typicality < call["min_typicality"]) | (
            res.confidence < call["min_confidence"]
        )
        if res.mixing_applied:
            by_mixing[te] = res.mixing < call["min_mixing"]
        if res.broad is not None:
            broad_call[te] = res.broad.labels
        without[te] = pred.predict(name, ref, y[tr], q, atlas=atlas)
    novel = y == sub
    known = ~novel
    extra = {}
    if y_broad is not None:
        extra["broad_right"] = float((broad_call[novel] == y_broad[novel]).mean())
    if name not in EXPRESSION_BASELINES:
        extra.update(
            min_typicality=call["min_typicality"],
            min_mixing=call["min_mixing"],
            by_typicality=float(by_typicality[novel].mean()),
            by_mixing=float(by_mixing[novel].mean()),
        )
    return {
        **extra,
        "cells": int(novel.sum()),
        "unassigned": float((with_call[novel] == UNASSIGNED).mean()),
        "mislabelled": float((with_call[novel] != UNASSIGNED).mean()),
        "known_macro_f1": classification_metrics(y[known], with_call[known])["macro_f1"],
        "known_macro_f1_without": classification_metrics(y[known], without[known])["macro_f1"],
        "known_unassigned": float((with_call[known] == UNASSIGNED).mean()),
    }


def evaluate_atlas(
    store, name: str, *, reference=None, folds: int = 5, seed: int = 0, **read_options
) -> dict:
    """An atlas's own cross-validated scores, for its card (`cellvec atlas export
    --evaluate`): its reference (`reference`, default the file the atlas was built from)
    scored in `folds` stratified folds with the atlas's recipe and k, over the cells the
    atlas was built from (`reference_labels`: labelled, and none of the labels it excluded,
    `meta["excluded_labels"]`, which it never predicts). Returns `folds`, `accuracy`,
    `macro_f1`, `per_class_f1` and the `reference` scored."""
    atlas = Atlas.open(store, name)
    reference = reference or atlas.meta.get("source")
    if not reference or not Path(str(reference)).exists():
        raise CellvecError(
            f"Atlas {name!r}: its reference ({reference}) is not here to cross-validate; give "
            "it with --reference FILE."
        )
    source, _, _, _ = reference_labels(
        read_expression(reference, **read_options),
        atlas.meta["label_key"],
        broad_label_key=atlas.meta.get("broad_label_key"),
        exclude_labels=list(atlas.meta.get("excluded_labels") or {}),
    )
    r = atlas.recipe
    ev = evaluate(
        source,
        label_key=atlas.meta["label_key"],
        store=store,
        models=[r.model],
        top_genes=r.top_genes,
        weighting=r.weighting,
        background=r.background,
        center=r.center,
        refine=r.refine,
        adapt_genes=r.adapt_genes,
        folds=folds,
        k=atlas.k,
        seed=seed,
        representations=["cellvec"],
    )
    m = ev.representations["cellvec"]
    return {
        "folds": folds,
        "accuracy": round(float(m["accuracy"]), 4),
        "macro_f1": round(float(m["macro_f1"]), 4),
        "per_class_f1": {c: round(float(v["f1"]), 4) for c, v in m["per_class"].items()},
        "reference": str(reference),
    }
