"""A gene table's layout: its columns, Arrow schema and name, its content hash, and
vectors that only some rows carry (an atlas bundle's gene table). The Lance plumbing
every table of a store shares (list, replace in one commit, metadata) is `storage`'s."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa

from cellvec.errors import StoreError
from cellvec.gene_store.embedders import model_slug
from cellvec.storage import META_KEY

GENE_COLUMNS = [
    "gene_id",
    "symbol",
    "synonyms",
    "ensembl_id",
    "tax_id",
    "full_name",
    "type_of_gene",
]


def table_name(model: str) -> str:
    """The gene table of `model` in a store: `genes_<model slug>`."""
    return f"genes_{model_slug(model)}"


def gene_schema(dim: int, meta: dict | None = None) -> pa.Schema:
    """The Arrow schema of a gene table of `dim`-long vectors, `meta` in its metadata."""
    fields = [
        pa.field("gene_id", pa.int64()),
        pa.field("symbol", pa.string()),
        pa.field("synonyms", pa.list_(pa.string())),
        pa.field("ensembl_id", pa.string()),
        pa.field("tax_id", pa.int64()),
        pa.field("full_name", pa.string()),
        pa.field("type_of_gene", pa.string()),
        pa.field("go_terms", pa.list_(pa.string())),
        pa.field("text", pa.string()),
        pa.field("text_hash", pa.string()),
        pa.field("vector", pa.list_(pa.float32(), dim)),
    ]
    return pa.schema(fields, metadata={META_KEY: json.dumps(meta).encode()} if meta else None)


def gene_arrow(df: pl.DataFrame, vectors: np.ndarray, meta: dict | None) -> pa.Table:
    """Gene columns `df` (GO terms as one list, or as the three `go_*` lists of
    `sources.read_gene2go`) and their `vectors` as one Arrow table of `gene_schema`."""
    dim = vectors.shape[1]
    if "go_terms" not in df.columns:
        go_cols = [c for c in ("go_function", "go_process", "go_component") if c in df.columns]
        go = (
            pl.concat_list(
                [pl.col(c).fill_null(pl.lit([], dtype=pl.List(pl.String))) for c in go_cols]
            )
            if go_cols
            else pl.lit([], dtype=pl.List(pl.String))
        )
        df = df.with_columns(go.alias("go_terms"))
    cols = df.select(GENE_COLUMNS + ["go_terms", "text", "text_hash"]).to_arrow()
    vec = pa.FixedSizeListArray.from_arrays(
        pa.array(np.ascontiguousarray(vectors, dtype=np.float32).ravel()), dim
    )
    schema = gene_schema(dim, meta)
    arrays = [cols.column(f.name).cast(f.type) for f in schema if f.name != "vector"] + [vec]
    return pa.Table.from_arrays(arrays, schema=schema)


def content_hash(symbols: list[str], vectors: np.ndarray) -> str:
    """What a gene table holds, as a digest: recipes name it, so a changed store is noticed."""
    import hashlib

    h = hashlib.sha256("\x1f".join(symbols).encode())
    h.update(np.ascontiguousarray(vectors, dtype=np.float32).tobytes())
    return h.hexdigest()[:24]


def restricted_vectors(vec: pa.Array, dim: int) -> np.ndarray:
    """Genes x `dim` from a list column where only some genes carry a vector (an atlas
    bundle's gene table keeps every gene's names but only the atlas's genes' vectors); the
    others are zero rows, which no atlas of that bundle ever uses."""
    lengths = vec.value_lengths().fill_null(0).to_numpy(zero_copy_only=False)
    if not np.isin(lengths, (0, dim)).all():
        raise StoreError(f"A gene table's vectors are neither {dim} long nor empty.")
    mat = np.zeros((len(vec), dim), dtype=np.float32)
    mat[lengths == dim] = vec.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return mat
