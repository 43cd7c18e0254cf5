"""The atlas table: its name, columns and metadata, and reading it back from the store.

Table `atlas_<name>` in the gene store: cell_id, label, batch, dataset, vector,
and each cell's top genes and weights (`top_genes`, places in the atlas's gene
list, and `top_weights`), so that the reference can be re-aggregated over the
genes a query measures. Its metadata holds the recipe (model, gene-table hash,
top-N, weighting, background and refinement hashes, ...), the label key and
class counts. The table is written in one commit (a reader sees the old atlas or
the new one, never half): by `build.build_atlas` in one process, or by Ray workers
(`parallel.write_atlas`) from the same rows (`atlas_table`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from cellvec.cell_index.artifacts import array_hash
from cellvec.errors import StoreError
from cellvec.storage import META_KEY, Store, StoreLocation, read_meta

log = logging.getLogger(__name__)

ATLAS_PREFIX = "atlas_"

MAX_TABLE_NAME = 200  # "atlas_<name>.lance", "mapping_<name>_clusters.lance": 255 bytes

# An atlas's cross-species view (`build.build_atlas`, `Atlas.cross_species`) is an atlas
# table of its own, `atlas_<name>__species`, written with it; no atlas may take the name.
SPECIES_SUFFIX = "__species"


def is_table_name(name: str) -> bool:
    """Letters, digits and underscores, at most `MAX_TABLE_NAME` of them: what an atlas or a
    saved mapping may be called (the name becomes a table's folder and a SQL view)."""
    return len(name) <= MAX_TABLE_NAME and re.fullmatch(r"[A-Za-z0-9_]+", name) is not None


def is_atlas_name(name: str) -> bool:
    """`is_table_name`, not ending in `SPECIES_SUFFIX`: what `build_atlas` accepts, so
    anything else is answered 'no such atlas' without touching the store."""
    return is_table_name(name) and not name.endswith(SPECIES_SUFFIX)


def species_view_name(name: str) -> str:
    """The name of atlas `name`'s cross-species view (an atlas table of its own): derived
    from the atlas's, never read from its metadata, so no metadata (a bundle's) can point
    an atlas at another table."""
    return name + SPECIES_SUFFIX


def species_view_id(view_meta: dict, cell_ids, labels) -> str:
    """What pairs an atlas with its cross-species view: a digest of the view's fit (its
    recipe's hashes: head, background, gene table) and of the cells and labels it was
    fitted on, recorded in both (`meta["species_view_id"]` of the view,
    `meta["cross_species"]["id"]` of the atlas). Another build's view has another id;
    reindexing or copying a view keeps it; the same build of the same cells gives the same
    id (and the same view)."""
    recipe = json.dumps(view_meta.get("recipe", {}), sort_keys=True).encode()
    return array_hash(
        {
            "recipe": np.frombuffer(recipe, dtype=np.uint8),
            "cells": np.asarray(cell_ids, dtype=str),
            "labels": np.asarray(labels, dtype=str),
        }
    )


def drop_view_of_old_build(store: Store, name: str) -> None:
    """Drop atlas `name`'s cross-species view table where one is left from an earlier
    build: called once atlas `name` is written without a view (`--no-cross-species`, a
    bundle without one), which would never pair with it, but SQL would show it and it
    would hold a second copy of the cells' vectors."""
    table = ATLAS_PREFIX + species_view_name(name)
    if store.open_table(table) is not None:
        store.db.drop_table(table)
        log.info("Atlas %s: the cross-species view of its earlier build removed", name)


def is_its_view(name: str, meta: dict, view_meta: dict | None, where) -> bool:
    """Whether the view of atlas `name` found in `where` (its metadata `view_meta`; None:
    not found) is the one the atlas's metadata `meta` records (`species_view_id`, written
    by `build_atlas` with both); warns when it is not, so that the atlas answers alone
    rather than beside another build's view. False for an atlas without a view."""
    cross = meta.get("cross_species")
    if not cross:
        return False
    want = cross.get("id")
    if isinstance(want, str) and view_meta is not None and view_meta.get("species_view_id") == want:
        return True
    log.warning(
        "Atlas %s: its cross-species view %s is not in %s, or is another build's; a query "
        "of another species is compared with the atlas itself. Rebuild the atlas with "
        "`cellvec atlas build` to restore it.",
        name,
        species_view_name(name),
        where,
    )
    return False


def list_atlases(store: Store | str | Path | StoreLocation) -> list[str]:
    """The atlases of `store`, not their cross-species views."""
    names = Store.of(store).table_names()
    return [
        n[len(ATLAS_PREFIX) :]
        for n in names
        if n.startswith(ATLAS_PREFIX) and not n.endswith(SPECIES_SUFFIX)
    ]


def stored_atlas(store, name: str):
    """(the table of atlas `name` as a `lance.LanceDataset`, its metadata, read from that
    same version): what opening, exporting or describing an atlas reads first, without
    loading it; refused when there is none, or only a half-written one."""
    store = Store.of(store)
    tbl = store.open_table(ATLAS_PREFIX + name)
    ds = tbl.to_lance() if tbl is not None else None
    meta = read_meta(ds) if ds is not None else {}
    if ds is None or not meta.get("complete"):
        have = ", ".join(list_atlases(store)) or "none"
        raise StoreError(
            f"No atlas {name!r} in {store} (atlases: {have}). Build it with `cellvec atlas build`."
        )
    return ds, meta


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
