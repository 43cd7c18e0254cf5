"""A client of `cellvec serve`: map cells through a running service, get a `MappingResult`.

    from cellvec import Client, map_cells
    res = Client("http://127.0.0.1:8000").map("query.h5ad", atlas="pbmc")
    res = map_cells("query.h5ad", Client("http://127.0.0.1:8000").atlas("pbmc"))  # the same
    res.write("mapped.h5ad")

A served atlas is a `RemoteAtlas`: `map_cells` calls it as it calls a local one, so the
options, the query's reading (kind detection, gene de-duplication, empty cells), the
truth metrics and the `MappingResult` are the same code. The query's cells travel in
chunks as Arrow IPC streams of log-normalised values; with the mixing test, which
judges the query as a whole, in one request. An ortholog table travels with each
request (its file's text, gzipped). Standard library HTTP only.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from cellvec._arrow import fixed_size_rows
from cellvec._progress import progress
from cellvec.cell_index.calls import Calls, MapOptions
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.readers import ExpressionSource
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.result import BroadCall, MappingResult
from cellvec.errors import CellvecError
from cellvec.metrics import UNASSIGNED

log = logging.getLogger(__name__)

ARROW = "application/vnd.apache.arrow.stream"
TOKEN_ENV = "CELLVEC_API_TOKEN"


class Client:
    """A `cellvec serve` at `url`; `token` (default $CELLVEC_API_TOKEN) for bearer auth."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 600.0):
        self.url = url.rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None = None, headers=None) -> tuple:
        headers = dict(headers or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.read(), resp.headers.get("content-type", "")
        except urllib.error.HTTPError as e:
            detail = e.read()
            try:
                message = json.loads(detail)["error"]
            except (ValueError, KeyError, TypeError):
                message = detail[:300].decode(errors="replace")
            raise CellvecError(f"{self.url}: {e.code} {message}") from None
        except urllib.error.URLError as e:
            raise CellvecError(
                f"Cannot reach the cellvec service at {self.url} ({e.reason}); "
                "start one with `cellvec serve --store DIR`."
            ) from None

    def atlases(self) -> list[dict]:
        """The service's atlases with their recipes and classes."""
        return json.loads(self._request("GET", "/v1/atlases")[0])["atlases"]

    def atlas(self, name: str, *, chunk_size: int = 5_000) -> RemoteAtlas:
        """The service's atlas `name`, to map onto with `map_cells`."""
        return RemoteAtlas(self, name, chunk_size=chunk_size)

    def map(self, query, *, atlas: str, chunk_size: int = 5_000, **options) -> MappingResult:
        """`map_cells(query, self.atlas(atlas), **options)`: the same options (`k`,
        `min_confidence`, `min_typicality`, `min_mixing`, `exclude_labels`, `orthologs`,
        `truth_key`, `broad_truth_key`, `label_map`, `cluster_key`, `recipe`) and result;
        cells travel `chunk_size` at a time (the whole query with `min_mixing`)."""
        return map_cells(query, self.atlas(atlas, chunk_size=chunk_size), **options)


class RemoteAtlas:
    """An atlas served by `cellvec serve`, called as `map_cells` calls a local one."""

    def __init__(self, client: Client, name: str, *, chunk_size: int = 5_000):
        self.client, self.name, self.chunk_size = client, name, chunk_size
        self._summary: dict | None = None

    def summary(self) -> dict:
        """What the service says of the atlas (`GET /v1/atlases`), asked once."""
        if self._summary is None:
            atlases = {a["name"]: a for a in self.client.atlases()}
            if self.name not in atlases:
                raise CellvecError(
                    f"{self.client.url}: no atlas {self.name!r}; atlases: "
                    f"{', '.join(atlases) or 'none'}."
                )
            self._summary = atlases[self.name]
        return self._summary

    @property
    def recipe(self) -> Recipe:
        return Recipe.from_dict(self.summary()["recipe"])

    @property
    def has_broad(self) -> bool:
        return self.summary().get("broad_classes") is not None

    def call(self, source: ExpressionSource, options: MapOptions, *, ray=None) -> Calls:
        """The service's calls for `source`'s cells, chunk by chunk."""
        if ray:
            raise CellvecError(
                "--ray computes vectors here; with --server the service does: give one of them."
            )
        n = source.n_obs
        chunk = n if options.min_mixing > 0 else self.chunk_size  # the test needs every cell
        path = f"/v1/atlases/{urllib.parse.quote(self.name)}/map?" + _query_string(options)
        orthologs = _ortholog_text(options)
        answer = _Answer(n)
        with progress(total=n, desc=f"mapping via {self.client.url}", unit="cell") as bar:
            for sl, block in source.chunks(max(chunk, 1)):
                if block.nnz:
                    body = _arrow_request(block, source.var_names, orthologs)
                    headers = {"Content-Type": ARROW, "Accept": ARROW}
                    try:
                        data, _ = self.client._request("POST", path, body, headers)
                    except CellvecError as e:
                        if options.min_mixing > 0 and " 413 " in str(e):
                            raise CellvecError(
                                f"{e} The mixing test judges the whole query, so it travels in "
                                "one request: map with --store, or without --min-mixing."
                            ) from None
                        raise
                    answer.add(sl.start, data)
                bar.update(sl.stop - sl.start)
        if answer.meta is None:
            raise CellvecError(f"{source.path}: no cells with any expression to map.")
        return answer.calls()


def _query_string(options: MapOptions) -> str:
    params = {
        "min_confidence": options.min_confidence,
        "min_typicality": options.min_typicality,
        "min_mixing": options.min_mixing,
        "scores": "true",
        "vectors": "true",
    }
    if options.k is not None:
        params["k"] = options.k
    if options.exclude_labels:
        params["exclude_labels"] = ",".join(options.exclude_labels)
    return urllib.parse.urlencode(params)


def _ortholog_text(options: MapOptions) -> bytes | None:
    """The ortholog table as it travels: its file's text, gzipped."""
    table = options.orthologs
    if table is None:
        return None
    if table.text is None:
        raise CellvecError(
            "This ortholog table has no text to send the service; read it from its file "
            "(`read_orthologs`) or pass the file's path."
        )
    import gzip

    return gzip.compress(table.text, mtime=0)


def _arrow_request(block, genes: list[str], orthologs: bytes | None) -> bytes:
    """A chunk of cells as the Arrow IPC stream the service reads (`service.mapping`)."""
    import pyarrow as pa

    coo = block.tocoo()
    table = pa.table(
        {  # cell ids are row numbers: unique even where obs names are not
            "cell_id": pa.array(coo.row.astype(np.int64)).cast(pa.string()),
            "gene": pa.DictionaryArray.from_arrays(
                pa.array(coo.col.astype(np.int32)), pa.array(genes, pa.string())
            ),
            "value": pa.array(coo.data.astype(np.float32)),
        }
    )
    if orthologs is not None:
        table = table.replace_schema_metadata({b"cellvec.orthologs": orthologs})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


class _Answer:
    """The service's answers for a query's chunks, gathered into one `Calls`; cells the
    service never saw (no expression) stay unassigned with zero confidence."""

    def __init__(self, n: int):
        self.n = n
        self.meta: dict | None = None
        self.labels = np.full(n, UNASSIGNED, dtype=object)
        self.confidence, self.typicality, self.similarity = np.zeros(n), np.zeros(n), np.zeros(n)
        self.mixing = self.scores = self.vectors = None
        self.broad = [np.full(n, UNASSIGNED, dtype=object), np.zeros(n), np.zeros(n)]

    def add(self, offset: int, data: bytes) -> None:
        import pyarrow as pa

        answer = pa.ipc.open_stream(data).read_all()
        if self.meta is None:
            self.meta = json.loads(answer.schema.metadata[b"cellvec"])
            self.scores = np.zeros((self.n, len(self.meta["classes"])))
            self.vectors = np.zeros((self.n, self.meta["vector_dimension"]), dtype=np.float32)
            if "mixing" in answer.column_names:
                self.mixing = np.ones(self.n)
        rows = offset + np.asarray(answer.column("cell_id").to_pylist(), dtype=int)
        self.labels[rows] = np.asarray(answer.column("label").to_pylist(), dtype=object)
        self.confidence[rows] = answer.column("confidence").to_numpy()
        self.typicality[rows] = answer.column("typicality").to_numpy()
        self.similarity[rows] = answer.column("nearest_similarity").to_numpy()
        self.scores[rows] = fixed_size_rows(answer.column("scores"))
        self.vectors[rows] = fixed_size_rows(answer.column("vector"))
        if self.mixing is not None:
            self.mixing[rows] = answer.column("mixing").to_numpy()
        if "label_broad" in answer.column_names:
            self.broad[0][rows] = answer.column("label_broad").to_pylist()
            self.broad[1][rows] = answer.column("confidence_broad").to_numpy()
            self.broad[2][rows] = answer.column("typicality_broad").to_numpy()

    def calls(self) -> Calls:
        meta = self.meta
        broad = None
        if meta.get("broad_classes") is not None:
            classes = np.asarray(meta["broad_classes"], dtype=object)
            broad = BroadCall(meta.get("broad_label_key"), classes, *self.broad)
        return Calls(
            self.labels,
            self.confidence,
            self.typicality,
            self.scores,
            self.similarity,
            self.vectors,
            int(meta["k"]),
            self.mixing,
            broad,
            classes=np.asarray(meta["classes"], dtype=object),
            coverage=float(meta.get("gene_coverage", 1.0)),
            excluded=list(meta.get("excluded_labels") or []),
            recipe=meta["recipe"],
            ontology_ids=meta.get("ontology_ids"),
        )
