"""Cell vectors on a Ray cluster: the embarrassingly parallel stages of atlas build and map.

The cells are cut into shards, each a range of whole 20,000-cell chunks, so that a
worker computes exactly the chunks one process would (same values, same order).
A worker opens an h5ad file itself, backed, and reads its own rows; any other input
(an AnnData in memory, CSV, 10x) is read once by the driver and its chunks put in
Ray's object store. What every worker needs (gene vectors, the fitted refinement,
cell ids and labels) is put there once and shared.

- `top_gene_weights`: each cell's top-N genes and weights, gathered on the driver,
  which trains refinement on them (refinement is one model, trained in one process).
- `write_atlas`: final vectors computed by workers and written by them as Lance
  fragments (lance-ray's `LanceFragmentWriter`), committed once by the driver: a
  reader sees the old atlas or the new one, never part of it.
- `encode_cells`: query vectors for `map`, gathered on the driver for the search.

Ray Data runs the stages (`ray.data`, one block per shard, order preserved).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import shutil
import time

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from cellvec._arrow import fixed_size_rows
from cellvec._progress import progress
from cellvec._ray import cluster_cpus, init_ray, ordered_data
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.refine import apply_head, encode_weights
from cellvec.cell_index.table import atlas_table, weight_lists, weight_matrix
from cellvec.cell_index.vectors import aggregate
from cellvec.errors import CellvecError

log = logging.getLogger(__name__)

CHUNK = 20_000  # cells a worker computes at once: the single-process chunk size
SHARDS_PER_CPU = 4  # enough shards that a slow worker does not hold up the rest


# -- shards ------------------------------------------------------------------
def shard_bounds(n_cells: int, n_cpus: int) -> list[tuple[int, int]]:
    """Ranges of cell positions, each a whole number of `CHUNK`s (but the last)."""
    if n_cells == 0:
        return []
    chunks = math.ceil(n_cells / CHUNK)
    per = max(1, math.ceil(chunks / (SHARDS_PER_CPU * n_cpus)))
    return [(s * CHUNK, min(n_cells, (s + per) * CHUNK)) for s in range(0, chunks, per)]


def _reader(source: ExpressionSource, ray) -> dict:
    """How workers read the cells of `source` (picklable; large parts in the object store)."""
    spec = {
        "chunk": CHUNK,
        "kind": source.kind,
        "cols": source._cols,
        "validated": source.validated,
        "var_names": source.var_names,
        "path": source.path,
    }
    if source.h5ad is not None:
        st = os.stat(source.h5ad[0])
        # the file's size and time are part of the key: a worker never reads a stale handle
        spec["h5ad"] = (*source.h5ad, st.st_size, st.st_mtime_ns)
        spec["rows"] = ray.put(source._rows) if source._rows is not None else None
        log.info("%s: workers read their own rows of %s", source.path, source.h5ad[1])
    else:
        spec["blocks"] = [ray.put(block) for _, block in source.chunks(spec["chunk"])]
        log.info(
            "%s is not an h5ad file: its %d chunks were put in Ray's object store",
            source.path,
            len(spec["blocks"]),
        )
    return spec


_OPENED: dict = {}  # per worker process: h5ad files opened backed, shared objects fetched
_KEEP = 8  # the most recent of them (a long-lived worker serves many builds and maps)


def _cached(key, make):
    """`make()` -> (value, file to close when dropped or None), kept for the next calls."""
    if key not in _OPENED:
        while len(_OPENED) >= _KEEP:
            _, handle = _OPENED.pop(next(iter(_OPENED)))
            if handle is not None:
                handle.close()
        _OPENED[key] = make()
    return _OPENED[key][0]


def _shared(ref):
    """An object put in the object store once, fetched once per worker process."""
    import ray

    if not isinstance(ref, ray.ObjectRef):
        return ref
    return _cached(ref.hex(), lambda: (ray.get(ref), None))


def _open_matrix(path: str, key: str, *stamp):
    """The matrix `key` of an h5ad file, backed (rows are read on slicing)."""

    def make():
        import h5py
        from anndata.io import sparse_dataset

        f = h5py.File(path, "r")
        node = f[key]
        return (sparse_dataset(node) if isinstance(node, h5py.Group) else node), f

    return _cached((path, key, *stamp), make)


def _chunks(spec: dict, start: int, stop: int):
    """Yield (first position, log-normalised CSR) for the cells at positions [start, stop)."""
    size = spec["chunk"]
    if "blocks" in spec:
        for c in range(start // size, math.ceil(stop / size)):
            yield c * size, _shared(spec["blocks"][c])
        return
    import pandas as pd

    all_rows = _shared(spec["rows"])
    rows = np.arange(start, stop) if all_rows is None else all_rows[start:stop]
    src = ExpressionSource(
        path=spec["path"],
        obs=pd.DataFrame(index=pd.RangeIndex(len(rows))),
        var_names=spec["var_names"],
        kind=spec["kind"],
        _matrix=_open_matrix(*spec["h5ad"]),
        _cols=spec["cols"],
        _rows=rows,
        validated=spec["validated"],
    )
    for sl, block in src.chunks(size):
        yield start + sl.start, block


def _shard_dataset(ray, n_cells: int):
    bounds = shard_bounds(n_cells, cluster_cpus(ray))
    items = [{"start": s, "stop": e} for s, e in bounds]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))), len(items)


# -- stage 1: top-gene weights ------------------------------------------------
def _weights_batch(batch: pa.Table, shared) -> pa.Table:
    s = _shared(shared)
    basis = s["basis"]
    positions, parts = [], []
    for start, stop in zip(batch.column("start").to_pylist(), batch.column("stop").to_pylist()):
        for first, block in _chunks(s["reader"], start, stop):
            parts.append(sp.csr_matrix(basis.top_weights(block, s["recipe"])[:, basis.columns]))
            positions.append(np.arange(first, first + block.shape[0], dtype=np.int64))
    genes, weights = weight_lists(sp.vstack(parts, format="csr"))
    return pa.table({"row": np.concatenate(positions), "top_genes": genes, "top_weights": weights})


def top_gene_weights(
    source: ExpressionSource, basis, recipe, *, ray=True
) -> tuple[sp.csr_matrix, list[pa.Table]]:
    """Each cell's top-N genes and weights (cells x the matched columns `basis.columns`,
    folded columns summed into theirs: `GeneBasis.top_weights`), computed by Ray workers,
    as `weights_matrix(...)[:, basis.columns]` computes them in one process.

    Returns the matrix and the blocks it came from (Arrow tables with `row`,
    `top_genes`, `top_weights`), which `write_atlas` hands back to the workers."""
    ray = init_ray(ray)
    t0 = time.perf_counter()
    shared = ray.put({"reader": _reader(source, ray), "basis": basis, "recipe": recipe})
    tables = []
    with (
        ordered_data(ray),
        progress(total=source.n_obs, desc="top genes (ray)", unit="cell") as bar,
    ):
        ds, n_shards = _shard_dataset(ray, source.n_obs)
        log.info(
            "Top genes of %s cells in %d shards on Ray (%d CPUs)",
            f"{source.n_obs:,}",
            n_shards,
            cluster_cpus(ray),
        )
        ds = ds.map_batches(
            _weights_batch, batch_size=None, batch_format="pyarrow", fn_kwargs={"shared": shared}
        )
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            tables.append(table)
            bar.update(len(table))
    tables = [t for t in tables if len(t)]
    rows = np.concatenate([t.column("row").to_numpy() for t in tables])
    if len(rows) != source.n_obs or (np.diff(rows) != 1).any():
        raise CellvecError(
            f"Ray returned {len(rows):,} of {source.n_obs:,} cells out of order: a worker "
            "failed or the cluster lost blocks. Run again, or without --ray."
        )
    w = sp.vstack([weight_matrix(t, len(basis.columns)) for t in tables], format="csr")
    log.info("Top genes of %s cells in %.1f s", f"{source.n_obs:,}", time.perf_counter() - t0)
    return w, tables


# -- stage 2: final vectors, written as Lance fragments -------------------------
class _AtlasRows:
    """Turns blocks of top-gene weights into rows of the atlas table (a worker's part)."""

    def __init__(self, shared, schema: pa.Schema):
        self.shared, self.schema = shared, schema

    def vectors(self, table: pa.Table) -> np.ndarray:
        s = _shared(self.shared)
        if "vector" in table.column_names:
            return fixed_size_rows(table.column("vector"))
        return encode_weights(weight_matrix(table, len(s["basis"])), s["basis"], s["params"])

    def with_vector(self, table: pa.Table) -> pa.Table:
        v = self.vectors(table)
        return table.append_column(
            "vector", pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
        )

    def __call__(self, table: pa.Table) -> pa.Table:
        s = _shared(self.shared)
        rows = pa.array(table.column("row").to_numpy())
        genes = table.column("top_genes").combine_chunks()
        weights = table.column("top_weights").combine_chunks()
        return atlas_table(
            self.schema,
            cell_ids=s["cell_id"].take(rows),
            labels=s["label"].take(rows),
            batches=s["batch"].take(rows),
            dataset=s["dataset"],
            vectors=self.vectors(table),
            top_genes=genes,
            top_weights=weights,
            calibration=s["calibration"].take(rows),
            broad_labels=None if s["label_broad"] is None else s["label_broad"].take(rows),
        )


@contextlib.contextmanager
def _no_debris(uri: str):
    """A new local table whose write fails leaves no directory behind."""
    new = "://" not in uri and not os.path.exists(uri)
    try:
        yield
    except BaseException:
        if new:
            shutil.rmtree(uri, ignore_errors=True)
        raise


def write_atlas(
    uri: str,
    schema: pa.Schema,
    blocks: list[pa.Table],
    *,
    basis: np.ndarray,
    params: dict,
    cell_ids,
    labels,
    batches,
    dataset: str,
    broad_labels=None,
    calibrate=None,
    storage_options: dict | None = None,
    ray=True,
) -> None:
    """Write the atlas table at `uri` from the weight blocks of `top_gene_weights`: Ray
    workers compute the final vectors (`encode_weights` over `basis` and the fitted
    `params`) and write Lance fragments; the driver commits them in one overwrite.

    `calibrate(vectors) -> self_similarity`, when given, needs every vector: they are
    computed first, gathered and handed to it, and the fragments written after. A failed
    write commits nothing (and leaves no directory behind when the table is new)."""
    import lance

    ray = init_ray(ray)
    t0 = time.perf_counter()
    n = len(cell_ids)
    shared = {
        "basis": np.ascontiguousarray(basis, dtype=np.float32),
        "params": params,
        "cell_id": pa.array(list(cell_ids), pa.string()),
        "label": pa.array([str(x) for x in labels], pa.string()),
        "batch": pa.array([str(b) for b in batches], pa.string()),
        "dataset": dataset,
        "calibration": pa.array(np.full(n, np.nan, dtype=np.float32)),
        "label_broad": None
        if broad_labels is None
        else pa.array([str(x) for x in broad_labels], pa.string()),
    }
    with _no_debris(uri):
        fragments = _write_fragments(uri, schema, blocks, ray, shared, calibrate, storage_options)
        written = sum(f.physical_rows for f in fragments)
        if written != n:
            raise CellvecError(
                f"Ray workers wrote {written:,} of {n:,} atlas rows; nothing was committed. "
                "Run again, or without --ray."
            )
        lance.LanceDataset.commit(
            uri, lance.LanceOperation.Overwrite(schema, fragments), storage_options=storage_options
        )
    log.info(
        "Atlas table: %s rows in %d fragments written by Ray workers, committed once (%.1f s)",
        f"{n:,}",
        len(fragments),
        time.perf_counter() - t0,
    )


def _write_fragments(uri, schema, blocks, ray, shared, calibrate, storage_options) -> list:
    """The Lance fragments the workers wrote, not yet committed (after `calibrate` had
    every vector, when given)."""
    from lance_ray import LanceFragmentWriter

    n = len(shared["cell_id"])
    with ordered_data(ray):
        ds = ray.data.from_arrow(blocks)
        if calibrate is not None:
            rows = _AtlasRows(ray.put(shared), schema)
            ds = ds.map_batches(
                rows.with_vector, batch_size=None, batch_format="pyarrow"
            ).materialize()
            vectors = np.concatenate(
                [
                    fixed_size_rows(t.column("vector"))
                    for t in ds.iter_batches(batch_size=None, batch_format="pyarrow")
                ]
            )
            shared["calibration"] = pa.array(np.asarray(calibrate(vectors), dtype=np.float32))
        writer = LanceFragmentWriter(
            uri,
            transform=_AtlasRows(ray.put(shared), schema),
            schema=schema,
            data_storage_version="stable",  # what LanceDB writes (and no deprecation warning)
            storage_options=storage_options,
        )
        fragments = []
        with progress(total=n, desc="atlas fragments (ray)", unit="cell") as bar:
            out = ds.map_batches(writer, batch_size=None, batch_format="pyarrow")
            for table in out.iter_batches(batch_size=None, batch_format="pyarrow"):
                for blob in table.column("fragment").to_pylist():
                    frag = pickle.loads(blob)
                    fragments.append(frag)
                    bar.update(frag.physical_rows)
    return fragments


# -- query vectors ------------------------------------------------------------
def _vectors_batch(batch: pa.Table, shared) -> pa.Table:
    s = _shared(shared)
    positions, parts = [], []
    for start, stop in zip(batch.column("start").to_pylist(), batch.column("stop").to_pylist()):
        for first, block in _chunks(s["reader"], start, stop):
            parts.append(apply_head(s["params"], aggregate(block, s["basis"], s["recipe"])))
            positions.append(np.arange(first, first + block.shape[0], dtype=np.int64))
    v = np.concatenate(parts)
    return pa.table(
        {
            "row": np.concatenate(positions),
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1]),
        }
    )


def encode_cells(
    source: ExpressionSource, encoder, basis, *, ray=True, head: bool = True
) -> np.ndarray:
    """`encoder.encode(source, basis)` (`encoder.unrefined` without the `head`), computed
    by Ray workers shard by shard and gathered in cell order on the driver."""
    ray = init_ray(ray)
    t0 = time.perf_counter()
    basis.full  # noqa: B018  (computed once here, not in every worker)
    shared = ray.put(
        {
            "reader": _reader(source, ray),
            "basis": basis,
            "recipe": encoder.recipe,
            "params": encoder.refinement if head else {},
        }
    )
    out = None
    seen = 0
    with (
        ordered_data(ray),
        progress(total=source.n_obs, desc="cell vectors (ray)", unit="cell") as bar,
    ):
        ds, n_shards = _shard_dataset(ray, source.n_obs)
        ds = ds.map_batches(
            _vectors_batch, batch_size=None, batch_format="pyarrow", fn_kwargs={"shared": shared}
        )
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            if not len(table):
                continue
            v = fixed_size_rows(table.column("vector"))
            if out is None:
                out = np.empty((source.n_obs, v.shape[1]), dtype=np.float32)
            out[table.column("row").to_numpy()] = v
            seen += len(table)
            bar.update(len(table))
    if seen != source.n_obs:
        raise CellvecError(
            f"Ray returned vectors for {seen:,} of {source.n_obs:,} cells: a worker failed "
            "or the cluster lost blocks. Run again, or without --ray."
        )
    log.info(
        "Vectors of %s cells in %d shards on Ray in %.1f s",
        f"{source.n_obs:,}",
        n_shards,
        time.perf_counter() - t0,
    )
    return out
