"""A client of `cellvec serve`: map cells through a running service, get a `MappingResult`.

    from cellvec import Client
    res = Client("http://127.0.0.1:8000").map("query.h5ad", atlas="pbmc")
    res.write("mapped.h5ad")

The query is read locally exactly as `map_cells` reads it (same kind detection,
gene de-duplication and empty-cell rules), sent in chunks as Arrow IPC streams of
log-normalised values (no JSON round trip), and the answers (labels, confidences,
per-class scores, cell vectors) are assembled into the same `MappingResult` that
local mapping returns, so its exporters work. Standard library HTTP only.
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

from cellvec._arrow import fixed_size_rows
from cellvec.errors import CellvecError

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

    def map(
        self,
        query,
        *,
        atlas: str,
        k: int | None = None,
        min_confidence: float = 0.0,
        min_typicality: float = 0.0,
        orthologs=None,
        exclude_labels=(),
        truth_key: str | None = None,
        broad_truth_key: str | None = None,
        cluster_key: str | None = None,
        label_map: dict[str, str] | None = None,
        layer: str | None = None,
        use_raw: bool | None = None,
        gene_column: str | None = None,
        chunk_size: int = 5_000,
    ):
        """Map `query` (a path, an AnnData or an ExpressionSource) onto the service's `atlas`.

        Same arguments and result as `map_cells`; cells travel `chunk_size` at a time.
        Ortholog tables are applied by local mapping only (the service takes none yet).
        """
        import pyarrow as pa

        from cellvec._progress import progress
        from cellvec.cell_index.labels import labels_of, parse_labels
        from cellvec.cell_index.mapping import (
            BroadCall,
            MappingResult,
            cluster_values,
            truth_metrics,
        )
        from cellvec.cell_index.readers import read_expression
        from cellvec.metrics import UNASSIGNED

        if parse_labels(exclude_labels):
            raise CellvecError(
                "--exclude-labels is applied by local mapping only (the service takes no "
                "blocklist yet): map with --store, or rebuild the atlas with "
                "`cellvec atlas build --exclude-labels`."
            )
        if orthologs is not None:
            raise CellvecError(
                "--orthologs is applied by local mapping only: map with --store, or send the "
                "query with its genes renamed to the atlas's species."
            )
        t0 = time.perf_counter()
        source = read_expression(query, layer=layer, use_raw=use_raw, gene_column=gene_column)
        truth = labels_of(source, truth_key, label_map=label_map) if truth_key else None
        b_truth = labels_of(source, broad_truth_key) if broad_truth_key else None
        clusters = cluster_values(source, cluster_key) if cluster_key else None
        n = source.n_obs
        genes = pa.array(source.var_names, pa.string())
        options = {
            "min_confidence": min_confidence,
            "min_typicality": min_typicality,
            "scores": "true",
            "vectors": "true",
        }
        params = urllib.parse.urlencode({**options, **({"k": k} if k is not None else {})})
        path = f"/v1/atlases/{urllib.parse.quote(atlas)}/map?{params}"
        labels = np.full(n, UNASSIGNED, dtype=object)
        conf = np.zeros(n)
        typical = np.zeros(n)
        nearest = np.zeros(n)
        scores = vectors = meta = None
        broad_labels = np.full(n, UNASSIGNED, dtype=object)
        broad_conf, broad_typical = np.zeros(n), np.zeros(n)
        with progress(total=n, desc=f"mapping via {self.url}", unit="cell") as bar:
            for sl, block in source.chunks(chunk_size):
                coo = block.tocoo()
                if coo.nnz:
                    table = pa.table(
                        {  # cell ids are row numbers: unique even where obs names are not
                            "cell_id": pa.array(coo.row.astype(np.int64)).cast(pa.string()),
                            "gene": pa.DictionaryArray.from_arrays(
                                pa.array(coo.col.astype(np.int32)), genes
                            ),
                            "value": pa.array(coo.data.astype(np.float32)),
                        }
                    )
                    sink = pa.BufferOutputStream()
                    with pa.ipc.new_stream(sink, table.schema) as w:
                        w.write_table(table)
                    data, _ = self._request(
                        "POST",
                        path,
                        sink.getvalue().to_pybytes(),
                        {"Content-Type": ARROW, "Accept": ARROW},
                    )
                    answer = pa.ipc.open_stream(data).read_all()
                    if meta is None:
                        meta = json.loads(answer.schema.metadata[b"cellvec"])
                        scores = np.zeros((n, len(meta["classes"])))
                        vectors = np.zeros((n, meta["vector_dimension"]), dtype=np.float32)
                    rows = sl.start + np.asarray(answer.column("cell_id").to_pylist(), dtype=int)
                    labels[rows] = np.asarray(answer.column("label").to_pylist(), dtype=object)
                    conf[rows] = answer.column("confidence").to_numpy()
                    typical[rows] = answer.column("typicality").to_numpy()
                    nearest[rows] = answer.column("nearest_similarity").to_numpy()
                    scores[rows] = fixed_size_rows(answer.column("scores"))
                    vectors[rows] = fixed_size_rows(answer.column("vector"))
                    if "label_broad" in answer.column_names:
                        broad_labels[rows] = answer.column("label_broad").to_pylist()
                        broad_conf[rows] = answer.column("confidence_broad").to_numpy()
                        broad_typical[rows] = answer.column("typicality_broad").to_numpy()
                bar.update(sl.stop - sl.start)
        if meta is None:
            raise CellvecError(f"{source.path}: no cells with any expression to map.")
        classes = np.asarray(meta["classes"], dtype=object)
        metrics = truth_metrics(truth, labels, classes, atlas)
        broad = None
        if meta.get("broad_classes") is not None:
            b_classes = np.asarray(meta["broad_classes"], dtype=object)
            broad = BroadCall(
                key=meta.get("broad_label_key"),
                classes=b_classes,
                labels=broad_labels,
                confidence=broad_conf,
                typicality=broad_typical,
                truth=b_truth,
                metrics=truth_metrics(b_truth, broad_labels, b_classes, atlas),
            )
        elif broad_truth_key:
            raise CellvecError(
                f"Atlas {atlas!r} has one level of labels; --broad-truth-key needs an atlas "
                "built with `cellvec atlas build ... --broad-label-key KEY`."
            )
        secs = time.perf_counter() - t0
        log.info("Mapped %s cells onto %s via %s in %.1f s", f"{n:,}", atlas, self.url, secs)
        return MappingResult(
            atlas=atlas,
            cell_ids=source.obs_names,
            labels=labels,
            confidence=conf,
            classes=classes,
            scores=scores,
            vectors=vectors,
            neighbour_similarity=nearest,
            recipe=meta["recipe"],
            k=int(meta["k"]),
            min_confidence=min_confidence,
            typicality=typical,
            min_typicality=min_typicality,
            truth=truth,
            metrics=metrics,
            seconds=secs,
            broad=broad,
            cluster_key=cluster_key,
            clusters=clusters,
            source=source,
        )
