"""The service's mapping path: request bodies in, one encode and one search per batch, answers out.

A request becomes a `MapJob` (log-normalised cells over a gene list, read exactly
as `read_expression` reads an AnnData); `map_jobs` maps a batch of jobs with one
encode per gene list and one search, and each job gets its own `JobResult`, equal
to mapping that request alone. Bodies: JSON (`MapRequest`), Arrow IPC streams of a
long cell x gene table, or an h5ad upload; answers: JSON or Arrow IPC.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import scipy.sparse as sp

from cellvec.cell_index.calls import Calls, MapOptions, call_cells, search_allowed
from cellvec.cell_index.refine import apply_head
from cellvec.cell_index.result import ontology_ids
from cellvec.cell_index.vectors import aggregate
from cellvec.errors import CellvecError
from cellvec.service.schemas import MAX_CELLS_PER_REQUEST

log = logging.getLogger(__name__)

ARROW = "application/vnd.apache.arrow.stream"
ORTHOLOGS_KEY = b"cellvec.orthologs"
MAX_ORTHOLOG_BYTES = 64 * 1024 * 1024  # an ortholog table's text, decompressed
ARROW_SCHEMA_DOC = (
    "Arrow IPC stream (`application/vnd.apache.arrow.stream`) of a long cell x gene table, "
    "one row per non-zero value: `cell_id` (string), `gene` (string, or dictionary<string> "
    "whose dictionary is the full gene list of the query, as a client sends it), `value` "
    "(float or integer; counts or log-normalised). Options go in the query string "
    "(`k`, `min_confidence`, `min_typicality`, `min_mixing`, `exclude_labels` (comma-separated), "
    "`scores`, `vectors`); an ortholog table (the query's genes to the atlas's species) goes in "
    f"the schema metadata key `{ORTHOLOGS_KEY.decode()}`, as its file's text (gzipped or not). "
    "The mixing test judges the cells of one request as the whole query. At most "
    f"{MAX_CELLS_PER_REQUEST:,} cells a request. With `Accept: {ARROW}` the answer is an Arrow "
    "IPC stream too: `cell_id`, `label`, `confidence`, `typicality`, `nearest_similarity`, "
    "`label_broad`, `confidence_broad` and `typicality_broad` for an atlas with broad labels, "
    "`mixing` (the mixing test's p-value) with `min_mixing`, and with "
    "`scores=true` `scores` (fixed-size list of float32, one per class), with `vectors=true` "
    "`vector` (the cell vector); the schema metadata key `cellvec` holds JSON with `atlas`, "
    "`k`, the options, `classes` (the order of `scores`), `vector_dimension`, `recipe`, "
    "`gene_coverage`, `excluded_labels`, `ontology_ids` and, for an atlas with broad labels, "
    "`broad_label_key` and `broad_classes`."
)


@dataclass
class MapJob:
    """One request's cells, ready to map, with how to call them (`MapOptions`) and what to
    send back (`scores`, `vectors`)."""

    genes: tuple[str, ...]  # a tuple, made once: batches and plans are keyed by it
    x: sp.csr_matrix  # log-normalised, kept cells only
    ids: list[str]
    options: MapOptions = field(default_factory=MapOptions)
    scores: bool = False
    vectors: bool = False

    def __post_init__(self):
        self.genes = tuple(self.genes)

    @property
    def n_cells(self) -> int:
        return self.x.shape[0]


def map_options(
    *,
    k=None,
    min_confidence=0.0,
    min_typicality=0.0,
    min_mixing=0.0,
    exclude_labels=(),
    orthologs: bytes | None = None,
) -> MapOptions:
    """A request's options, its ortholog table's text parsed (`request_orthologs`)."""
    if not (k or min_confidence or min_typicality or min_mixing or exclude_labels or orthologs):
        return DEFAULT_OPTIONS  # most requests: nothing to check
    return MapOptions.of(
        k=k,
        min_confidence=min_confidence,
        min_typicality=min_typicality,
        min_mixing=min_mixing,
        exclude_labels=exclude_labels,
        orthologs=request_orthologs(orthologs) if orthologs else None,
    )


DEFAULT_OPTIONS = MapOptions()
_ORTHOLOGS: dict[str, object] = {}  # sha256 of a table's text -> the parsed table (a few)


def request_orthologs(data: bytes):
    """The ortholog table a request sends (its file's text, gzipped or not), parsed once per
    process however many requests send it; a compressed text is read up to
    `MAX_ORTHOLOG_BYTES`, so a small upload cannot expand to fill the server's memory."""
    import gzip
    import hashlib
    import io
    import zlib
    from pathlib import Path

    from cellvec.gene_store.orthologs import parse_orthologs

    key = hashlib.sha256(data).hexdigest()
    if key not in _ORTHOLOGS:
        if data[:2] == b"\x1f\x8b":
            try:
                with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
                    text = fh.read(MAX_ORTHOLOG_BYTES + 1)
            except (OSError, EOFError, zlib.error) as e:
                raise CellvecError(f"The request's ortholog table is not valid gzip ({e}).") from e
            if len(text) > MAX_ORTHOLOG_BYTES:
                raise CellvecError(
                    f"The request's ortholog table expands past {MAX_ORTHOLOG_BYTES:,} bytes; "
                    "send a table of two or three columns of gene symbols."
                )
        else:
            text = data
        table = parse_orthologs(text, Path("request-orthologs"))
        table.source = "the request's ortholog table"
        if len(_ORTHOLOGS) >= 4:
            _ORTHOLOGS.pop(next(iter(_ORTHOLOGS)))
        _ORTHOLOGS[key] = table
    return _ORTHOLOGS[key]


def job_from_matrix(
    x, genes: list[str], ids: list[str], *, where="<request>", options=None, **outputs
) -> MapJob:
    from cellvec.cell_index.readers import read_matrix

    x, rows, genes = read_matrix(x, genes, where)
    if len(rows) < len(ids):
        ids = [ids[i] for i in rows]
    return MapJob(genes, x, ids, options or MapOptions(), **outputs)


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
    return _as_sent(x)


def _as_sent(x: sp.csr_matrix) -> sp.csr_matrix:
    """`x` with its values in the order they were sent within each cell, duplicates summed.

    The order matters: where several genes tie for a cell's N-th place, `top_n_weights`
    keeps the one stored first, as local mapping does with the file's own order (an
    h5ad's columns are often stored unsorted). A client sending a file's cells in their
    stored order (`Client`) therefore gets the vectors `map_cells` gives. Only a cell
    listing a gene twice is put in column order, its values summed."""
    if x.has_canonical_format:  # sorted, no duplicates: the usual case, checked in O(nnz)
        return x
    y = x.sorted_indices()
    same_row = np.repeat(np.arange(y.shape[0]), np.diff(y.indptr))
    if np.any((np.diff(y.indices) == 0) & (np.diff(same_row) == 0)):
        y.sum_duplicates()
        return y
    return x


def job_from_json(body: bytes) -> MapJob:
    """A JSON body (`MapRequest`) as a job; pydantic's ValidationError on a bad body."""
    from cellvec.service.schemas import MapRequest

    req = MapRequest.model_validate_json(body)
    x = cells_to_csr(req.cells, len(req.genes))
    options = map_options(
        k=req.k,
        min_confidence=req.min_confidence,
        min_typicality=req.min_typicality,
        min_mixing=req.min_mixing,
        exclude_labels=req.exclude_labels,
        orthologs=req.orthologs.encode() if req.orthologs else None,
    )
    ids = [c.id for c in req.cells]
    return job_from_matrix(
        x, req.genes, ids, options=options, scores=req.scores, vectors=req.vectors
    )


def job_from_arrow(body: bytes, options: dict | None = None, **outputs) -> MapJob:
    """An Arrow IPC stream of a long table (cell_id, gene, value) as a job; `options` (the
    query string's, `map_options`) with the ortholog table of the schema metadata."""
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
    if len(rows) > 1 and np.any(rows[1:] < rows[:-1]):  # not grouped by cell (a client groups)
        order = np.argsort(rows, kind="stable")  # by cell, each cell's values as sent
        values, cols = values[order], cols[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(ids)))])
    x = sp.csr_matrix(
        (values, cols.astype(np.int64), indptr),
        shape=(len(ids), len(genes)),
        dtype=np.float32,
    )
    x = _as_sent(x)
    orthologs = (table.schema.metadata or {}).get(ORTHOLOGS_KEY)
    opts = map_options(**(options or {}), orthologs=orthologs)
    return job_from_matrix(x, genes, ids, options=opts, **outputs)


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


def job_from_h5ad(data: bytes, options: dict | None = None, **outputs) -> MapJob:
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
    src = read_expression(adata, label="The uploaded file")
    return MapJob(
        src.var_names, src.to_csr(), src.obs_names, map_options(**(options or {})), **outputs
    )


def map_jobs(atlas, jobs: list[MapJob]) -> list[Calls | Exception]:
    """Map a batch of jobs: one encode per gene list, one search per reference (the atlas,
    its cross-species view for jobs through orthologs, or either re-aggregated over a
    panel's genes), blocklist and species (`Reference.through`, `Reference.target`), one
    vote per shared setting; each job gets the `Calls` mapping it alone would give
    (`cell_index.calls`).
    A job with the mixing test is voted alone: the test judges its cells as one query."""
    out: list = [None] * len(jobs)
    refs: dict[int, object] = {}  # job -> the reference it is compared with
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        orthologs = job.options.orthologs
        try:
            ref = refs[i] = atlas.reference.through(orthologs)
        except Exception as e:  # noqa: BLE001 (the view failed to load: its jobs fail, no other)
            log.error("%s: its cross-species view could not be loaded: %r", atlas.name, e)
            out[i] = e
            continue
        try:
            if job.options.min_typicality > 0:
                ref.require_calibration()
            ref.allowed(job.options.exclude_labels)
        except CellvecError as e:
            out[i] = e
            continue
        key = (tuple(job.genes), orthologs.digest if orthologs is not None else None)
        groups.setdefault(key, []).append(i)
    encoded: dict[int, tuple] = {}  # job -> (plan, vectors, vectors before the head)
    for members in groups.values():
        first, ref = jobs[members[0]], refs[members[0]]
        try:
            plan = ref.plan(first.genes, "request", first.options.orthologs)
            x = sp.vstack([jobs[i].x for i in members], format="csr")
            unrefined = aggregate(x, plan.basis, ref.recipe)
            q = apply_head(ref.encoder.refinement, unrefined)
        except CellvecError as e:
            for i in members:
                out[i] = e
            continue
        mixing = any(jobs[i].options.min_mixing > 0 for i in members)
        start = 0
        for i in members:
            rows = slice(start, start + jobs[i].n_cells)
            encoded[i] = (plan, q[rows], unrefined[rows] if mixing else None)
            start += jobs[i].n_cells
    searches: dict[tuple, list[int]] = {}
    for i in sorted(encoded):
        panel = encoded[i][0].panel
        options = jobs[i].options  # another species: its own view and typicality
        key = (
            None if panel is None else panel.tobytes(),
            options.exclude_labels,
            options.orthologs is not None,
        )
        searches.setdefault(key, []).append(i)
    for order in searches.values():
        _map_group(refs[order[0]], jobs, order, encoded, out)
    return out


def _map_group(ref, jobs, order, encoded, out) -> None:
    """Jobs compared with one reference past one blocklist, of one species or another:
    one search, then one vote per setting (`call_cells`)."""
    plan = encoded[order[0]][0]
    target = ref.target(plan.panel, other_species=jobs[order[0]].options.orthologs is not None)
    excluded, allowed = ref.allowed(jobs[order[0]].options.exclude_labels)
    q = np.concatenate([encoded[i][1] for i in order]) if len(order) > 1 else encoded[order[0]][1]
    k_of = {i: jobs[i].options.k or ref.k for i in order}
    idx, sim = search_allowed(target.index, q, max(k_of.values()), allowed)
    starts = np.cumsum([0] + [jobs[i].n_cells for i in order])
    rows_of = {i: np.arange(starts[j], starts[j + 1]) for j, i in enumerate(order)}
    votes: dict[tuple, list[int]] = {}  # one vote for the jobs that share their settings
    for i in order:
        o = jobs[i].options
        key = (k_of[i], o.min_confidence, o.min_typicality, i if o.min_mixing > 0 else None)
        votes.setdefault(key, []).append(i)
    for (k, *_), members in votes.items():
        rows = np.concatenate([rows_of[i] for i in members])
        options = jobs[members[0]].options
        mixing = None
        if options.min_mixing > 0:
            mixing = ref.mixing(plan.panel, encoded[members[0]][2], options.min_mixing)
        calls = call_cells(
            ref.labels,
            target,
            q[rows],
            (idx[rows, :k], sim[rows, :k]),
            options,
            mixing=mixing,
            class_sizes=ref.class_sizes,
        )
        calls.classes, calls.excluded, calls.recipe = (
            ref.labels.classes,
            excluded,
            ref.recipe_dict,
        )
        calls.ontology_ids = ontology_ids(ref.meta)
        start = 0
        for i in members:
            n = jobs[i].n_cells
            out[i] = calls.rows(slice(start, start + n))
            out[i].coverage = encoded[i][0].coverage
            start += n


def _rounded(a: np.ndarray) -> list:
    return np.round(a.astype(np.float64), 4).tolist()


def render_json(atlas, job: MapJob, res: Calls) -> bytes:
    import orjson

    labels = [str(v) for v in res.labels]
    cells = [
        {"id": i, "label": lab, "confidence": c, "typicality": t}
        for i, lab, c, t in zip(job.ids, labels, _rounded(res.confidence), _rounded(res.typicality))
    ]
    if res.mixing is not None:
        for cell, p in zip(cells, _rounded(res.mixing)):
            cell["mixing"] = p
    if res.broad is not None:
        b = res.broad
        for cell, lab, c, t in zip(
            cells, [str(v) for v in b.labels], _rounded(b.confidence), _rounded(b.typicality)
        ):
            cell.update(label_broad=lab, confidence_broad=c, typicality_broad=t)
    if job.scores:
        classes = [str(c) for c in res.classes]
        rounded = np.round(res.scores, 4)
        for cell, row, raw in zip(cells, rounded.tolist(), res.scores):
            cell["scores"] = {classes[j]: row[j] for j in np.flatnonzero(raw > 0)}
    if job.vectors:
        for cell, v in zip(cells, res.vectors.tolist()):
            cell["vector"] = v
    answer = {"atlas": atlas.name, "n_cells": len(cells), "k": res.k, "cells": cells}
    if res.coverage < 1.0:
        answer["gene_coverage"] = round(res.coverage, 4)
    if res.excluded:
        answer["excluded_labels"] = res.excluded
    return orjson.dumps(answer, option=orjson.OPT_SERIALIZE_NUMPY)


def render_arrow(atlas, job: MapJob, res: Calls) -> bytes:
    import pyarrow as pa

    cols = {
        "cell_id": pa.array(job.ids, pa.string()),
        "label": pa.array([str(v) for v in res.labels], pa.string()),
        "confidence": pa.array(res.confidence.astype(np.float32)),
        "typicality": pa.array(res.typicality.astype(np.float32)),
        "nearest_similarity": pa.array(res.similarity.astype(np.float32)),
    }
    if res.mixing is not None:
        cols["mixing"] = pa.array(res.mixing.astype(np.float64))
    if res.broad is not None:
        cols["label_broad"] = pa.array([str(v) for v in res.broad.labels], pa.string())
        cols["confidence_broad"] = pa.array(res.broad.confidence.astype(np.float32))
        cols["typicality_broad"] = pa.array(res.broad.typicality.astype(np.float32))
    if job.scores:
        s = np.ascontiguousarray(res.scores, dtype=np.float32)
        cols["scores"] = pa.FixedSizeListArray.from_arrays(pa.array(s.ravel()), s.shape[1])
    if job.vectors:
        v = np.ascontiguousarray(res.vectors, dtype=np.float32)
        cols["vector"] = pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), v.shape[1])
    o = job.options
    meta = {
        "atlas": atlas.name,
        "k": res.k,
        "min_confidence": o.min_confidence,
        "min_typicality": o.min_typicality,
        "min_mixing": o.min_mixing,
        "vector_dimension": int(res.vectors.shape[1]),
        "classes": [str(c) for c in res.classes],
        "recipe": res.recipe,
        "gene_coverage": res.coverage,
        "excluded_labels": res.excluded,
        "ontology_ids": res.ontology_ids,
    }
    if res.broad is not None:
        meta["broad_label_key"] = res.broad.key
        meta["broad_classes"] = [str(c) for c in res.broad.classes]
    table = pa.table(cols).replace_schema_metadata({"cellvec": json.dumps(meta)})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()
