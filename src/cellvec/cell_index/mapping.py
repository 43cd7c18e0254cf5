"""Map query cells onto an atlas: same recipe, k nearest reference cells, weighted vote."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.knn import vote
from cellvec.cell_index.labels import labels_of, parse_labels
from cellvec.cell_index.mixing import mixes, mixing_pvalues, unmixed
from cellvec.cell_index.readers import ExpressionSource, read_expression
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import apply_head
from cellvec.cell_index.table import MAX_TABLE_NAME, is_table_name
from cellvec.errors import CellvecError, InputFormatError
from cellvec.gene_store.orthologs import OrthologTable, read_orthologs
from cellvec.metrics import UNASSIGNED, classification_metrics

log = logging.getLogger(__name__)

FULL_COVERAGE = 0.999  # below this share of the reference's gene weight, compare over shared genes
LOW_COVERAGE = 0.5  # below this, warn: the labels rest on few of the genes that count


@dataclass
class BroadCall:
    """The broad-level labels of mapped cells (atlases with `--broad-label-key`): given
    wherever the fine label is (its own broad class), and where the fine label is
    unassigned but the broad vote clears the same thresholds."""

    key: str | None
    classes: np.ndarray
    labels: np.ndarray
    confidence: np.ndarray
    typicality: np.ndarray
    truth: np.ndarray | None = None
    metrics: dict | None = None


@dataclass
class MappingResult:
    """Labels, confidences and per-class scores of mapped cells, with exporters."""

    atlas: str
    cell_ids: list[str]
    labels: np.ndarray
    confidence: np.ndarray
    classes: np.ndarray
    scores: np.ndarray
    vectors: np.ndarray
    neighbour_similarity: np.ndarray
    recipe: dict
    k: int
    min_confidence: float
    typicality: np.ndarray | None = None
    min_typicality: float = 0.0
    mixing: np.ndarray | None = None  # the mixing test's p-value per cell (`min_mixing` > 0)
    min_mixing: float = 0.0
    gene_coverage: float = 1.0
    truth: np.ndarray | None = None
    metrics: dict | None = None
    seconds: float = 0.0
    orthologs: str | None = None  # the ortholog table the query genes went through, if any
    excluded_labels: list[str] = field(default_factory=list)  # never given as answers
    broad: BroadCall | None = None  # the second level, for atlases built with broad labels
    cluster_key: str | None = None  # the query's obs column summarised by `cluster_summary`
    clusters: np.ndarray | None = field(default=None, repr=False)  # its value per cell
    source: ExpressionSource | None = field(default=None, repr=False)
    ontology_ids: dict[str, str] | None = None  # label -> Cell Ontology id, from the atlas

    @property
    def mixing_applied(self) -> bool:
        """Whether the mixing test took part in the unassigned call: it ran, and the query
        mixed with the atlas (`mixing.mixes`)."""
        return self.mixing is not None and mixes(self.mixing, self.min_mixing)

    def to_polars(self, *, scores: bool = True):
        """One row per cell: cell_id, cellvec_label, cellvec_confidence, [truth], score_<class>..."""
        import polars as pl

        cols = {
            "cell_id": self.cell_ids,
            "cellvec_label": self.labels.astype(str).tolist(),
            "cellvec_confidence": self.confidence.astype(np.float64),
            "cellvec_typicality": (
                self.typicality if self.typicality is not None else np.ones(len(self.labels))
            ).astype(np.float64),
            "nearest_similarity": self.neighbour_similarity.astype(np.float64),
        }
        if self.mixing is not None:
            cols["cellvec_mixing"] = self.mixing.astype(np.float64)
        if self.truth is not None:
            cols["truth"] = self.truth.astype(str).tolist()
        if self.broad is not None:
            cols["cellvec_label_broad"] = self.broad.labels.astype(str).tolist()
            cols["cellvec_confidence_broad"] = self.broad.confidence.astype(np.float64)
            cols["cellvec_typicality_broad"] = self.broad.typicality.astype(np.float64)
            if self.broad.truth is not None:
                cols["truth_broad"] = self.broad.truth.astype(str).tolist()
        df = pl.DataFrame(cols)
        if scores:
            df = df.with_columns(
                [
                    pl.Series(f"score_{c}", self.scores[:, i].astype(np.float64))
                    for i, c in enumerate(self.classes)
                ]
            )
        return df

    def cluster_summary(self):
        """Per query cluster (`cluster_key`): cluster, n_cells, the majority label among
        the cells given one (`label`, or unassigned where none is), the share of the
        cluster's cells with it (`label_share`), `mean_confidence` and `unassigned_share`;
        with broad labels, `label_broad` and `label_broad_share` too. A polars DataFrame,
        None without a cluster key."""
        import polars as pl

        if self.clusters is None:
            return None
        df = pl.DataFrame(
            {
                "cluster": self.clusters.astype(str).tolist(),
                "label": self.labels.astype(str).tolist(),
                "confidence": self.confidence.astype(np.float64),
                "label_broad": (
                    self.broad.labels.astype(str).tolist()
                    if self.broad is not None
                    else [UNASSIGNED] * len(self.labels)
                ),
            }
        )

        def majority(col: str) -> pl.DataFrame:
            counts = (
                df.group_by("cluster", col)
                .len()
                .with_columns(given=pl.col(col) != UNASSIGNED)
                .sort(["cluster", "given", "len", col], descending=[False, True, True, False])
            )
            return counts.group_by("cluster", maintain_order=True).first().drop("given")

        out = (
            df.group_by("cluster")
            .agg(
                n_cells=pl.len(),
                mean_confidence=pl.col("confidence").mean(),
                unassigned_share=(pl.col("label") == UNASSIGNED).mean(),
            )
            .join(majority("label").rename({"len": "n_label"}), on="cluster")
            .with_columns(label_share=pl.col("n_label") / pl.col("n_cells"))
        )
        columns = ["cluster", "n_cells", "label", "label_share", "mean_confidence"]
        columns.append("unassigned_share")
        if self.broad is not None:
            out = out.join(
                majority("label_broad").rename({"len": "n_broad"}), on="cluster"
            ).with_columns(label_broad_share=pl.col("n_broad") / pl.col("n_cells"))
            columns += ["label_broad", "label_broad_share"]
        names = out["cluster"].to_list()
        numeric = all(x.lstrip("-").isdigit() for x in names)
        order = sorted(names, key=(lambda x: int(x)) if numeric else str)
        rank = {c: i for i, c in enumerate(order)}
        return (
            out.with_columns(pl.col("cluster").replace_strict(rank).alias("_rank"))
            .sort("_rank")
            .select(columns)
        )

    def to_anndata(self):
        """The query AnnData with obs['cellvec_label'], obs['cellvec_confidence'], obsm['X_cellvec']."""
        if self.source is None or self.source._adata is None:
            raise CellvecError(
                "This mapping has no query AnnData attached; use to_polars() instead."
            )
        import pandas as pd

        adata = self.source._adata
        if getattr(adata, "isbacked", False):
            adata = adata.to_memory()
        rows = self.source._rows
        adata = adata[rows].copy() if rows is not None else adata.copy()
        adata.obs["cellvec_label"] = self.labels.astype(str)
        adata.obs["cellvec_label"] = adata.obs["cellvec_label"].astype("category")
        adata.obs["cellvec_confidence"] = self.confidence.astype(np.float32)
        if self.typicality is not None:
            adata.obs["cellvec_typicality"] = self.typicality.astype(np.float32)
        if self.mixing is not None:
            adata.obs["cellvec_mixing"] = self.mixing.astype(np.float32)
        if self.broad is not None:
            adata.obs["cellvec_label_broad"] = pd.Categorical(self.broad.labels.astype(str))
            adata.obs["cellvec_confidence_broad"] = self.broad.confidence.astype(np.float32)
            adata.obs["cellvec_typicality_broad"] = self.broad.typicality.astype(np.float32)
        if self.ontology_ids:  # CELLxGENE's column; "unknown" where no id is known
            ids = [self.ontology_ids.get(x) or "unknown" for x in self.labels.astype(str)]
            adata.obs["cell_type_ontology_term_id"] = pd.Categorical(ids)
        adata.obsm["X_cellvec"] = self.vectors
        adata.obsm["cellvec_scores"] = self.scores.astype(np.float32)
        adata.uns["cellvec"] = {
            "atlas": self.atlas,
            "k": self.k,
            "min_confidence": self.min_confidence,
            "min_typicality": self.min_typicality,
            "min_mixing": self.min_mixing,
            "classes": self.classes.astype(str).tolist(),
            "recipe": {k: ("" if v is None else v) for k, v in self.recipe.items()},
        }
        if self.orthologs:
            adata.uns["cellvec"]["orthologs"] = self.orthologs
        if self.excluded_labels:
            adata.uns["cellvec"]["excluded_labels"] = list(self.excluded_labels)
        if self.broad is not None:
            adata.uns["cellvec"]["broad_classes"] = self.broad.classes.astype(str).tolist()
        if self.clusters is not None:
            adata.uns["cellvec"]["cluster_key"] = self.cluster_key
            table = self.cluster_summary().to_pandas()
            adata.uns["cellvec_clusters"] = table.set_index(table["cluster"].rename(None))
        return adata

    def write(self, path: str | Path) -> Path:
        """Write .h5ad (AnnData with results) or a table (.parquet, .csv, .tsv)."""
        path = check_output(path)
        suffix = path.suffix.lower()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        if suffix == ".h5ad":
            self.to_anndata().write_h5ad(tmp)
        elif suffix == ".parquet":
            self.to_polars().write_parquet(tmp)
        else:
            self.to_polars().write_csv(tmp, separator="," if suffix == ".csv" else "\t")
        tmp.replace(path)  # never a half-written output
        return path

    def save(self, store: str | Path, name: str) -> str:
        """Save as table `mapping_<name>` in the store (the SQL view of the same name)."""
        check_mapping_name(name)
        import polars as pl
        import pyarrow as pa

        from cellvec.gene_store.store import GeneStore, replace_table

        tbl = (
            self.to_polars(scores=False).with_columns(pl.lit(self.atlas).alias("atlas")).to_arrow()
        )
        dim = self.vectors.shape[1]
        tbl = tbl.append_column(
            "vector", pa.FixedSizeListArray.from_arrays(pa.array(self.vectors.ravel()), dim)
        )
        db = GeneStore(store).db
        replace_table(db, f"mapping_{name}", tbl)
        if self.clusters is not None:
            clusters = self.cluster_summary().with_columns(
                pl.lit(self.cluster_key).alias("cluster_key"), pl.lit(self.atlas).alias("atlas")
            )
            replace_table(db, f"mapping_{name}_clusters", clusters.to_arrow())
        return f"mapping_{name}"

    def summary(self) -> dict:
        out = {
            "atlas": self.atlas,
            "n_cells": len(self.cell_ids),
            "k": self.k,
            "gene_coverage": round(self.gene_coverage, 4),
            "seconds": round(self.seconds, 2),
            **_label_stats(self.labels),
        }
        if self.orthologs:
            out["orthologs"] = self.orthologs
        if self.mixing is not None:
            out["mixing"] = {
                "min_mixing": self.min_mixing,
                "below_fraction": float((self.mixing < self.min_mixing).mean()),
                "applied": self.mixing_applied,
            }
        if self.excluded_labels:
            out["excluded_labels"] = list(self.excluded_labels)
        if self.metrics:
            out.update(self.metrics)
        if self.clusters is not None:
            out["cluster_key"] = self.cluster_key
            out["clusters"] = self.cluster_summary().to_dicts()
        if self.broad is not None:
            b = self.broad
            out["broad"] = {
                "label_key": b.key,
                **_label_stats(b.labels),
                # cells the fine level left unassigned that still got a broad label
                "broad_only_fraction": float(
                    ((self.labels == UNASSIGNED) & (b.labels != UNASSIGNED)).mean()
                )
                if len(b.labels)
                else 0.0,
                **(b.metrics or {}),
            }
        return out


def _label_stats(labels: np.ndarray) -> dict:
    """`unassigned_fraction` and `label_counts` (label -> cells) of mapped labels."""
    names, counts = np.unique(labels.astype(str), return_counts=True)
    return {
        "unassigned_fraction": float((labels == UNASSIGNED).mean()) if len(labels) else 0.0,
        "label_counts": {str(c): int(n) for c, n in zip(names, counts)},
    }


OUTPUT_SUFFIXES = (".h5ad", ".parquet", ".csv", ".tsv")


def check_output(path: str | Path) -> Path:
    """`path` as a place `MappingResult.write` can write, or an error saying what to change:
    its suffix names the format, and its folder exists or can be made (`write` makes it).
    Callers check before mapping, so a mistyped output costs no mapping time."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise CellvecError(
            f"{path}: unknown output format {path.suffix or '(no suffix)'!r}; name the output "
            f"for its format: {', '.join(OUTPUT_SUFFIXES)}."
        )
    folder = path.parent
    while not folder.exists():  # ends at the current directory or the root
        folder = folder.parent
    if not folder.is_dir():
        raise CellvecError(
            f"{path}: {folder} is a file, so no folder can be made there; write the output "
            "into another folder."
        )
    return path


def check_mapping_name(name: str) -> str:
    """`name` as `MappingResult.save` takes it, or an error: it becomes the SQL view
    mapping_<name>. Callers check before mapping, so a bad name costs no mapping time."""
    if not is_table_name(name):
        raise CellvecError(
            f"Mapping name {name!r}: use letters, digits and underscores, up to "
            f"{MAX_TABLE_NAME} (it becomes the SQL view mapping_{name})."
        )
    return name


def ontology_ids(meta: dict) -> dict[str, str] | None:
    """label -> Cell Ontology id as `cellvec atlas ontology` stored them (None without)."""
    labels = (meta.get("ontology") or {}).get("labels") or {}
    return {k: v["id"] for k, v in labels.items() if v.get("id")} or None


def map_cells(
    query,
    atlas: Atlas | str,
    *,
    store: str | Path | None = None,
    k: int | None = None,
    min_confidence: float = 0.0,
    min_typicality: float = 0.0,
    min_mixing: float = 0.0,
    truth_key: str | None = None,
    label_map: dict[str, str] | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    recipe: Recipe | dict | None = None,
    orthologs: OrthologTable | str | Path | None = None,
    exclude_labels=(),
    broad_truth_key: str | None = None,
    cluster_key: str | None = None,
    ray: str | bool | None = None,
) -> MappingResult:
    """Label each query cell from its k nearest atlas cells (distance-weighted vote).

    A cell is `unassigned` when its vote's confidence is below `min_confidence` or its
    typicality below `min_typicality`: typicality is the share of the reference's own
    cells of the chosen subtype that are no closer to their subtype than the query
    cell is (a conformal p-value, calibrated on the reference alone). With
    `min_typicality=0.01`, about 1% of the cells of subtypes the atlas knows are
    expected to come back unassigned when query and reference are alike; cells of a
    subtype the atlas lacks mostly do. It needs an atlas built with a calibration
    split (cells refinement never saw); typicality is NaN without one.

    A cell is also `unassigned` when its mixing p-value is below `min_mixing` (0.01 is a
    good start): among its nearest cells in the query and the atlas pooled, far more
    are query cells than the atlas's own cells of its label see (`cell_index.mixing`).
    This catches a subtype the atlas lacks that sits inside a known class (a left-out
    NK among CD8 T), where typicality cannot. It judges the query as a whole, so map
    whole files with it; when most of the query fails (query and atlas do not mix, as
    across chemistries), it is not applied and a warning says so.

    `k` defaults to the atlas's own (15, or what `atlas build --tune` chose).
    `recipe` (optional) states the settings the caller expects; a mismatch with the
    atlas's recipe is refused. `label_map` renames truth labels (cross-study names).
    `orthologs` (a table or its file, see `gene_store.orthologs`) matches query genes
    of another species to the atlas's store genes; the atlas's recipe is applied as is.
    `ray` (True for a local cluster, or an address: see `cellvec._ray`): the query's
    vectors are computed by Ray workers, shard by shard (same vectors within 1e-6, same
    labels); the search and the vote run here.
    `exclude_labels` (e.g. ["Doublet", "Unknown"]) are never given: reference cells that
    carry one are skipped in the search (more neighbours are searched so that k others
    remain), not outvoted. An atlas built with broad labels gives each cell a broad label
    too (`result.broad`), scored against `broad_truth_key` if given. `cluster_key` names
    a query obs column (e.g. leiden) summarised per cluster (`result.cluster_summary()`).
    """
    t0 = time.perf_counter()
    if isinstance(atlas, str):
        if store is None:
            raise CellvecError("map_cells needs store= when the atlas is given by name.")
        atlas = Atlas.open(store, atlas)
    if recipe is not None:
        expected = (
            recipe
            if isinstance(recipe, Recipe)
            else Recipe.from_dict({**atlas.recipe.to_dict(), **recipe})
        )
        atlas.recipe.require_same(expected, atlas.name)
    k = atlas.k if k is None else k
    if min_typicality > 0:
        atlas.require_calibration()
    if k < 1:
        raise CellvecError(f"k must be at least 1, got {k}.")
    if orthologs is not None and not isinstance(orthologs, OrthologTable):
        orthologs = read_orthologs(orthologs)
    source = read_expression(query, layer=layer, use_raw=use_raw, gene_column=gene_column)
    truth = (
        labels_of(source, truth_key, label_map=label_map, option="--truth-key")
        if truth_key
        else None
    )
    clusters = cluster_values(source, cluster_key) if cluster_key else None
    if broad_truth_key and not atlas.has_broad:
        raise CellvecError(
            f"Atlas {atlas.name!r} has one level of labels; --broad-truth-key needs an atlas "
            "built with `cellvec atlas build ... --broad-label-key KEY`."
        )
    b_truth = (
        labels_of(source, broad_truth_key, option="--broad-truth-key") if broad_truth_key else None
    )
    encoder = atlas.encoder()
    basis = encoder.basis(source.var_names, source.path, orthologs=orthologs)
    # the atlas's own index; a disk atlas's vectors are never read whole
    index, coverage, calibration, panel = atlas.index(), 1.0, None, None
    n_atlas_genes = len(encoder.refinement.get("gene_rows", ()))
    if basis.positions is not None and len(basis.positions) < n_atlas_genes:
        coverage = atlas.coverage(basis.positions)
        if coverage < FULL_COVERAGE:
            # A panel: compare with the reference re-aggregated over the genes both have.
            _, index, calibration = atlas.vectors_over(basis.positions)
            panel = basis.positions
        (log.warning if coverage < LOW_COVERAGE else log.info)(
            "The query measures %s of the atlas's %s genes, carrying %.0f%% of the reference's "
            "top-gene weight%s",
            f"{len(basis.positions):,}",
            f"{n_atlas_genes:,}",
            100 * coverage,
            "; labels rest on few genes, check them"
            if coverage < LOW_COVERAGE
            else "; the reference is compared over the shared genes",
        )
    if ray:
        from cellvec.cell_index.parallel import encode_cells

        unrefined = encode_cells(source, encoder, basis, ray=ray, head=False)
    else:
        unrefined = encoder.unrefined(source, basis)
    q = apply_head(encoder.refinement, unrefined)
    if not min_mixing > 0:
        unrefined = None  # only the mixing test needs it: free it before the search
    excluded, allowed = excluded_cells(atlas, exclude_labels)
    idx, sim = search_allowed(index, q, k, allowed)
    classes, codes = atlas.label_codes()
    scores, labels, conf, typical = assign_labels(
        q,
        idx,
        sim,
        classes,
        codes,
        min_confidence,
        calibration=atlas.calibration() if calibration is None else calibration,
        min_typicality=min_typicality,
    )
    mixing = None
    if min_mixing > 0:
        reference, ref_codes = atlas.unrefined_sample(panel)
        mixing = mixing_pvalues(reference, ref_codes, unrefined, scores.argmax(1))
        failing = unmixed(mixing, min_mixing, atlas.name)
        if failing is not None:
            labels[failing] = UNASSIGNED
    unrefined = None
    metrics = truth_metrics(truth, labels, classes, atlas.name)
    broad = None
    if atlas.has_broad:
        broad_classes, broad_codes, parent = atlas.broad_codes()
        b_labels, b_conf, b_typical = assign_broad(
            q,
            idx,
            sim,
            labels,
            classes,
            broad_classes,
            broad_codes,
            parent,
            min_confidence,
            calibration=atlas.broad_calibration(panel),
            min_typicality=min_typicality,
        )
        broad = BroadCall(
            key=atlas.meta.get("broad_label_key"),
            classes=broad_classes,
            labels=b_labels,
            confidence=b_conf,
            typicality=b_typical,
            truth=b_truth,
            metrics=truth_metrics(b_truth, b_labels, broad_classes, atlas.name),
        )
    secs = time.perf_counter() - t0
    log.info(
        "Mapped %s cells onto %s in %.1f s (%.1f%% unassigned)",
        f"{len(labels):,}",
        atlas.name,
        secs,
        100 * float((labels == UNASSIGNED).mean()),
    )
    return MappingResult(
        atlas=atlas.name,
        cell_ids=source.obs_names,
        labels=labels,
        confidence=conf,
        classes=classes,
        scores=scores,
        vectors=q,
        neighbour_similarity=sim[:, 0],
        recipe=atlas.recipe.to_dict(),
        k=k,
        min_confidence=min_confidence,
        typicality=typical,
        min_typicality=min_typicality,
        mixing=mixing,
        min_mixing=min_mixing,
        gene_coverage=coverage,
        truth=truth,
        metrics=metrics,
        seconds=secs,
        orthologs=orthologs.source if orthologs is not None else None,
        excluded_labels=excluded,
        broad=broad,
        cluster_key=cluster_key,
        clusters=clusters,
        source=source,
        ontology_ids=ontology_ids(atlas.meta),
    )


def cluster_values(source: ExpressionSource, key: str) -> np.ndarray:
    """The query's `key` obs column as strings (missing values as "nan"), or an error
    naming the columns there are."""
    if key not in source.obs.columns:
        raise InputFormatError(
            f"{source.path}: no obs column {key!r} to summarise by; obs columns are: "
            f"{', '.join(map(str, source.obs.columns)) or 'none'}. Name one with --cluster-key."
        )
    return source.obs[key].astype(str).to_numpy(dtype=object)


def excluded_cells(atlas: Atlas, exclude_labels) -> tuple[list[str], np.ndarray | None]:
    """(the excluded labels the atlas has, a mask of the reference cells that may answer, or
    None when every cell may). Labels the atlas lacks are named in a log line, not refused:
    a blocklist such as "Doublet,Unknown" is meant to be reused across atlases."""
    wanted = parse_labels(exclude_labels)
    if not wanted:
        return [], None
    # by class codes, never per cell by name (a disk atlas keeps only the codes)
    levels = [atlas.label_codes()] + ([atlas.broad_codes()[:2]] if atlas.has_broad else [])
    names = {str(c) for classes, _ in levels for c in classes}
    present = [x for x in wanted if x in names]
    absent = [x for x in wanted if x not in names]
    if absent:
        log.info("Excluded label(s) not in atlas %s: %s", atlas.name, ", ".join(absent))
    blocked = np.zeros(atlas.n_cells, dtype=bool)
    for classes, codes in levels:
        blocked |= np.isin(classes.astype(str), present)[codes]
    if blocked.all():
        raise CellvecError(
            f"--exclude-labels {','.join(wanted)} excludes every class of atlas {atlas.name!r}; "
            "leave at least one class to answer with."
        )
    if present:
        log.info(
            "Skipping %s reference cells labelled %s",
            f"{int(blocked.sum()):,}",
            ", ".join(present),
        )
    return present, (~blocked if blocked.any() else None)


def search_allowed(index, q: np.ndarray, k: int, allowed: np.ndarray | None):
    """(indices, similarities) of each query's k nearest reference cells among the `allowed`
    ones (all when None), best first; -1 / -inf pad rows with fewer than k allowed cells.

    Skipped cells are searched past: the search goes deeper (x4 a round) for the rows that
    have not yet found k allowed neighbours, up to the whole reference."""
    if allowed is None:
        return index.search(q, k)
    n_ref, n_ok = len(allowed), int(allowed.sum())
    want = min(k, n_ok)
    out_idx = np.full((len(q), k), -1, dtype=np.int64)
    out_sim = np.full((len(q), k), -np.inf, dtype=np.float32)
    todo = np.arange(len(q))
    depth = min(n_ref, k + int(np.ceil(k * n_ref / max(n_ok, 1))))
    while len(todo):
        idx, sim = index.search(q[todo], depth)
        ok = (idx >= 0) & allowed[np.maximum(idx, 0)]
        done = (ok.sum(1) >= want) | (depth >= n_ref)
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # allowed first, in rank order
        width = order.shape[1]
        keep = np.take_along_axis(ok, order, 1)
        rows = todo[done]
        out_idx[rows, :width] = np.where(keep, np.take_along_axis(idx, order, 1), -1)[done]
        out_sim[rows, :width] = np.where(keep, np.take_along_axis(sim, order, 1), -np.inf)[done]
        todo = todo[~done]
        depth = min(n_ref, depth * 4)
    return out_idx, out_sim


def truth_metrics(truth, labels, classes, atlas: str) -> dict | None:
    """Metrics against known labels (None without), warning about labels the atlas lacks."""
    if truth is None:
        return None
    missing = sorted(set(truth) - set(classes))
    if missing:
        log.warning(
            "Query labels not in atlas %s (they cannot be right): %s",
            atlas,
            ", ".join(missing[:10]),
        )
    return classification_metrics(truth, labels)


def typicality(
    idx: np.ndarray,
    sim: np.ndarray,
    ref_codes: np.ndarray,
    chosen: np.ndarray,
    calibration: np.ndarray,
    *,
    shrink: float = 5.0,
) -> np.ndarray:
    """Per query cell, a conformal p-value of how typical it is of its chosen class.

    A cell's score is its similarity to its nearest neighbour of the chosen class,
    standardised by that class's calibration values (finite `calibration`: reference
    cells' similarity to their nearest same-class cell), the class spread shrunk
    towards the pooled one with `shrink` pseudo-cells so that small classes are not
    over-trusted. The p-value ranks it among all calibration cells' standardised
    scores, pooled over classes: (count at or below + 1) / (n + 1). Pooling keeps the
    resolution fine (a per-class rank could not go below 1 / (class size + 1), so a
    0.01 threshold never fired for classes under 99 cells)."""
    finite = np.isfinite(calibration)
    n_classes = int(max(ref_codes.max(initial=0), chosen.max(initial=0))) + 1
    cal_codes, cal = ref_codes[finite], calibration[finite].astype(np.float64)
    count = np.bincount(cal_codes, minlength=n_classes).astype(np.float64)
    mean = np.bincount(cal_codes, weights=cal, minlength=n_classes) / np.maximum(count, 1)
    sq = np.bincount(cal_codes, weights=(cal - mean[cal_codes]) ** 2, minlength=n_classes)
    pooled = sq.sum() / max(count.sum() - 1, 1)
    spread = np.sqrt((sq + shrink * pooled) / (count + shrink)) + 1e-6
    if not len(cal):
        return np.full(len(chosen), np.nan)  # no calibration cells: typicality is unknown
    pool = np.sort((cal - mean[cal_codes]) / spread[cal_codes])
    same = (idx >= 0) & (ref_codes[np.maximum(idx, 0)] == chosen[:, None])
    score = np.where(same, sim, -np.inf).max(axis=1)
    z = (score - mean[chosen]) / spread[chosen]
    z[count[chosen] == 0] = -np.inf  # a class without calibration cells: nothing to vouch for it
    from scipy.special import ndtr

    # the rank, smoothed by the normal tail of z: continuous below the lowest calibration
    # score, so a threshold finer than 1 / (n + 1) still means something with few cells
    return (np.searchsorted(pool, z, side="right") + ndtr(z)) / (len(pool) + 1)


def assign_labels(
    q: np.ndarray,
    idx: np.ndarray,
    sim: np.ndarray,
    classes: np.ndarray,
    codes: np.ndarray,
    min_confidence: float,
    *,
    calibration: np.ndarray | None = None,
    min_typicality: float = 0.0,
    inherited: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(per-class scores, labels, confidences, typicalities) of query vectors `q` from their
    neighbours; typicality is 1 where no `calibration` is given. `inherited` (a class index
    per cell, -1 for none) is taken instead of the vote's winner and never made unassigned."""
    scores = vote(idx, sim, codes, len(classes))
    best = scores.argmax(1)
    inherit = np.zeros(len(best), dtype=bool)
    if inherited is not None:
        inherit = inherited >= 0
        best = np.where(inherit, inherited, best)
    conf = scores[np.arange(len(best)), best]
    labels = classes[best].astype(object)
    typical = (
        typicality(idx, sim, codes, best, calibration)
        if calibration is not None
        else np.ones(len(best))
    )
    # cells with no matched expression (only possible for backed files), or no neighbour left
    empty = ~q.any(axis=1) | ~(idx >= 0).any(axis=1)
    conf[empty] = 0.0
    typical[empty] = 0.0
    refused = (conf < min_confidence) | (typical < min_typicality) | empty
    labels[refused & ~inherit] = UNASSIGNED
    return scores, labels, conf, typical


def assign_broad(
    q: np.ndarray,
    idx: np.ndarray,
    sim: np.ndarray,
    fine_labels: np.ndarray,
    fine_classes: np.ndarray,
    broad_classes: np.ndarray,
    broad_codes: np.ndarray,
    parent: np.ndarray,
    min_confidence: float,
    *,
    calibration: np.ndarray | None = None,
    min_typicality: float = 0.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(broad labels, confidences, typicalities) from the same neighbours as the fine call.

    Where the fine label was given and belongs to one broad class (`parent`, per fine
    class), the broad label is that class, so the two levels never disagree; its
    confidence is the broad vote's share for it (at least the fine label's). Elsewhere
    it is the broad vote's winner, unassigned below the same `min_confidence` and
    `min_typicality` (calibrated on the broad classes): a cell whose subtype is unclear
    or missing from the atlas still gets "T" when its neighbours agree on T."""
    fine_code = np.searchsorted(fine_classes.astype(str), fine_labels.astype(str))
    fine_code = np.clip(fine_code, 0, len(fine_classes) - 1)
    inherited = np.where(fine_labels != UNASSIGNED, parent[fine_code], -1)
    _, labels, conf, typical = assign_labels(
        q,
        idx,
        sim,
        broad_classes,
        broad_codes,
        min_confidence,
        calibration=calibration,
        min_typicality=min_typicality,
        inherited=inherited,
    )
    return labels, conf, typical


def read_label_map(path: str | Path) -> dict[str, str]:
    """A label-harmonisation map: JSON {from: to} or a two-column CSV/TSV."""
    import json

    path = Path(path)
    if path.suffix.lower() == ".json":
        return {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
    import csv

    sep = "," if path.suffix.lower() == ".csv" else "\t"
    with open(path, newline="") as fh:
        rows = [r for r in csv.reader(fh, delimiter=sep) if r]
    if any(len(r) < 2 for r in rows):
        raise InputFormatError(f"{path}: a label map needs two columns (query label, atlas label).")
    return {r[0]: r[1] for r in rows}
