"""What mapping returns: `MappingResult`, its exporters (AnnData, tables, the store), and
the checks callers run on an output before mapping."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cellvec._files import check_folder, replacing
from cellvec.cell_index.mixing import mixes
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.table import MAX_TABLE_NAME, is_table_name
from cellvec.errors import CellvecError
from cellvec.metrics import UNASSIGNED
from cellvec.storage import Store, replace_table


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
        """Write .h5ad (AnnData with results) or a table (.parquet, .csv, .tsv), whole or
        not at all."""
        path = check_output(path)
        with replacing(path) as tmp:  # never a half-written output
            self.write_as(tmp, path.suffix.lower())
        return path

    def write_as(self, path: Path, suffix: str) -> None:
        """Write at `path` in the format `suffix` names (`OUTPUT_SUFFIXES`), as it is:
        `write` and `map`'s outputs write a temporary so."""
        if suffix == ".h5ad":
            self.to_anndata().write_h5ad(path)
        else:
            write_table(self.to_polars(), path, suffix)

    def save(self, store: Store | str | Path, name: str) -> str:
        """Save as table `mapping_<name>` in the store (the SQL view of the same name)."""
        check_mapping_name(name)
        import polars as pl
        import pyarrow as pa

        tbl = (
            self.to_polars(scores=False).with_columns(pl.lit(self.atlas).alias("atlas")).to_arrow()
        )
        dim = self.vectors.shape[1]
        tbl = tbl.append_column(
            "vector", pa.FixedSizeListArray.from_arrays(pa.array(self.vectors.ravel()), dim)
        )
        db = Store.of(store).db
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


TABLE_SUFFIXES = (".parquet", ".csv", ".tsv")
OUTPUT_SUFFIXES = (".h5ad", *TABLE_SUFFIXES)


def check_output(path: str | Path, suffixes: tuple[str, ...] = OUTPUT_SUFFIXES) -> Path:
    """`path` as a place `MappingResult.write` (or `write_table`, `suffixes` then
    `TABLE_SUFFIXES`) can write, or an error saying what to change: its suffix names the
    format, and its folder exists or can be made. Callers check before the work, so a
    mistyped output costs none of it."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise CellvecError(
            f"{path}: unknown output format {path.suffix or '(no suffix)'!r}; name the output "
            f"for its format: {', '.join(suffixes)}."
        )
    return check_folder(path)


def write_table(frame, path: Path, suffix: str) -> None:
    """The polars `frame` at `path` in the format `suffix` names (`TABLE_SUFFIXES`)."""
    if suffix == ".parquet":
        frame.write_parquet(path)
    else:
        frame.write_csv(path, separator="\t" if suffix == ".tsv" else ",")


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
