"""Reference atlases: labelled cell vectors in a LanceDB table, with their recipe.

Table `atlas_<name>` in the gene store: cell_id, label, batch, dataset, vector.
Its metadata holds the recipe (model, gene-table hash, top-N, weighting,
background and head hashes, ...), the label key and class counts. The table is
written in one commit (a reader sees the old atlas or the new one, never half).

Nearest-neighbour search runs on the atlas vectors in memory: exact below
200,000 cells, a faiss IVF index above (built in ~3 s per 1M cells when the
atlas is loaded). Measured here, per-query LanceDB search takes 4-12 ms whatever
its index, the in-memory index ~0.2 ms, so no LanceDB vector index is built.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from cellvec.cell_index.artifacts import array_hash, load_artifact, save_artifact
from cellvec.cell_index.background import apply_background, fit_background
from cellvec.cell_index.encoder import CellEncoder
from cellvec.cell_index.readers import ExpressionSource, read_expression
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import apply_head, train_head
from cellvec.cell_index.vectors import (
    GeneBasis,
    cell_vectors,
    match_dataset_genes,
    weighted_mean,
    weights_matrix,
)
from cellvec.errors import CellvecError, InputFormatError, StoreError
from cellvec.gene_store.store import META_KEY, GeneStore, read_meta, replace_table

log = logging.getLogger(__name__)

ATLAS_PREFIX = "atlas_"


def _label_column(source: ExpressionSource, label_key: str):
    if label_key not in source.obs.columns:
        raise InputFormatError(
            f"{source.path}: no cell annotation {label_key!r}; obs columns are: "
            f"{', '.join(map(str, source.obs.columns)) or 'none'}. Name one with --label-key."
        )
    return source.obs[label_key]


def labels_of(
    source: ExpressionSource, label_key: str, *, label_map: dict[str, str] | None = None
) -> np.ndarray:
    """The cells' labels as strings, renamed through `label_map` (cross-study names) if given."""
    labels = _label_column(source, label_key).astype(str)
    if label_map:
        labels = labels.replace(label_map)
    return labels.to_numpy(dtype=object)


def known_labels(source: ExpressionSource, label_key: str) -> np.ndarray:
    """True for cells that carry a (non-empty) label."""
    col = _label_column(source, label_key)
    return (col.notna() & (col.astype(str).str.len() > 0)).to_numpy()


def fit_encoder(
    source: ExpressionSource,
    labels: np.ndarray | None,
    genes,
    recipe: Recipe,
    *,
    store: str | Path | None = None,
    seed: int = 0,
    refine_options: dict | None = None,
) -> tuple[CellEncoder, np.ndarray, dict]:
    """Fit background and head on a reference; returns (encoder, reference vectors, refine report)."""
    cols, rows = match_dataset_genes(source.var_names, genes, source.path)
    bg = fit_background(genes.vectors[rows], recipe.background)
    basis = GeneBasis(cols, rows, apply_background(genes.vectors[rows], bg), len(source.var_names))
    recipe = Recipe.from_dict(
        {
            **recipe.to_dict(),
            "model": genes.model,
            "dimension": genes.dimension,
            "gene_table_hash": genes.meta.get("content_hash"),
            "background_hash": _hash_or_save(store, bg),
        }
    )
    head, report = {}, {}
    if recipe.refine != "none":
        w = weights_matrix(source, basis, recipe)
        head, report = train_head(
            w,
            basis.full,
            labels if recipe.refine == "supcon" else None,
            mode=recipe.refine,
            seed=seed,
            **(refine_options or {}),
        )
        vectors = apply_head(head, weighted_mean(w, basis.full))
        recipe = Recipe.from_dict({**recipe.to_dict(), "head_hash": _hash_or_save(store, head)})
    else:
        vectors = cell_vectors(source, basis, recipe, desc="reference vectors")
    return CellEncoder(recipe, genes, bg, head), vectors, report


def _hash_or_save(store, arrays: dict) -> str | None:
    if not arrays:
        return None
    return save_artifact(store, arrays) if store is not None else array_hash(arrays)


@dataclass
class Atlas:
    """An atlas loaded from the store: vectors in memory, ready for KNN."""

    name: str
    store: str
    meta: dict
    cell_ids: np.ndarray
    labels: np.ndarray
    batches: np.ndarray
    vectors: np.ndarray
    version: int = 0
    _index: object = field(default=None, repr=False)
    _encoder: CellEncoder | None = field(default=None, repr=False)
    _codes: tuple | None = field(default=None, repr=False)

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_dict(self.meta["recipe"])

    @property
    def classes(self) -> np.ndarray:
        return self.label_codes()[0]

    def label_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """(sorted class names, each cell's class index), computed once per loaded atlas."""
        if self._codes is None:
            self._codes = np.unique(self.labels.astype(str), return_inverse=True)
        return self._codes

    @classmethod
    def open(cls, store: str | Path, name: str) -> Atlas:
        gs = GeneStore(store)
        tbl = gs.open_table(ATLAS_PREFIX + name)
        meta = read_meta(tbl) if tbl is not None else {}
        if tbl is None or not meta.get("complete"):
            have = ", ".join(list_atlases(store)) or "none"
            raise StoreError(
                f"No atlas {name!r} in {store} (atlases: {have}). Build it with `cellvec atlas build`."
            )
        arrow = tbl.to_arrow()
        vec = arrow.column("vector").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        return cls(
            name=name,
            store=str(store),
            meta=meta,
            cell_ids=np.asarray(arrow.column("cell_id").to_pylist(), dtype=object),
            labels=np.asarray(arrow.column("label").to_pylist(), dtype=object),
            batches=np.asarray(arrow.column("batch").to_pylist(), dtype=object),
            vectors=vec.reshape(len(arrow), -1).astype(np.float32, copy=False),
            version=tbl.version,
        )

    def encoder(self, gene_store: GeneStore | None = None) -> CellEncoder:
        if self._encoder is None:
            self._encoder = load_encoder(self.store, self.name, self.recipe, gene_store)
        return self._encoder

    def index(self):
        """The search index over the atlas vectors (exact, or IVF above 200k cells), built once."""
        from cellvec.cell_index.knn import build_index

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

    def summary(self) -> dict:
        return {
            "name": self.name,
            "n_cells": len(self.vectors),
            "label_key": self.meta.get("label_key"),
            "classes": self.meta.get("classes"),
            "recipe": self.meta.get("recipe"),
            "created": self.meta.get("created"),
            "source": self.meta.get("source"),
            "refinement": {
                k: v for k, v in (self.meta.get("refinement") or {}).items() if k != "history"
            },
        }


def load_encoder(
    store: str | Path, name: str, recipe: Recipe, gene_store: GeneStore | None = None
) -> CellEncoder:
    """The encoder of atlas `name`: its gene table, background transform and head, checked
    against the hashes its recipe records."""
    genes = (gene_store or GeneStore(store)).load(recipe.model)
    if recipe.gene_table_hash and genes.meta.get("content_hash") != recipe.gene_table_hash:
        raise StoreError(
            f"Atlas {name!r} was built on another version of the {recipe.model} gene table "
            f"(hash {recipe.gene_table_hash}, store now {genes.meta.get('content_hash')}). "
            "Rebuild the atlas with `cellvec atlas build`."
        )
    bg = load_artifact(store, recipe.background_hash) if recipe.background_hash else {}
    head = load_artifact(store, recipe.head_hash) if recipe.head_hash else {}
    return CellEncoder(recipe, genes, bg, head)


def list_atlases(store: str | Path) -> list[str]:
    gs = GeneStore(store)
    return [n[len(ATLAS_PREFIX) :] for n in gs.table_names() if n.startswith(ATLAS_PREFIX)]


def build_atlas(
    reference,
    *,
    store: str | Path,
    name: str,
    label_key: str,
    model: str | None = None,
    top_genes: int = 200,
    weighting: str = "value",
    background: str = "whiten",
    refine: str = "none",
    batch_key: str | None = None,
    layer: str | None = None,
    use_raw: bool | None = None,
    gene_column: str | None = None,
    seed: int = 0,
    refine_options: dict | None = None,
) -> Atlas:
    """Embed a labelled reference and write it as atlas `name` in the store."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise CellvecError(
            f"Atlas name {name!r}: use letters, digits and underscores (it becomes a SQL view name)."
        )
    t0 = time.perf_counter()
    gs = GeneStore(store)
    genes = gs.load(model)
    source = read_expression(reference, layer=layer, use_raw=use_raw, gene_column=gene_column)
    known = known_labels(source, label_key)
    if not known.all():
        log.warning(
            "%s: %d cells without a %s label excluded", source.path, int((~known).sum()), label_key
        )
        source = source.subset(known)
    labels = labels_of(source, label_key)
    # Top genes are always read from log-normalised values (counts are normalised on reading).
    recipe = Recipe(
        model=genes.model,
        dimension=genes.dimension,
        top_genes=top_genes,
        weighting=weighting,
        background=background,
        refine=refine,
    )
    encoder, vectors, report = fit_encoder(
        source, labels, genes, recipe, store=store, seed=seed, refine_options=refine_options
    )
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
    }
    dim = vectors.shape[1]
    schema = pa.schema(
        [
            pa.field("cell_id", pa.string()),
            pa.field("label", pa.string()),
            pa.field("batch", pa.string()),
            pa.field("dataset", pa.string()),
            pa.field("vector", pa.list_(pa.float32(), dim)),
        ],
        metadata={META_KEY: json.dumps(meta).encode()},
    )
    table = pa.Table.from_arrays(
        [
            pa.array(source.obs_names, pa.string()),
            pa.array(labels.tolist(), pa.string()),
            pa.array([str(b) for b in batches], pa.string()),
            pa.array([Path(str(meta["source"])).stem] * source.n_obs, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        ],
        schema=schema,
    )
    replace_table(gs.db, ATLAS_PREFIX + name, table)
    log.info(
        "Atlas %s: %s cells, %d classes, dim %d, in %.1f s",
        name,
        f"{source.n_obs:,}",
        len(classes),
        dim,
        time.perf_counter() - t0,
    )
    atlas = Atlas.open(store, name)
    atlas._encoder = encoder
    return atlas
