"""The service's mapping path: request bodies in, one encode and one search per batch, answers out.

A request becomes a `MapJob` (log-normalised cells over a gene list, read exactly
as `read_expression` reads an AnnData); `map_jobs` maps a batch of jobs with one
encode per gene list and one search, and each job gets its own `JobResult`, equal
to mapping that request alone. Bodies: JSON (`MapRequest`), Arrow IPC streams of a
long cell x gene table, or an h5ad upload; answers: JSON or Arrow IPC.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import chain

import numpy as np
import scipy.sparse as sp

from cellvec.errors import CellvecError
from cellvec.service.schemas import MAX_CELLS_PER_REQUEST

ARROW = "application/vnd.apache.arrow.stream"
ARROW_SCHEMA_DOC = (
    "Arrow IPC stream (`application/vnd.apache.arrow.stream`) of a long cell x gene table, "
    "one row per non-zero value: `cell_id` (string), `gene` (string, or dictionary<string> "
    "whose dictionary is the full gene list of the query, as a client sends it), `value` "
    "(float or integer; counts or log-normalised). Options go in the query string "
    "(`k`, `min_confidence`, `min_typicality`, `scores`, `vectors`). At most "
    f"{MAX_CELLS_PER_REQUEST:,} cells a request. With `Accept: {ARROW}` the answer is an Arrow "
    "IPC stream too: `cell_id`, `label`, `confidence`, `typicality`, `nearest_similarity`, "
    "`label_broad`, `confidence_broad` and `typicality_broad` for an atlas with broad labels, "
    "and with "
    "`scores=true` `scores` (fixed-size list of float32, one per class), with `vectors=true` "
    "`vector` (the cell vector); the schema metadata key `cellvec` holds JSON with `atlas`, "
    "`k`, `classes` (the order of `scores`), `vector_dimension`, `recipe` and, for an atlas "
    "with broad labels, `broad_label_key` and `broad_classes`."
)


@dataclass
class MapJob:
    """One request's cells, ready to map."""

    genes: list[str]
    x: sp.csr_matrix  # log-normalised, kept cells only
    ids: list[str]
    k: int | None = None  # None: the atlas's own (15, or what `atlas build --tune` chose)
    min_confidence: float = 0.0
    min_typicality: float = 0.0
    scores: bool = False
    vectors: bool = False

    @property
    def n_cells(self) -> int:
        return self.x.shape[0]


@dataclass
class JobResult:
    ids: list[str]
    labels: np.ndarray
    confidence: np.ndarray
    scores: np.ndarray
    similarity: np.ndarray  # to the nearest atlas cell
    vectors: np.ndarray
    typicality: np.ndarray
    k: int
    broad: tuple | None = None  # (labels, confidences, typicalities) of the broad level


def job_from_matrix(x, genes: list[str], ids: list[str], *, where="<request>", **options) -> MapJob:
    from cellvec.cell_index.readers import read_matrix

    x, rows, genes = read_matrix(x, genes, where)
    if len(rows) < len(ids):
        ids = [ids[i] for i in rows]
    return MapJob(genes, x, ids, **options)


def _array(values, kinds: str, what: str, cell_id: str) -> np.ndarray:
    if not isinstance(values, list):
        raise CellvecError(f"Cell {cell_id!r}: {what} must be a list.")
    try:
        arr = np.asarray(values) if values else np.zeros(0, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        arr = np.zeros((0, 0))  # ragged or unconvertible: reported below
    if arr.ndim != 1 or arr.dtype.kind not in kinds:
        raise CellvecError(
            f"Cell {cell_id!r}: {what} must be a flat list of {'integers' if kinds == 'iu' else 'numbers'}."
        )
    return arr


def _flat(lists, kinds: str) -> np.ndarray | None:
    """All cells' lists as one array, or None when any is not a flat list of the right kind."""
    try:
        arr = np.asarray(list(chain.from_iterable(lists)))
    except (ValueError, TypeError, OverflowError):
        return None
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in kinds):
        return None
    return arr


def cells_to_csr(cells, n_genes: int) -> sp.csr_matrix:
    """Sparse cells x genes matrix from request cells: one array for all cells, and a
    cell-by-cell check (naming the bad cell) only when that fails."""
    idx_lists = [c.indices for c in cells]
    val_lists = [c.values for c in cells]
    lens = np.fromiter(map(len, idx_lists), np.int64, len(cells))
    ok = all(isinstance(v, list) for v in chain(idx_lists, val_lists))
    ok = ok and np.array_equal(lens, np.fromiter(map(len, val_lists), np.int64, len(cells)))
    idx = _flat(idx_lists, "iu") if ok else None
    vals = _flat(val_lists, "iuf") if idx is not None else None
    if vals is None or (idx.size and (idx.min() < 0 or idx.max() >= n_genes)):
        for c in cells:  # raises with the first bad cell's id
            i = _array(c.indices, "iu", "indices", c.id)
            v = _array(c.values, "iuf", "values", c.id)
            if len(i) != len(v):
                raise CellvecError(f"Cell {c.id!r}: {len(i)} indices but {len(v)} values.")
            if len(i) and (i.min() < 0 or i.max() >= n_genes):
                raise CellvecError(f"Cell {c.id!r}: gene index out of range 0..{n_genes - 1}.")
        raise CellvecError("The cells' indices and values are not flat lists of numbers.")
    indptr = np.concatenate([[0], np.cumsum(lens)])
    x = sp.csr_matrix(
        (vals.astype(np.float32), idx.astype(np.int64), indptr), shape=(len(cells), n_genes)
    )
    x.sum_duplicates()
    return x


def job_from_json(body: bytes) -> MapJob:
    """A JSON body (`MapRequest`) as a job; pydantic's ValidationError on a bad body."""
    from cellvec.service.schemas import MapRequest

    req = MapRequest.model_validate_json(body)
    x = cells_to_csr(req.cells, len(req.genes))
    return job_from_matrix(
        x,
        req.genes,
        [c.id for c in req.cells],
        k=req.k,
        min_confidence=req.min_confidence,
        min_typicality=req.min_typicality,
        scores=req.scores,
        vectors=req.vectors,
    )


def job_from_arrow(body: bytes, **options) -> MapJob:
    """An Arrow IPC stream of a long table (cell_id, gene, value) as a job."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from cellvec.untrusted import check_arrow_stream

    check_arrow_stream(body)  # sizes from the metadata, before anything is decompressed
    try:
        reader = pa.ipc.open_stream(body)
        _check_arrow_schema(reader.schema)  # no type that expands when converted
        table = reader.read_all()
        table.validate(full=True)  # e.g. dictionary indices out of range
    except (pa.ArrowException, OSError, ValueError) as e:
        raise CellvecError(
            f"The body is not a valid Arrow IPC stream ({e}). {ARROW_SCHEMA_DOC}"
        ) from e
    if table.num_rows == 0:
        raise CellvecError("The Arrow table has no rows: send one row per non-zero value.")
    try:
        cells = _dictionary(table.column("cell_id"))
        gene = _dictionary(table.column("gene"))
        values = table.column("value").cast(pa.float32()).to_numpy()
    except (pa.ArrowException, ValueError, TypeError) as e:
        raise CellvecError(
            f"Arrow columns of the wrong type ({e}): cell_id string, gene string, value number."
        ) from e
    if gene.null_count or cells.null_count:
        raise CellvecError("The Arrow table has null cell ids or genes.")
    ids = cells.dictionary.to_pylist()
    _check_cells(len(ids))
    genes = gene.dictionary.to_pylist()
    rows = pc.fill_null(cells.indices, 0).to_numpy()
    cols = gene.indices.to_numpy()
    x = sp.csr_matrix((values, (rows, cols)), shape=(len(ids), len(genes)), dtype=np.float32)
    x.sum_duplicates()
    return job_from_matrix(x, genes, ids, **options)


def _check_arrow_schema(schema) -> None:
    """cell_id and gene: strings, or dictionaries of strings; value: a number. Anything
    else is refused before it is read: a view or a dictionary cast to plain strings
    repeats its data once per row (1 KB sent, 200 MB decoded)."""
    import pyarrow as pa

    def text(t):
        return pa.types.is_string(t) or pa.types.is_large_string(t)

    missing = {"cell_id", "gene", "value"} - set(schema.names)
    if missing:
        raise CellvecError(
            f"The Arrow table lacks column(s) {', '.join(sorted(missing))}; it has "
            f"{', '.join(schema.names) or 'none'}. It needs cell_id, gene, value."
        )
    for name in ("cell_id", "gene"):
        t = schema.field(name).type
        if not (text(t) or (pa.types.is_dictionary(t) and text(t.value_type))):
            raise CellvecError(f"Arrow column {name} is {t}; send string or dictionary<string>.")
    t = schema.field("value").type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t)):
        raise CellvecError(f"Arrow column value is {t}; send a float or integer column.")


def _dictionary(column):
    """A string or dictionary<string> column as one dictionary array (codes + the distinct
    values), never expanded to one string per row."""
    import pyarrow as pa

    if pa.types.is_dictionary(column.type):
        column = column.cast(pa.dictionary(pa.int32(), pa.string())).unify_dictionaries()
        return column.combine_chunks()
    return column.cast(pa.string()).combine_chunks().dictionary_encode()


def _check_cells(n: int) -> None:
    if n > MAX_CELLS_PER_REQUEST:
        raise CellvecError(
            f"{n:,} cells in one request; at most {MAX_CELLS_PER_REQUEST:,}: split them."
        )


def job_from_h5ad(data: bytes, **options) -> MapJob:
    """An uploaded .h5ad file as a job (read with `read_expression`, like `cellvec map`)."""
    import tempfile

    import anndata as ad

    from cellvec.cell_index.readers import read_expression
    from cellvec.untrusted import check_hdf5

    with tempfile.NamedTemporaryFile(suffix=".h5ad") as tmp:
        tmp.write(data)
        tmp.flush()
        # No external storage, links or virtual datasets, and the decoded size budgeted,
        # before anndata reads anything (or the upload could read the server's files).
        check_hdf5(tmp.name, where="The uploaded file")
        try:
            adata = ad.read_h5ad(tmp.name)
        except Exception as e:  # noqa: BLE001
            raise CellvecError(
                f"The upload is not a readable .h5ad file ({type(e).__name__}); "
                "send a file written by anndata (`adata.write_h5ad`)."
            ) from e
    _check_cells(adata.n_obs)
    src = read_expression(adata)
    return MapJob(src.var_names, src.to_csr(), src.obs_names, **options)


def map_jobs(atlas, jobs: list[MapJob]) -> list[JobResult | Exception]:
    """Map a batch of jobs: one encode per gene list, one search per reference (the atlas,
    or the atlas re-aggregated over a panel's genes), one vote per shared setting."""
    from cellvec.cell_index.mapping import FULL_COVERAGE
    from cellvec.cell_index.refine import apply_head
    from cellvec.cell_index.vectors import aggregate

    enc = atlas.encoder
    n_atlas_genes = len(enc.refinement.get("gene_rows", ()))
    out: list = [None] * len(jobs)
    groups: dict[tuple, list[int]] = {}
    calibrated = bool(np.isfinite(atlas.calibration).any())
    for i, job in enumerate(jobs):
        if job.min_typicality > 0 and not calibrated:
            out[i] = CellvecError(
                f"Atlas {atlas.name!r} has no held-out calibration cells: rebuild it with "
                "`cellvec atlas build ... --calibration-split 0.1` to use min_typicality."
            )
            continue
        groups.setdefault(tuple(job.genes), []).append(i)
    vecs: dict[int, np.ndarray] = {}
    target_of: dict[int, object] = {}  # job -> None (the atlas) or the panel's gene positions
    for members in groups.values():
        try:
            basis = enc.basis(jobs[members[0]].genes, "request")
            x = sp.vstack([jobs[i].x for i in members], format="csr")
            q = apply_head(enc.refinement, aggregate(x, basis, enc.recipe))
            panel = None
            partial = basis.positions is not None and len(basis.positions) < n_atlas_genes
            if partial and atlas.full().coverage(basis.positions) < FULL_COVERAGE:
                panel = basis.positions
        except CellvecError as e:
            for i in members:
                out[i] = e
            continue
        start = 0
        for i in members:
            vecs[i] = q[start : start + jobs[i].n_cells]
            target_of[i] = panel
            start += jobs[i].n_cells
    targets: dict[object, list[int]] = {}
    for i in sorted(vecs):
        key = None if target_of[i] is None else target_of[i].tobytes()
        targets.setdefault(key, []).append(i)
    for key, order in targets.items():
        broad_calibration = None
        if key is None:
            index, calibration = atlas.index, atlas.calibration
            if atlas.broad is not None:
                broad_calibration = atlas.broad["calibration"]
        else:
            _, index, calibration = atlas.full().vectors_over(target_of[order[0]])
            if atlas.broad is not None:
                broad_calibration = atlas.full().broad_calibration(target_of[order[0]])
        _map_group(atlas, jobs, order, vecs, index, calibration, broad_calibration, out)
    return out


def _map_group(atlas, jobs, order, vecs, index, calibration, broad_calibration, out) -> None:
    from cellvec.cell_index.mapping import assign_broad, assign_labels

    q = np.concatenate([vecs[i] for i in order]) if len(order) > 1 else vecs[order[0]]
    k_of = {i: jobs[i].k or atlas.k for i in order}
    idx, sim = index.search(q, max(k_of.values()))
    starts = np.cumsum([0] + [jobs[i].n_cells for i in order])
    rows_of = {i: slice(starts[j], starts[j + 1]) for j, i in enumerate(order)}
    votes: dict[tuple, list[int]] = {}  # one vote for the jobs that share their settings
    for i in order:
        votes.setdefault((k_of[i], jobs[i].min_confidence, jobs[i].min_typicality), []).append(i)
    for (k, min_confidence, min_typicality), members in votes.items():
        rows = np.concatenate([np.arange(rows_of[i].start, rows_of[i].stop) for i in members])
        scores, labels, conf, typical = assign_labels(
            q[rows],
            idx[rows, :k],
            sim[rows, :k],
            atlas.classes,
            atlas.codes,
            min_confidence,
            calibration=calibration,
            min_typicality=min_typicality,
        )
        broad = None
        if atlas.broad is not None:
            b = atlas.broad
            broad = assign_broad(
                q[rows],
                idx[rows, :k],
                sim[rows, :k],
                labels,
                atlas.classes,
                b["classes"],
                b["codes"],
                b["parent"],
                min_confidence,
                calibration=broad_calibration,
                min_typicality=min_typicality,
            )
        start = 0
        for i in members:
            n, sl = jobs[i].n_cells, rows_of[i]
            part = slice(start, start + n)
            start += n
            out[i] = JobResult(
                jobs[i].ids,
                labels[part],
                conf[part],
                scores[part],
                sim[sl, 0],
                q[sl],
                typical[part],
                k,
                None if broad is None else tuple(x[part] for x in broad),
            )


def render_json(atlas, job: MapJob, res: JobResult) -> bytes:
    import orjson

    conf = np.round(res.confidence.astype(np.float64), 4).tolist()
    labels = [str(v) for v in res.labels]
    typical = np.round(res.typicality.astype(np.float64), 4).tolist()
    cells = [
        {"id": i, "label": lab, "confidence": c, "typicality": t}
        for i, lab, c, t in zip(res.ids, labels, conf, typical)
    ]
    if res.broad is not None:
        b_labels, b_conf, b_typical = res.broad
        for cell, lab, c, t in zip(
            cells,
            [str(v) for v in b_labels],
            np.round(b_conf.astype(np.float64), 4).tolist(),
            np.round(b_typical.astype(np.float64), 4).tolist(),
        ):
            cell.update(label_broad=lab, confidence_broad=c, typicality_broad=t)
    if job.scores:
        classes = [str(c) for c in atlas.classes]
        rounded = np.round(res.scores, 4)
        for cell, row, raw in zip(cells, rounded.tolist(), res.scores):
            cell["scores"] = {classes[j]: row[j] for j in np.flatnonzero(raw > 0)}
    if job.vectors:
        for cell, v in zip(cells, res.vectors.tolist()):
            cell["vector"] = v
    return orjson.dumps(
        {"atlas": atlas.name, "n_cells": len(cells), "k": res.k, "cells": cells},
        option=orjson.OPT_SERIALIZE_NUMPY,
    )


def render_arrow(atlas, job: MapJob, res: JobResult) -> bytes:
    import pyarrow as pa

    cols = {
        "cell_id": pa.array(res.ids, pa.string()),
        "label": pa.array([str(v) for v in res.labels], pa.string()),
        "confidence": pa.array(res.confidence.astype(np.float32)),
        "typicality": pa.array(res.typicality.astype(np.float32)),
        "nearest_similarity": pa.array(res.similarity.astype(np.float32)),
    }
    if res.broad is not None:
        cols["label_broad"] = pa.array([str(v) for v in res.broad[0]], pa.string())
        cols["confidence_broad"] = pa.array(res.broad[1].astype(np.float32))
        cols["typicality_broad"] = pa.array(res.broad[2].astype(np.float32))
    if job.scores:
        s = np.ascontiguousarray(res.scores, dtype=np.float32)
        cols["scores"] = pa.FixedSizeListArray.from_arrays(pa.array(s.ravel()), s.shape[1])
    if job.vectors:
        v = np.ascontiguousarray(res.vectors, dtype=np.float32)
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
    meta = {
        "atlas": atlas.name,
        "k": res.k,
        "min_confidence": job.min_confidence,
        "min_typicality": job.min_typicality,
        "vector_dimension": int(res.vectors.shape[1]),
        "classes": [str(c) for c in atlas.classes],
        "recipe": atlas.recipe.to_dict(),
    }
    if atlas.broad is not None:
        meta["broad_label_key"] = atlas.meta.get("broad_label_key")
        meta["broad_classes"] = [str(c) for c in atlas.broad["classes"]]
    table = pa.table(cols).replace_schema_metadata({"cellvec": json.dumps(meta)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()
