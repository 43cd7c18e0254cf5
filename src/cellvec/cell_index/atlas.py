"""Reference atlases: labelled cell vectors in a LanceDB table, with their recipe.

Table `atlas_<name>` in the gene store: cell_id, label, batch, dataset, vector,
and each cell's top genes and weights (`top_genes`, places in the atlas's gene
list, and `top_weights`), so that the reference can be re-aggregated over the
genes a query measures. Its metadata holds the recipe (model, gene-table hash,
top-N, weighting, background and refinement hashes, ...), the label key and
class counts. The table is
written in one commit (a reader sees the old atlas or the new one, never half).

Nearest-neighbour search runs on the atlas vectors in memory: exact below
200,000 cells, a faiss IVF index above (built in ~3 s per 1M cells when the
atlas is loaded). Measured here, per-query LanceDB search takes 4-12 ms whatever
its index, the in-memory index ~0.2 ms, so an atlas that fits in memory gets no
Lance vector index. One that does not (`index="disk"`, or "auto" above the memory
budget of `disk_index.py`) is searched through a Lance IVF_PQ index on its table
instead, and opening it reads only its label codes and typicality calibration; the
metadata's `index` records which (`{"kind": "memory"}` or `{"kind": "disk", ...}`).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from cellvec._arrow import fixed_size_rows, string_values
from cellvec.cell_index.artifacts import array_hash, load_artifact, save_artifact
from cellvec.cell_index.background import apply_background, fit_background
from cellvec.cell_index.encoder import CellEncoder
from cellvec.cell_index.readers import ExpressionSource, read_expression
from cellvec.cell_index.recipe import RECIPE_VERSION, Recipe
from cellvec.cell_index.refine import (
    RefineOptions,
    adapted_basis,
    apply_head,
    encode_weights,
    fit_refinement,
)
from cellvec.cell_index.vectors import (
    GeneBasis,
    fold_duplicates,
    match_dataset_genes,
    weighted_mean,
    weights_matrix,
)
from cellvec.errors import CellvecError, InputFormatError, StoreError
from cellvec.fetch import resolve_atlas
from cellvec.gene_store.store import META_KEY, GeneStore, read_meta, replace_table
from cellvec.storage import StoreLocation, store_location

log = logging.getLogger(__name__)

ATLAS_PREFIX = "atlas_"


def _label_column(source: ExpressionSource, label_key: str, option: str = "--label-key"):
    """The obs column `label_key`, or an error naming the columns there are and `option`,
    the command-line option that named it."""
    if label_key not in source.obs.columns:
        raise InputFormatError(
            f"{source.path}: no cell annotation {label_key!r}; obs columns are: "
            f"{', '.join(map(str, source.obs.columns)) or 'none'}. Name one with {option}."
        )
    return source.obs[label_key]


def labels_of(
    source: ExpressionSource,
    label_key: str,
    *,
    label_map: dict[str, str] | None = None,
    option: str = "--label-key",
) -> np.ndarray:
    """The cells' labels as strings, renamed through `label_map` (cross-study names) if given;
    `option` is the command-line option named in the error for a missing column."""
    labels = _label_column(source, label_key, option).astype(str)
    if label_map:
        labels = labels.replace(label_map)
    return labels.to_numpy(dtype=object)


def _broad_labels(source: ExpressionSource, labels: np.ndarray, key: str) -> np.ndarray:
    """The cells' broad labels; a cell without one takes its fine label. Logs a fine label
    that falls under several broad ones (its cells then get the broad vote's label)."""
    broad = _label_column(source, key, "--broad-label-key").astype(str).to_numpy(dtype=object)
    missing = ~known_labels(source, key, "--broad-label-key")
    broad[missing] = labels[missing]
    if missing.any():
        log.warning(
            "%s: %d cells without a %s label are their own broad class",
            source.path,
            int(missing.sum()),
            key,
        )
    fine_classes, fine = np.unique(labels.astype(str), return_inverse=True)
    broad_classes, codes = np.unique(broad.astype(str), return_inverse=True)
    for c in np.flatnonzero(_parents(fine, len(fine_classes), codes, len(broad_classes)) < 0):
        found = broad_classes[np.unique(codes[fine == c])]
        log.warning(
            "Label %r falls under several %s: %s", str(fine_classes[c]), key, ", ".join(found[:5])
        )
    return broad


def pair_counts(fine: np.ndarray, n_fine: int, broad: np.ndarray, n_broad: int) -> np.ndarray:
    """Cells per (fine class, broad class), from each cell's fine and broad class index."""
    flat = fine.astype(np.int64) * n_broad + broad
    return np.bincount(flat, minlength=n_fine * n_broad).reshape(n_fine, n_broad)


def _parents(fine: np.ndarray, n_fine: int, broad: np.ndarray, n_broad: int) -> np.ndarray:
    """Each fine class's broad class index (from each cell's fine and broad class index),
    -1 where its cells carry several broad classes (or none)."""
    found = pair_counts(fine, n_fine, broad, n_broad) > 0
    return np.where(found.sum(1) == 1, found.argmax(1), -1)


def known_labels(
    source: ExpressionSource, label_key: str, option: str = "--label-key"
) -> np.ndarray:
    """True for cells that carry a (non-empty) label."""
    col = _label_column(source, label_key, option)
    return (col.notna() & (col.astype(str).str.len() > 0)).to_numpy()


def parse_labels(labels) -> list[str]:
    """Labels given as "A,B" or a list, stripped, empty ones dropped, order kept."""
    if labels is None:
        return []
    items = labels.split(",") if isinstance(labels, str) else labels
    return list(dict.fromkeys(str(x).strip() for x in items if str(x).strip()))


def reference_labels(
    source: ExpressionSource,
    label_key: str,
    *,
    broad_label_key: str | None = None,
    exclude_labels=(),
) -> tuple[ExpressionSource, np.ndarray, np.ndarray | None, dict[str, int]]:
    """The cells an atlas is built from, with their labels: cells without a label are left
    out (a logged count), then those carrying one of `exclude_labels` (fine or broad).

    Returns (the kept cells, their labels, their broad labels or None, {excluded label:
    cells}). A reference left with fewer than two classes is refused: an atlas of one class
    would call every query cell that class."""
    known = known_labels(source, label_key)
    if not known.any():
        raise InputFormatError(
            f"{source.path}: none of its {source.n_obs:,} cells has a {label_key!r} label (the "
            "column is empty or all missing); name the obs column that holds the cell types "
            f"with --label-key (obs columns: {', '.join(map(str, source.obs.columns))})."
        )
    if not known.all():
        log.warning(
            "%s: %d cells without a %s label excluded", source.path, int((~known).sum()), label_key
        )
        source = source.subset(known)
    labels = labels_of(source, label_key)
    broad = _broad_labels(source, labels, broad_label_key) if broad_label_key else None
    excluded, drop = {}, np.zeros(len(labels), dtype=bool)
    for x in parse_labels(exclude_labels):
        hit = (labels == x) | ((broad == x) if broad is not None else False)
        excluded[x] = int(hit.sum())
        drop |= hit
    if excluded:
        if drop.all():
            raise CellvecError(
                f"--exclude-labels {','.join(excluded)} drops every cell of {source.path}."
            )
        log.info(
            "Excluded from the reference: %s",
            ", ".join(f"{x} ({n:,} cells)" for x, n in excluded.items()),
        )
        source = source.subset(~drop)
        labels = labels[~drop]
        broad = broad[~drop] if broad is not None else None
    classes = np.unique(labels)
    if len(classes) < 2:
        after = f" after --exclude-labels {','.join(excluded)}" if excluded else ""
        raise InputFormatError(
            f"{source.path}: all {len(labels):,} labelled cells{after} are {str(classes[0])!r} "
            f"in {label_key!r}, and an atlas of one class would call every query cell "
            f"{str(classes[0])!r}; it needs at least two. Name an obs column with several cell "
            "types with --label-key, "
            + (
                "add reference cells of other types, or exclude fewer labels."
                if excluded
                else "or add reference cells of other types."
            )
        )
    return source, labels, broad, excluded


@dataclass
class FittedReference:
    """What fitting a recipe on a reference gives: the encoder, the reference's vectors and
    top-gene weights (cells x the reference's genes, for re-aggregation over a query's
    genes) and the refinement report."""

    encoder: CellEncoder
    vectors: np.ndarray | None  # None when Ray workers compute them (fit_encoder(ray=...))
    weights: sp.csr_matrix
    report: dict
    held_out: np.ndarray | None = None  # cells kept out of refinement, for calibration
    blocks: list | None = None  # the Ray workers' weight blocks (Arrow), when ray was given

    @property
    def dimension(self) -> int:
        """The length of the atlas's vectors: the head's output, else the gene vectors'."""
        head = self.encoder.refinement.get("w2")
        return int(head.shape[1]) if head is not None else self.encoder.genes.dimension

    def basis(self) -> np.ndarray:
        """The reference genes' vectors after the background transform (before the adapter)."""
        enc = self.encoder
        return apply_background(enc.genes.vectors[enc.refinement["gene_rows"]], enc.background)


def fit_encoder(
    source: ExpressionSource,
    labels: np.ndarray | None,
    genes,
    recipe: Recipe,
    *,
    store: str | Path | None = None,
    seed: int = 0,
    refine_options: dict | None = None,
    calibration_split: float = 0.0,
    ray: str | bool | None = None,
) -> FittedReference:
    """Fit background, centre, gene adapter and head on a reference (nothing else sees it).

    `calibration_split`: a stratified share of each class's cells (classes of 5 cells
    or more) is kept out of refinement; they stay in the atlas and calibrate typicality.
    `ray` (an address, see `cellvec._ray`): the top genes of each cell are computed by
    Ray workers, and the reference's vectors are left to them too (`vectors` is None,
    `blocks` holds the workers' weight blocks for `parallel.write_atlas`)."""
    cols, rows, fold = fold_duplicates(
        *match_dataset_genes(source.var_names, genes, source.path), source.path
    )
    bg = fit_background(genes.vectors[rows], recipe.background)
    vecs = apply_background(genes.vectors[rows], bg)
    basis = GeneBasis(cols, rows, vecs, len(source.var_names), fold=fold)
    blocks = None
    if ray:
        from cellvec.cell_index.parallel import top_gene_weights

        w, blocks = top_gene_weights(source, basis, recipe, ray=ray)
    else:
        w = sp.csr_matrix(weights_matrix(source, basis, recipe)[:, cols])
    held = calibration_cells(labels, calibration_split, seed) if calibration_split else None
    train = slice(None) if held is None else ~held
    params, report = fit_refinement(
        w[train],
        vecs,
        None if recipe.refine != "supcon" else np.asarray(labels)[train],
        recipe=recipe,
        options=RefineOptions(**(refine_options or {})),
        seed=seed,
    )
    refinement = {"gene_rows": rows.astype(np.int64), **params}
    recipe = Recipe.from_dict(
        {
            **recipe.to_dict(),
            "model": genes.model,
            "dimension": genes.dimension,
            "gene_table_hash": genes.meta.get("content_hash"),
            "background_hash": _hash_or_save(store, bg),
            "head_hash": _hash_or_save(store, refinement),
        }
    )
    encoder = CellEncoder(recipe, genes, bg, refinement)
    if held is not None:
        report = {**report, "calibration_cells": int(held.sum())}
    vectors = None if ray else encode_weights(w, vecs, params)
    return FittedReference(encoder, vectors, w, report, held, blocks)


def calibration_cells(labels, share: float, seed: int = 0) -> np.ndarray:
    """A stratified `share` of each class with 5 or more cells (at least one cell each)."""
    labels = np.asarray(labels).astype(str)
    rng = np.random.default_rng([seed, 7])
    out = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) >= 5:
            out[rng.choice(idx, max(1, int(round(share * len(idx)))), replace=False)] = True
    return out


def atlas_schema(dim: int, meta: dict, *, broad: bool = False) -> pa.Schema:
    """The atlas table's columns, with the atlas's metadata (recipe, classes, ...);
    `broad`: with the column of broad labels (`--broad-label-key`)."""
    return pa.schema(
        [
            pa.field("cell_id", pa.string()),
            pa.field("label", pa.string()),
            pa.field("batch", pa.string()),
            pa.field("dataset", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
            # each cell's top genes (places in the atlas's gene list) and their weights
            pa.field("top_genes", pa.large_list(pa.int32())),
            pa.field("top_weights", pa.large_list(pa.float32())),
            # typicality calibration: similarity to the nearest same-class cell (a sample)
            pa.field("self_similarity", pa.float32()),
        ]
        + ([pa.field("label_broad", pa.string())] if broad else []),
        metadata={META_KEY: json.dumps(meta).encode()},
    )


def weight_lists(w: sp.csr_matrix) -> tuple[pa.Array, pa.Array]:
    """Top-gene weights as the atlas's `top_genes` and `top_weights` list columns."""
    offsets = pa.array(w.indptr.astype(np.int64))
    return (
        pa.LargeListArray.from_arrays(offsets, pa.array(w.indices.astype(np.int32))),
        pa.LargeListArray.from_arrays(offsets, pa.array(w.data.astype(np.float32))),
    )


def weight_matrix(table: pa.Table, n_genes: int) -> sp.csr_matrix:
    """The `top_genes` / `top_weights` columns of (some of) the atlas's rows as a CSR
    matrix (rows x the atlas's genes): the inverse of `weight_lists`."""
    genes = table.column("top_genes").combine_chunks()
    weights = table.column("top_weights").combine_chunks()
    offsets = genes.offsets.to_numpy().astype(np.int64)  # a slice's own, from offsets[0]
    return sp.csr_matrix(
        (
            # copies: scipy sorts indices in place, and Arrow's zero-copy arrays are read-only
            weights.flatten().to_numpy().astype(np.float32),
            genes.flatten().to_numpy().astype(np.int32),
            offsets - offsets[0],
        ),
        shape=(len(table), n_genes),
    )


def atlas_table(
    schema: pa.Schema,
    *,
    cell_ids,
    labels,
    batches,
    dataset: str,
    vectors: np.ndarray,
    top_genes: pa.Array,
    top_weights: pa.Array,
    calibration,
    broad_labels=None,
) -> pa.Table:
    """Rows of the atlas table (all of them, or a Ray worker's share)."""

    def strings(x):
        return x if isinstance(x, pa.Array) else pa.array([str(v) for v in x], pa.string())

    n, dim = vectors.shape
    return pa.Table.from_arrays(
        [
            strings(cell_ids),
            strings(labels),
            strings(batches),
            pa.array([dataset] * n, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
            top_genes,
            top_weights,
            calibration
            if isinstance(calibration, pa.Array)
            else pa.array(calibration, pa.float32()),
        ]
        + ([strings(broad_labels)] if broad_labels is not None else []),
        schema=schema,
    )


def _hash_or_save(store, arrays: dict) -> str | None:
    if not arrays:
        return None
    return save_artifact(store, arrays) if store is not None else array_hash(arrays)


CALIBRATION_PER_CLASS = 200
DEFAULT_K = 15


def self_similarity(
    vectors: np.ndarray,
    codes: np.ndarray,
    index,
    held_out: np.ndarray,
    *,
    per_class: int = CALIBRATION_PER_CLASS,
) -> np.ndarray:
    """For up to `per_class` held-out cells of each class (cells refinement never trained
    on), the similarity to the nearest other reference cell of the same class; NaN for
    every other cell.

    These are the calibration values of the typicality a query cell gets. They must come
    from held-out cells: refinement pulls the cells it trains on much closer together
    than any new cell (measured on amacrine: calibrated on training cells, 67% of the
    cells of known subtypes came back unassigned at 0.01)."""
    rng = np.random.default_rng(0)
    out = np.full(len(vectors), np.nan, dtype=np.float32)
    pick = [
        rng.permutation(np.flatnonzero(held_out & (codes == c)))[:per_class]
        for c in np.unique(codes)
    ]
    sample = np.sort(np.concatenate(pick)) if pick else np.zeros(0, dtype=np.int64)
    if len(vectors) < 2 or len(sample) == 0:
        return out
    idx, sim = index.search(vectors[sample], min(len(vectors), 50))
    same = (
        (idx != sample[:, None])
        & (idx >= 0)
        & (codes[np.maximum(idx, 0)] == codes[sample][:, None])
    )
    first = same.argmax(1)
    out[sample] = np.where(same.any(1), sim[np.arange(len(sample)), first], sim[:, -1])
    return out


class _StoredVectors:
    """A disk atlas's vectors as `self_similarity` reads them: its length, and the rows of
    a sample (read from the table), never the whole column."""

    def __init__(self, atlas: Atlas):
        self.atlas = atlas

    def __len__(self) -> int:
        return self.atlas.n_cells

    def __getitem__(self, rows) -> np.ndarray:
        return fixed_size_rows(self.atlas._dataset().take(np.asarray(rows), columns=["vector"])[0])


@dataclass
class Atlas:
    """An atlas opened from the store, ready for KNN: vectors in memory, or, for a disk
    atlas (`on_disk`), only label codes and calibration, the rest read when asked for."""

    name: str
    store: StoreLocation | str  # "" for an atlas held in memory only (`from_fit`)
    meta: dict
    _cell_ids: np.ndarray | None = field(default=None, repr=False)
    _labels: np.ndarray | None = field(default=None, repr=False)
    _batches: np.ndarray | None = field(default=None, repr=False)
    _vectors: np.ndarray | None = field(default=None, repr=False)
    version: int = 0
    _broad_labels: np.ndarray | None = field(default=None, repr=False)  # see broad_labels
    _index: object = field(default=None, repr=False)
    _encoder: CellEncoder | None = field(default=None, repr=False)
    _codes: tuple | None = field(default=None, repr=False)
    _weights: sp.csr_matrix | None = field(default=None, repr=False)
    _panels: dict = field(default_factory=dict, repr=False)
    _calibration: np.ndarray | None = field(default=None, repr=False)
    _held_out: np.ndarray | None = field(default=None, repr=False)
    _broad_codes: tuple | None = field(default=None, repr=False)
    _broad: dict = field(default_factory=dict, repr=False)  # broad calibration by panel key
    _ds: object = field(default=None, repr=False)  # the table at `version` (`_dataset()`)

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_dict(self.meta["recipe"])

    @property
    def on_disk(self) -> bool:
        """Searched through the Lance index of its table, never loaded whole."""
        return (self.meta.get("index") or {}).get("kind") == "disk"

    @property
    def n_cells(self) -> int:
        return len(self._vectors) if self._vectors is not None else len(self.label_codes()[1])

    @property
    def dimension(self) -> int:
        """The cell vectors' dimension (the head's output, not the gene vectors')."""
        if self._vectors is not None:
            return self._vectors.shape[1]
        return self._dataset().schema.field("vector").type.list_size

    @property
    def vectors(self) -> np.ndarray:
        """The reference cells' vectors (cells x dim). A disk atlas reads them all on the
        first call: mapping never does, only whole-atlas views (report, explain)."""
        if self._vectors is None:
            self._vectors = fixed_size_rows(self._read_column("vector"))
        return self._vectors

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            classes, codes = self.label_codes()
            self._labels = classes.astype(object)[codes]
        return self._labels

    @property
    def has_broad(self) -> bool:
        """Whether the atlas has a second, coarser level of labels (`--broad-label-key`)."""
        return self._broad_labels is not None or self._broad_codes is not None

    @property
    def broad_labels(self) -> np.ndarray | None:
        """Each reference cell's broad label (None without a second level). A disk atlas
        keeps only the codes and builds this on the first call, as it does `labels`."""
        if self._broad_labels is None and self._broad_codes is not None:
            classes, codes, _ = self._broad_codes
            self._broad_labels = classes.astype(object)[codes]
        return self._broad_labels

    @property
    def cell_ids(self) -> np.ndarray:
        if self._cell_ids is None:
            self._cell_ids = string_values(self._read_column("cell_id"))
        return self._cell_ids

    @property
    def batches(self) -> np.ndarray:
        if self._batches is None:
            self._batches = string_values(self._read_column("batch"))
        return self._batches

    def _dataset(self):
        """The atlas table (a `lance.LanceDataset`) at the version this atlas was opened at:
        what is read later (vectors, top genes, the disk index) belongs to the
        same rows as the labels read on opening, even after the atlas is rebuilt."""
        if self._ds is None:  # Atlas.from_fit: never written
            raise CellvecError(
                f"Atlas {self.name!r} is held in memory only (Atlas.from_fit) and has no table; "
                "open a stored atlas with Atlas.open to read one."
            )
        return self._ds

    def _read_column(self, name: str):
        if self.on_disk:
            log.info(
                "Reading column %s of disk atlas %s (%s cells) into memory",
                name,
                self.name,
                f"{self.n_cells:,}",
            )
        return self._dataset().to_table(columns=[name]).column(name)

    @property
    def k(self) -> int:
        """Neighbours in the vote: chosen by `atlas build --tune`, else 15."""
        return _k_of(self.meta)

    @property
    def classes(self) -> np.ndarray:
        return self.label_codes()[0]

    def label_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted class names, each cell's class index), computed once per loaded atlas."""
        if self._codes is None:
            self._codes = np.unique(self.labels.astype(str), return_inverse=True)
        return self._codes

    def broad_codes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sorted broad class names, each cell's broad class index, each fine class's broad
        class index or -1 where its cells carry several). Needs an atlas with broad labels."""
        if self._broad_codes is None:
            broad, codes = np.unique(self.broad_labels.astype(str), return_inverse=True)
            parent = _parents(self.label_codes()[1], len(self.classes), codes, len(broad))
            self._broad_codes = (broad, codes, parent)
        return self._broad_codes

    def broad_calibration(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The typicality calibration of the broad level (as `calibration` is of the fine
        one), over the whole atlas or re-aggregated over the genes at `positions`."""

        def calibrate():
            vecs, index = (
                (_StoredVectors(self) if self.on_disk else self.vectors, self.index())
                if positions is None
                else self.vectors_over(positions)[:2]
            )
            return self_similarity(vecs, self.broad_codes()[1], index, self.held_out())

        return _remember(self._broad, _panel_key(positions), calibrate)

    @classmethod
    def open(cls, store: str | Path | StoreLocation, name: str | None = None) -> Atlas:
        """Atlas `name` of `store`; or, with no name, the atlas of the bundle `store` (a
        local folder, https://... or s3://..., fetched once into the cache and verified:
        `cellvec.fetch`)."""
        if name is None:
            store, name = resolve_atlas(None, str(store))
        store = store_location(store)
        ds, meta = stored_atlas(store, name)
        found = meta.get("recipe", {}).get("version")
        if found != RECIPE_VERSION:
            raise StoreError(
                f"Atlas {name!r} in {store} was built by an older cellvec (recipe version "
                f"{found}, this one reads {RECIPE_VERSION}). Rebuild it with `cellvec atlas build`."
            )
        if (meta.get("index") or {}).get("kind") == "disk":
            return cls._open_disk(store, name, meta, ds)
        columns = ["cell_id", "label", "batch", "vector", "self_similarity"]
        has_broad = "label_broad" in ds.schema.names
        arrow = ds.to_table(columns=columns + (["label_broad"] if has_broad else []))
        return cls(
            name=name,
            store=store,
            meta=meta,
            _cell_ids=string_values(arrow.column("cell_id")),
            _labels=string_values(arrow.column("label")),
            _batches=string_values(arrow.column("batch")),
            _vectors=fixed_size_rows(arrow.column("vector")),
            version=ds.version,
            _ds=ds,
            _broad_labels=(string_values(arrow.column("label_broad")) if has_broad else None),
            _calibration=arrow.column("self_similarity").to_numpy(zero_copy_only=False),
        )

    @classmethod
    def _open_disk(cls, store, name: str, meta: dict, ds) -> Atlas:
        """A disk atlas: label codes (int32) and calibration (float32) read in batches, so
        opening 20M cells holds ~160 MB, never the vectors or the cell ids."""
        import pyarrow.compute as pc

        n = ds.count_rows()
        classes = np.asarray(sorted(meta.get("classes") or {}), dtype=object)
        value_set = pa.array(classes.tolist(), pa.string())
        codes = np.empty(n, dtype=np.int32)
        calibration = np.empty(n, dtype=np.float32)
        has_broad = "label_broad" in ds.schema.names
        broad_classes = np.asarray(sorted(meta.get("broad_classes") or {}), dtype=object)
        broad_set = pa.array(broad_classes.tolist(), pa.string())
        broad = np.empty(n if has_broad else 0, dtype=np.int32)

        def codes_of(column, value_set):
            found = pc.index_in(column, value_set=value_set)
            if found.null_count:
                raise StoreError(
                    f"Atlas {name!r} in {store} has labels its metadata does not list; "
                    "rebuild it with `cellvec atlas build`."
                )
            return found.to_numpy(zero_copy_only=False)

        at = 0
        columns = ["label", "self_similarity"] + (["label_broad"] if has_broad else [])
        for batch in ds.to_batches(columns=columns, batch_size=1 << 20):
            m = batch.num_rows
            codes[at : at + m] = codes_of(batch.column(0), value_set)
            calibration[at : at + m] = batch.column(1).to_numpy(zero_copy_only=False)
            if has_broad:
                broad[at : at + m] = codes_of(batch.column(2), broad_set)
            at += m
        return cls(
            name=name,
            store=store,
            meta=meta,
            version=ds.version,
            _ds=ds,
            _codes=(classes, codes),
            _calibration=calibration,
            _broad_codes=(
                (broad_classes, broad, _parents(codes, len(classes), broad, len(broad_classes)))
                if has_broad
                else None
            ),
        )

    @classmethod
    def from_fit(
        cls, name: str, fit: FittedReference, labels, cell_ids=None, broad_labels=None
    ) -> Atlas:
        """An atlas held in memory only (evaluation folds): the same search and mapping as a
        stored one, without writing it."""
        n = len(fit.vectors)
        ids = cell_ids if cell_ids is not None else [str(i) for i in range(n)]
        return cls(
            name=name,
            store="",
            meta={"recipe": fit.encoder.recipe.to_dict()},
            _cell_ids=np.asarray(ids, dtype=object),
            _labels=np.asarray(labels, dtype=object),
            _batches=np.full(n, "", dtype=object),
            _vectors=fit.vectors,
            _broad_labels=None if broad_labels is None else np.asarray(broad_labels, dtype=object),
            _encoder=fit.encoder,
            _weights=fit.weights,
            _held_out=fit.held_out,
        )

    def with_encoder(self, encoder: CellEncoder) -> Atlas:
        """This atlas using `encoder`, already loaded elsewhere (the service's), instead of
        loading its own."""
        self._encoder = encoder
        return self

    def encoder(self, gene_store: GeneStore | None = None) -> CellEncoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.store, self.name, self.recipe, gene_store)
        return self._encoder

    def weights(self) -> sp.csr_matrix:
        """The reference cells' top-gene weights (cells x the atlas's genes), read once."""
        if self._weights is None:
            t = self._dataset().to_table(columns=["top_genes", "top_weights"])
            self._weights = weight_matrix(t, len(self.encoder().refinement["gene_rows"]))
        return self._weights

    def held_out(self) -> np.ndarray:
        """The calibration cells: held out of refinement (`--calibration-split`), at most
        `CALIBRATION_PER_CLASS` a class; re-aggregated panels are calibrated on the same."""
        if self._held_out is None:
            cal = self.calibration()
            self._held_out = np.isfinite(cal)
        return self._held_out

    def calibration(self) -> np.ndarray:
        """Per reference cell, the typicality calibration value (`self_similarity`), NaN
        for cells that are not calibration cells."""
        if self._calibration is None:
            held = self._held_out if self._held_out is not None else np.zeros(self.n_cells, bool)
            self._calibration = self_similarity(
                self.vectors, self.label_codes()[1], self.index(), held
            )
        return self._calibration

    def require_calibration(self) -> None:
        if not np.isfinite(self.calibration()).any():
            raise CellvecError(
                f"Atlas {self.name!r} has no held-out calibration cells, so typicality would "
                "be judged against cells refinement trained on (far too tight: most new cells "
                "would look atypical). Rebuild it with `cellvec atlas build ... "
                "--calibration-split 0.1` to use --min-typicality."
            )

    def coverage(self, positions: np.ndarray | None) -> float:
        """The share of the reference's top-gene weight on the atlas genes at `positions`
        (the genes a query measures, each once: a `GeneBasis`'s positions): 1.0 when the
        query has every gene that counts."""
        if positions is None:
            return 1.0
        w = self.weights() if self._panel_fits() else self._weights_sample()
        total = float(w.sum())
        return float(w[:, positions].sum()) / total if total > 0 else 0.0

    def _panel_fits(self) -> bool:
        """Whether re-aggregating the whole reference over a panel's genes fits the memory
        budget: always for an atlas searched in memory, for a disk atlas when its top-gene
        weights (~12 bytes a gene a cell) and a second set of vectors would."""
        if not self.on_disk:
            return True
        from cellvec.cell_index.disk_index import memory_budget, memory_estimate

        need = memory_estimate(self.n_cells, self.dimension) + 12 * self.n_cells * int(
            self.recipe.top_genes
        )
        return need <= memory_budget()

    def _weights_sample(self, n: int = 50_000) -> sp.csr_matrix:
        """Top-gene weights of `n` evenly spaced reference cells (a disk atlas's coverage)."""
        rows = np.unique(np.linspace(0, self.n_cells - 1, min(n, self.n_cells)).astype(np.int64))
        return self._weights_of(rows)

    def _weights_of(self, rows: np.ndarray) -> sp.csr_matrix:
        """Top-gene weights of the reference cells at `rows` (sorted); a disk atlas reads only those."""
        if self._weights is not None or not self.on_disk:
            return sp.csr_matrix(self.weights()[rows])
        t = self._dataset().take(rows, columns=["top_genes", "top_weights"])
        return weight_matrix(t, len(self.encoder().refinement["gene_rows"]))

    def _reaggregate(self, w: sp.csr_matrix, positions: np.ndarray | None = None) -> np.ndarray:
        """Vectors before the head (adapted genes, centred) of reference top-gene weights `w`,
        over the atlas genes at `positions` only (each cell's weights there rescaled to sum
        to 1), or all of them."""
        enc = self.encoder()
        fitted = enc.refinement
        if positions is None:
            positions = np.arange(len(fitted["gene_rows"]))
        w = sp.csr_matrix(w[:, positions])
        sums = np.asarray(w.sum(axis=1)).ravel()
        w = sp.csr_matrix(sp.diags(np.where(sums > 0, 1.0 / np.where(sums > 0, sums, 1), 0)) @ w)
        rows = fitted["gene_rows"][positions]
        params = {k: fitted[k][positions] for k in ("gene_gate", "gene_delta") if k in fitted}
        basis = adapted_basis(apply_background(enc.genes.vectors[rows], enc.background), params)
        return weighted_mean(w, basis, fitted.get("cell_mean"))

    def unrefined_sample(
        self, positions: np.ndarray | None = None, n: int = 20_000, seed: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """(vectors before the head, class codes) of a uniform sample of `n` reference cells
        (all of them when fewer), over the atlas genes at `positions` (all when None): the
        atlas side of the mixing test (`cell_index.mixing`)."""
        from cellvec.cell_index.mixing import sample_rows

        rows = sample_rows(self.n_cells, n, seed)
        return self._reaggregate(self._weights_of(rows), positions), self.label_codes()[1][rows]

    def vectors_over(self, positions: np.ndarray) -> tuple[np.ndarray, object, np.ndarray]:
        """Reference vectors re-aggregated over the atlas genes at `positions` only, with
        the stored gene adapter, centre and head (nothing retrained), and their index.

        A query that measures fewer genes (a targeted or spatial panel, a dataset that
        kept its variable genes) is then compared with reference cells described by the
        same genes. Returns (vectors, index, typicality calibration), cached for the last
        few panels."""
        return _remember(self._panels, _panel_key(positions), lambda: self._panel(positions))

    def _panel(self, positions: np.ndarray) -> tuple[np.ndarray, object, np.ndarray]:
        from cellvec.cell_index.knn import build_index

        if not self._panel_fits():
            # A prebuilt index holds full-panel vectors; labels from it would rest on genes
            # the query does not measure, so refuse rather than answer differently.
            raise CellvecError(
                f"Atlas {self.name!r} is searched on disk ({self.n_cells:,} cells) and the "
                f"query measures {len(positions):,} of its "
                f"{len(self.encoder().refinement['gene_rows']):,} genes: comparing it needs "
                "the reference re-aggregated over those genes, more than the memory budget "
                "(CELLVEC_ATLAS_MEMORY_BUDGET) allows. Build an atlas of the reference "
                "restricted to the query's genes (`cellvec atlas build` on the reference "
                "with only those genes), or map a query that measures the atlas's genes."
            )
        vecs = apply_head(self.encoder().refinement, self._reaggregate(self.weights(), positions))
        index = build_index(vecs)
        held = self.held_out()
        return vecs, index, self_similarity(vecs, self.label_codes()[1], index, held)

    def index(self):
        """The search index over the atlas vectors (exact, or IVF above 200k cells), built
        once; for a disk atlas, the Lance index of its table (`disk_index.DiskIndex`)."""
        from cellvec.cell_index.knn import build_index

        if self._index is None and self.on_disk:
            from cellvec.cell_index.disk_index import DiskIndex, DiskIndexParams

            self._index = DiskIndex(self._dataset(), DiskIndexParams.from_dict(self.meta["index"]))
        if self._index is None:
            t = time.perf_counter()
            self._index = build_index(self.vectors)
            log.debug(
                "%s index over %s atlas cells in %.1f s",
                type(self._index).__name__,
                f"{len(self.vectors):,}",
                time.perf_counter() - t,
            )
        return self._index

    @classmethod
    def describe(cls, store: str | Path | StoreLocation, name: str) -> dict:
        """`summary()` of a stored atlas from its metadata and row count alone (`atlas
        list`): no labels, vectors or weights are read."""
        ds, meta = stored_atlas(store, name)
        return atlas_summary(name, meta, ds.count_rows())

    def summary(self) -> dict:
        return atlas_summary(self.name, self.meta, self.n_cells)


def _k_of(meta: dict) -> int:
    """The atlas's neighbours in the vote: chosen by `atlas build --tune`, else 15."""
    return int(meta.get("k") or DEFAULT_K)


def atlas_summary(name: str, meta: dict, n_cells: int) -> dict:
    """What `atlas list` and the service say of an atlas: its size, labels and recipe."""
    return {
        "name": name,
        "n_cells": n_cells,
        "index": meta.get("index") or {"kind": "memory"},
        "label_key": meta.get("label_key"),
        "classes": meta.get("classes"),
        "broad_label_key": meta.get("broad_label_key"),
        "broad_classes": meta.get("broad_classes"),
        "recipe": meta.get("recipe"),
        "created": meta.get("created"),
        "source": meta.get("source"),
        "k": _k_of(meta),
        "tuning": meta.get("tuning"),
        "excluded_labels": meta.get("excluded_labels"),
        "refinement": {k: v for k, v in (meta.get("refinement") or {}).items() if k != "history"},
    }


def _panel_key(positions: np.ndarray | None):
    """A cache key for a gene panel (None: the atlas's own genes)."""
    return None if positions is None else hash(np.asarray(positions, np.int64).tobytes())


def _remember(cache: dict, key, make, keep: int = 4):
    """`cache[key]`, made by `make()` on a miss; at most `keep` panels are kept besides the
    whole atlas (key None), the oldest dropped first (a service sees a few panels)."""
    if key not in cache:
        if sum(k is not None for k in cache) >= keep:
            cache.pop(next(k for k in cache if k is not None))
        cache[key] = make()
    return cache[key]


def load_encoder(
    store: str | Path | StoreLocation,
    name: str,
    recipe: Recipe,
    gene_store: GeneStore | None = None,
) -> CellEncoder:
    """The encoder of atlas `name`: its gene table, background transform and head, checked
    against the hashes its recipe records."""
    gene_store = gene_store or GeneStore(store)
    genes = gene_store.load(recipe.model)
    if recipe.gene_table_hash and genes.meta.get("content_hash") != recipe.gene_table_hash:
        raise StoreError(
            f"Atlas {name!r} was built on another version of the {recipe.model} gene table "
            f"(hash {recipe.gene_table_hash}, store now {genes.meta.get('content_hash')}). "
            "Rebuild the atlas with `cellvec atlas build`."
        )
    bg = load_artifact(gene_store, recipe.background_hash) if recipe.background_hash else {}
    head = load_artifact(gene_store, recipe.head_hash) if recipe.head_hash else {}
    return CellEncoder(recipe, genes, bg, head)


MAX_TABLE_NAME = 200  # "atlas_<name>.lance", "mapping_<name>_clusters.lance": 255 bytes


def is_table_name(name: str) -> bool:
    """Letters, digits and underscores, at most `MAX_TABLE_NAME` of them: what an atlas or a
    saved mapping may be called (the name becomes a table's folder and a SQL view)."""
    return len(name) <= MAX_TABLE_NAME and re.fullmatch(r"[A-Za-z0-9_]+", name) is not None


def is_atlas_name(name: str) -> bool:
    """`is_table_name`: what `build_atlas` accepts, so anything else is answered 'no such
    atlas' without touching the store."""
    return is_table_name(name)


def list_atlases(store: str | Path | StoreLocation) -> list[str]:
    gs = GeneStore(store)
    return [n[len(ATLAS_PREFIX) :] for n in gs.table_names() if n.startswith(ATLAS_PREFIX)]


def stored_atlas(store, name: str):
    """(the table of atlas `name` as a `lance.LanceDataset`, its metadata, read from that
    same version): what opening, exporting or describing an atlas reads first, without
    loading it; refused when there is none, or only a half-written one."""
    tbl = GeneStore(store).open_table(ATLAS_PREFIX + name)
    ds = tbl.to_lance() if tbl is not None else None
    meta = read_meta(ds) if ds is not None else {}
    if ds is None or not meta.get("complete"):
        have = ", ".join(list_atlases(store)) or "none"
        raise StoreError(
            f"No atlas {name!r} in {store} (atlases: {have}). Build it with `cellvec atlas build`."
        )
    return ds, meta


def build_atlas(
    reference,
    *,
    store: str | Path | StoreLocation,
    name: str,
    label_key: str,
    model: str | None = None,
    top_genes: int = 1000,
    weighting: str = "value",
    background: str = "whiten",
    center: bool = True,
    refine: str = "supcon",
    adapt_genes: bool = True,
    batch_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    seed: int = 0,
    refine_options: dict | None = None,
    k: int | None = None,
    tune: bool = False,
    calibration_split: float = 0.0,
    exclude_labels=(),
    broad_label_key: str | None = None,
    ray: str | bool | None = None,
    index: str = "auto",
) -> Atlas:
    """Embed a labelled reference and write it as atlas `name` in the store.

    `k` is stored as the atlas's default number of neighbours for mapping; `tune`
    chooses `top_genes` and `k` by 3-fold cross-validation on the reference
    (`cellvec.evaluation.tune`), recorded in the recipe and the atlas metadata.
    `calibration_split` keeps that share of each class out of refinement to calibrate
    typicality (`map_cells(min_typicality=...)` needs it). `exclude_labels` (e.g.
    ["Doublet", "Unknown"]) drops the reference cells that carry one before anything is
    fitted; the atlas records what was dropped (`meta["excluded_labels"]`). `broad_label_key`
    names a second, coarser label (e.g. `cell_type_broad` over `cell_type`), stored in
    column `label_broad`: mapping then gives a broad label too, even where the fine one is
    unassigned. A cell without a broad label is its own broad class (its fine label).

    `ray` (True for a local cluster, or an address: see `cellvec._ray`): Ray workers
    read the reference's rows, compute its cells' top genes and final vectors and write
    the table's fragments, committed once; refinement is trained here, in one process.
    The atlas equals the one built without Ray (same rows, vectors within 1e-6).

    `index`: "memory" (searched with faiss in memory), "disk" (a Lance IVF_PQ index on
    the table, see `disk_index.py`; built on the Ray cluster too when `ray` is given)
    or "auto" (disk above the memory budget)."""
    from cellvec.cell_index.disk_index import INDEX_KINDS

    if index not in INDEX_KINDS:
        raise CellvecError(f"Index {index!r}: choose one of {', '.join(INDEX_KINDS)}.")
    if not is_table_name(name):
        raise CellvecError(
            f"Atlas name {name!r}: use up to {MAX_TABLE_NAME} letters, digits and underscores "
            "(it becomes a SQL view name and a folder name)."
        )
    t0 = time.perf_counter()
    gs = GeneStore(store)
    genes = gs.load(model, every_gene=True)  # not a bundle's partial table
    source = read_expression(reference, layer=layer, use_raw=use_raw, gene_column=gene_column)
    # every input check comes before fitting: fitting writes artifact tables into the store
    if batch_key:
        _label_column(source, batch_key, "--batch-key")
    source, labels, broad, excluded = reference_labels(
        source, label_key, broad_label_key=broad_label_key, exclude_labels=exclude_labels
    )
    # Top genes are always read from log-normalised values (counts are normalised on reading).
    recipe = Recipe(
        model=genes.model,
        dimension=genes.dimension,
        top_genes=top_genes,
        weighting=weighting,
        background=background,
        center=center,
        refine=refine,
        adapt_genes=adapt_genes and refine != "none",
    )
    tuning = None
    if tune:
        from cellvec.evaluation.tune import tune_recipe

        top, k, tuning = tune_recipe(
            source, labels, genes, recipe, seed=seed, refine_options=refine_options
        )
        recipe = Recipe.from_dict({**recipe.to_dict(), "top_genes": top})
    fit = fit_encoder(
        source,
        labels,
        genes,
        recipe,
        store=store,
        seed=seed,
        refine_options=refine_options,
        calibration_split=calibration_split,
        ray=ray,
    )
    encoder, report = fit.encoder, fit.report
    batches = (
        source.obs[batch_key].astype(str).to_numpy()
        if batch_key
        else np.full(source.n_obs, "", dtype=object)
    )
    classes, counts = np.unique(labels, return_counts=True)
    meta = {
        "recipe": encoder.recipe.to_dict(),
        "label_key": label_key,
        "batch_key": batch_key,
        "n_cells": int(source.n_obs),
        "classes": {str(c): int(n) for c, n in zip(classes, counts)},
        "source": source.path,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
        "refinement": report or None,
        "k": int(k or DEFAULT_K),
        "tuning": tuning,
    }
    if excluded:
        meta["excluded_labels"] = excluded
    if broad is not None:
        meta["broad_label_key"] = broad_label_key
        names, counts = np.unique(broad.astype(str), return_counts=True)
        meta["broad_classes"] = {str(c): int(n) for c, n in zip(names, counts)}
    dataset = Path(str(meta["source"])).stem
    dim = fit.dimension
    meta["index"] = index_meta(index, source.n_obs, dim)
    schema = atlas_schema(dim, meta, broad=broad is not None)
    if ray:
        memory = _write_on_ray(gs, name, fit, schema, labels, broad, batches, source, dataset, ray)
    else:
        memory = Atlas.from_fit(name, fit, labels, broad_labels=broad)
        top_genes, top_weights = weight_lists(fit.weights)
        table = atlas_table(
            schema,
            cell_ids=source.obs_names,
            labels=labels,
            batches=batches,
            dataset=dataset,
            vectors=fit.vectors,
            top_genes=top_genes,
            top_weights=top_weights,
            calibration=memory.calibration(),
            broad_labels=broad,
        )
        replace_table(gs.db, ATLAS_PREFIX + name, table)
    if meta["index"]["kind"] == "disk":
        from cellvec.cell_index.disk_index import DiskIndexParams, build_disk_index

        # Written after the table: a reader in between searches the table exactly (slower,
        # not wrong) until the index is committed.
        build_disk_index(
            gs.open_table(ATLAS_PREFIX + name).to_lance(),
            DiskIndexParams.from_dict(meta["index"]),
            ray_address=ray,
            storage_options=gs.location.options() or None,
        )
    log.info(
        "Atlas %s: %s cells, %d classes, dim %d, %s index, in %.1f s",
        name,
        f"{source.n_obs:,}",
        len(classes),
        dim,
        meta["index"]["kind"],
        time.perf_counter() - t0,
    )
    atlas = Atlas.open(store, name)
    atlas._encoder = encoder
    if memory is not None and not atlas.on_disk:
        atlas._index = memory._index
    return atlas


def index_meta(kind: str, n_cells: int, dim: int) -> dict:
    """The `index` entry of an atlas's metadata: {"kind": "memory"}, or {"kind": "disk"}
    with the Lance index parameters chosen for its size (`disk_index.choose_params`)."""
    from cellvec.cell_index.disk_index import choose_kind, choose_params

    kind = choose_kind(kind, n_cells, dim)
    if kind == "memory":
        return {"kind": "memory"}
    return {"kind": "disk", **choose_params(n_cells, dim).to_dict()}


def index_atlas(
    store: str | Path | StoreLocation,
    name: str,
    *,
    index: str = "disk",
    params: dict | None = None,
    ray: str | bool | None = None,
) -> dict:
    """(Re)index an atlas already in the store, e.g. one written in chunks by a cluster:
    builds its Lance index when `index` comes out "disk" (`params` overrides the chosen
    parameters), then records the choice in its metadata. Returns the `index` entry.

    The index is committed before the metadata names it, so a reader sees the atlas
    searched in memory, or exactly through its table, until the index is there."""
    from cellvec.cell_index.disk_index import DiskIndexParams, build_disk_index

    ds, meta = stored_atlas(store, name)
    entry = index_meta(index, ds.count_rows(), ds.schema.field("vector").type.list_size)
    if entry["kind"] == "disk":
        entry.update(params or {})
        ds = build_disk_index(
            ds,
            DiskIndexParams.from_dict(entry),
            ray_address=ray,
            storage_options=store_location(store).options() or None,
        )
    ds.update_schema_metadata({META_KEY.decode(): json.dumps({**meta, "index": entry})})
    return entry


def _write_on_ray(
    gs, name, fit, schema, labels, broad, batches, source, dataset, ray
) -> Atlas | None:
    """The atlas table written by Ray workers (`parallel.write_atlas`); the in-memory atlas
    that calibrated typicality when held-out cells needed every vector, else None."""
    from cellvec.cell_index.parallel import write_atlas

    memory = None

    def calibrate(vectors):
        nonlocal memory
        fit.vectors = vectors
        memory = Atlas.from_fit(name, fit, labels, broad_labels=broad)
        return memory.calibration()

    held = fit.held_out is not None and bool(fit.held_out.any())
    write_atlas(
        gs.location.table_uri(ATLAS_PREFIX + name),
        schema,
        fit.blocks,
        basis=fit.basis(),
        params=fit.encoder.refinement,
        cell_ids=source.obs_names,
        labels=labels,
        broad_labels=broad,
        batches=batches,
        dataset=dataset,
        calibrate=calibrate if held else None,
        storage_options=gs.location.options() or None,
        ray=ray,
    )
    return memory
