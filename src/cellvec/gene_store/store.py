"""The gene tables of a store (`storage.Store`): one LanceDB table per model.

Table `genes_<model>` holds one row per gene (gene_id, symbol, synonyms,
ensembl_id, tax_id, full_name, type_of_gene, text, text_hash, vector); its schema
metadata (key `cellvec`) records model, dimension, template version, species,
source files and build time, and `complete: true`.

Builds are incremental and resumable. Vectors are first appended, batch by batch,
to a staging table `_building_<model>` (each append is one atomic Lance commit,
so `kill -9` loses at most the batch in flight); the final table is then written
in one commit. A reader therefore never sees a half-built table, a rebuild embeds
only genes whose text changed, and a killed build picks up where it stopped.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from cellvec._progress import progress
from cellvec.errors import EmbedderError, StoreError
from cellvec.gene_store.embedders import Embedder, get_embedder
from cellvec.gene_store.sources import (
    TAX_NAMES,
    read_gene2go,
    read_gene_info,
    read_summaries,
    read_vectors,
    tax_id_for,
)
from cellvec.gene_store.tables import (
    content_hash,
    gene_arrow,
    restricted_vectors,
    table_name,
)
from cellvec.gene_store.text import TEMPLATE_VERSION, compose_texts
from cellvec.storage import Store, StoreLocation, read_meta

log = logging.getLogger(__name__)

STORE_VERSION = 1
STAGING_PREFIX = "_building_"


@dataclass
class GeneTable:
    """A loaded gene table: gene columns (polars) and unit vectors (genes x dim)."""

    model: str
    genes: pl.DataFrame
    vectors: np.ndarray
    meta: dict

    @property
    def dimension(self) -> int:
        return self.vectors.shape[1]


@dataclass
class BuildResult:
    """What a store build did."""

    store: str
    table: str
    model: str
    n_genes: int
    n_embedded: int
    n_reused: int
    seconds: float
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            k: getattr(self, k)
            for k in ("store", "table", "model", "n_genes", "n_embedded", "n_reused", "seconds")
        }


class GeneStore:
    """The gene tables of a store (`genes_<model>`): which models it has, a model's table
    loaded (cached per table version), the genes nearest a text or a gene. `store` is the
    whole store (`cellvec.storage.Store`), through which atlases, mappings and artifacts
    are reached; a path or URI opens one."""

    def __init__(self, store: Store | str | Path | StoreLocation, *, create: bool = False):
        self.store = Store.of(store, create=create)
        self.path = self.store.path  # what messages name: the directory or the URI
        self._cache: dict[str, tuple[int, GeneTable]] = {}

    def models(self) -> list[str]:
        """Models with a complete gene table in this store."""
        out = []
        for name in self.store.table_names():
            if name.startswith("genes_"):
                meta = read_meta(self.store.db.open_table(name))
                if meta.get("complete"):
                    out.append(meta["model"])
        return out

    def resolve_model(self, model: str | None) -> str:
        """The store's spec for a model name (`genept` finds an imported `precomputed:genept`)."""
        if model is None:
            return self.default_model()
        names = self.store.table_names()
        if table_name(model) not in names and table_name(f"precomputed:{model}") in names:
            return f"precomputed:{model}"
        return model

    def default_model(self) -> str:
        """`minilm` when its table is complete, else the first complete model."""
        minilm = table_name("minilm")
        names = self.store.table_names()
        if minilm in names and read_meta(self.store.db.open_table(minilm)).get("complete"):
            return "minilm"
        models = self.models()
        if not models:
            raise StoreError(
                f"The gene store {self.path} has no complete gene table: run `cellvec genes build`."
            )
        return models[0]

    def load(self, model: str | None = None, *, every_gene: bool = False) -> GeneTable:
        """The complete gene table of `model` (default: the store's default model).

        A table that came with an atlas bundle has vectors for that atlas's genes only
        (`restricted` in its metadata): enough to map onto the atlas, not to build one.
        `every_gene` (building) refuses it, naming the command that builds the full one."""
        model = self.resolve_model(model)
        name = table_name(model)
        tbl = self.store.open_table(name)
        meta = read_meta(tbl) if tbl is not None else {}
        if tbl is None or not meta.get("complete"):
            have = ", ".join(self.models()) or "none"
            raise StoreError(
                f"The gene store {self.path} has no complete table for model {model!r} "
                f"(models here: {have}). Build it with `cellvec genes build --model {model} --store {self.path}`."
            )
        part = meta.get("restricted")
        if every_gene and part:
            raise StoreError(
                f"The {model} gene table of {self.path} came with an atlas bundle: it has "
                f"vectors for {part['genes_with_vectors']:,} of its {part['n_genes']:,} genes "
                "only (the bundle's atlas's), so an atlas built on it would miss the others. "
                f"Build the full table first: `cellvec genes build --model {model} --store "
                f"{self.path} ...`."
            )
        version = tbl.version
        cached = self._cache.get(name)
        if cached and cached[0] == version:
            return cached[1]
        arrow = tbl.to_arrow()
        vec = arrow.column("vector").combine_chunks()
        if pa.types.is_fixed_size_list(vec.type):
            mat = (
                vec.flatten()
                .to_numpy(zero_copy_only=False)
                .reshape(len(arrow), -1)
                .astype(np.float32, copy=False)
            )
        else:
            mat = restricted_vectors(vec, int(meta["dimension"]))
        genes = pl.from_arrow(arrow.drop_columns(["vector"]))
        gt = GeneTable(model=meta["model"], genes=genes, vectors=mat, meta=meta)
        self._cache[name] = (version, gt)
        return gt

    # -- search -----------------------------------------------------------
    def search(
        self,
        query: str | None = None,
        *,
        gene: str | None = None,
        model: str | None = None,
        k: int = 10,
        embedder: Embedder | None = None,
    ) -> pl.DataFrame:
        """Genes nearest (cosine) to a free-text query or to a gene of the store."""
        gt = self.load(model)
        if (query is None) == (gene is None):
            raise StoreError("Give either a free-text query or a gene symbol (not both).")
        if gene is not None:
            from cellvec.gene_store.resolve import match_genes

            rows = match_genes([gene], gt.genes).rows
            if rows[0] < 0:
                raise StoreError(
                    f"Gene {gene!r} is not in the {gt.model} table of {self.path} (by symbol, synonym or Ensembl id)."
                )
            qvec = gt.vectors[rows[0]]
            exclude = rows[0]
        else:
            if embedder is None:
                try:
                    embedder = get_embedder(gt.model)
                except EmbedderError as e:
                    raise StoreError(
                        f"Free-text search needs the model that made the {gt.model!r} table ({e}). "
                        "Search by --gene instead, or give the query model explicitly."
                    ) from e
            qvec = embedder.embed([query])[0]
            exclude = -1
        sims = gt.vectors @ qvec
        if exclude >= 0:
            sims[exclude] = -np.inf
        k = min(k, len(sims) - (exclude >= 0))
        top = np.argpartition(-sims, k - 1)[:k] if k < len(sims) else np.arange(len(sims))
        top = top[np.argsort(-sims[top])]
        return (
            gt.genes[top.tolist()]
            .select("symbol", "gene_id", "full_name", "text")
            .with_columns(pl.Series("similarity", sims[top].astype(np.float64)))
            .with_row_index("rank", offset=1)
        )


# -- building ---------------------------------------------------------------
def _file_info(path) -> dict:
    p = Path(path)
    st = p.stat()
    return {"path": str(p.resolve()), "bytes": st.st_size, "mtime": int(st.st_mtime)}


def build_gene_store(
    gene_info: str | Path,
    *,
    store: str | Path,
    species: str,
    model: str = "minilm",
    gene2go: str | Path | None = None,
    summaries: str | Path | None = None,
    summary_symbol_column: str | None = None,
    summary_text_column: str | None = None,
    embedder: Embedder | None = None,
    batch_size: int = 512,
    ray: str | bool | None = None,
) -> BuildResult:
    """Embed every gene of a species into the store's table for `model`.

    Incremental (only genes whose text is new or changed are embedded) and
    resumable (a killed build continues from its staging table). `ray` (True for a
    local cluster, or an address: see `cellvec._ray`) spreads the batches over Ray
    workers, each with its own copy of the model; the table is the same.
    """
    t0 = time.perf_counter()
    tax = tax_id_for(species)
    genes = read_gene_info(gene_info, species=species)
    go = read_gene2go(gene2go, tax_id=tax) if gene2go else None
    summ = (
        read_summaries(
            summaries, symbol_column=summary_symbol_column, text_column=summary_text_column
        )
        if summaries
        else None
    )
    df = compose_texts(genes, go, summ)
    n_go = df.select(
        pl.any_horizontal(
            pl.col(c).list.len().fill_null(0) > 0
            for c in ("go_function", "go_process", "go_component")
        ).sum()
    ).item()
    log.info(
        "%s genes of %s read from %s%s",
        f"{df.height:,}",
        species,
        Path(gene_info).name,
        f"; {n_go:,} of them with GO terms" if go is not None else "",
    )
    if summ is not None:
        n = df["summary"].is_not_null().sum()
        log.info("%s of %s summaries matched a gene symbol", f"{n:,}", f"{summ.height:,}")
    embedder = embedder or get_embedder(model)
    sources = {"gene_info": _file_info(gene_info)}
    if gene2go:
        sources["gene2go"] = _file_info(gene2go)
    if summaries:
        sources["summaries"] = _file_info(summaries)
    meta = {
        "model": embedder.spec,
        "species": TAX_NAMES.get(tax, str(tax)),
        "tax_id": tax,
        "template_version": TEMPLATE_VERSION,
        "store_version": STORE_VERSION,
        "sources": sources,
    }
    return _write_store(
        GeneStore(store, create=True), df, embedder, meta, batch_size=batch_size, t0=t0, ray=ray
    )


def _existing_vectors(tbl, meta: dict, what: str) -> dict[tuple[int, str], np.ndarray]:
    if tbl is None:
        return {}
    old = read_meta(tbl)
    for key in ("model", "tax_id", "template_version"):
        if old.get(key) != meta.get(key):
            if what == "staging":
                return {}  # a staging table from another configuration: start over
            raise StoreError(
                f"Table {tbl.name} was built with {key}={old.get(key)!r}, this build has {meta.get(key)!r}. "
                "Use another --store for another species, or delete the table's directory to rebuild it."
            )
    arrow = tbl.to_arrow().select(["gene_id", "text_hash", "vector"])
    ids, hashes = arrow.column("gene_id").to_pylist(), arrow.column("text_hash").to_pylist()
    mat = (
        arrow.column("vector")
        .combine_chunks()
        .flatten()
        .to_numpy(zero_copy_only=False)
        .reshape(len(ids), -1)
    )
    return {(i, h): mat[n] for n, (i, h) in enumerate(zip(ids, hashes))}


def _write_store(
    gs: GeneStore,
    df: pl.DataFrame,
    embedder: Embedder,
    meta: dict,
    *,
    batch_size: int,
    t0: float,
    ray: str | bool | None = None,
) -> BuildResult:
    name = table_name(embedder.spec)
    staging_name = STAGING_PREFIX + name[len("genes_") :]
    have = _existing_vectors(gs.store.open_table(name), meta, "final")
    staging_tbl = gs.store.open_table(staging_name)
    staged = _existing_vectors(staging_tbl, meta, "staging")
    if staging_tbl is not None and not staged:
        gs.store.db.drop_table(staging_name)
        staging_tbl = None
    if staged:
        log.info("Resuming an interrupted build: %s genes already embedded", f"{len(staged):,}")
    have.update(staged)
    keys = list(zip(df["gene_id"].to_list(), df["text_hash"].to_list()))
    pending = [n for n, key in enumerate(keys) if key not in have]
    log.info(
        "%s genes to embed with %s, %s reused",
        f"{len(pending):,}",
        embedder.spec,
        f"{len(keys) - len(pending):,}",
    )
    worker_config = None  # with Ray: the config of the workers' embedders, which loaded the model
    if pending:
        texts = df["text"].to_list()
        pend_texts = [texts[n] for n in pending]
        bar = progress(total=len(pending), desc=f"embedding ({embedder.spec})", unit="gene")
        try:
            # Chunks of `batch_size` (one Lance commit each) are embedded in embedder-sized batches.
            order = np.argsort([-len(t) for t in pend_texts], kind="stable")
            chunks = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
            batches = [[pend_texts[i] for i in chunk] for chunk in chunks]
            if ray:
                from cellvec.gene_store.parallel import embed_batches

                embedded = embed_batches(embedder, batches, ray=ray)
            else:
                embedded = ((embedder.embed(b), None) for b in batches)
            for chunk, (vecs, config) in zip(chunks, embedded):
                worker_config = config or worker_config
                rows = [pending[i] for i in chunk]
                arrow = gene_arrow(
                    df[rows], vecs, {**meta, "dimension": vecs.shape[1], "complete": False}
                )
                if staging_tbl is None:
                    staging_tbl = gs.store.db.create_table(staging_name, arrow)
                else:
                    staging_tbl.add(arrow)
                for r, v in zip(rows, vecs):
                    have[keys[r]] = v
                bar.update(len(chunk))
        finally:
            bar.close()
    vectors = np.stack([have[k] for k in keys]) if keys else np.zeros((0, 1), np.float32)
    meta = {
        **meta,
        # after embedding: a loaded model says more about itself
        **(worker_config or embedder.config()),
        "model": embedder.spec,
        "dimension": int(vectors.shape[1]),
        "content_hash": content_hash(df["symbol"].to_list(), vectors),
        "n_genes": len(keys),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }
    # One commit makes the new table visible; readers see the old or the new, never a mix.
    gs.store.replace_table(name, gene_arrow(df, vectors, meta))
    if staging_tbl is not None:
        gs.store.db.drop_table(staging_name)
    secs = time.perf_counter() - t0
    log.info(
        "Table %s: %s genes (%s embedded) in %.1f s",
        name,
        f"{len(keys):,}",
        f"{len(pending):,}",
        secs,
    )
    return BuildResult(
        store=str(gs.path),
        table=name,
        model=embedder.spec,
        n_genes=len(keys),
        n_embedded=len(pending),
        n_reused=len(keys) - len(pending),
        seconds=round(secs, 2),
        meta=meta,
    )


def import_vectors(
    path: str | Path,
    *,
    store: str | Path,
    model: str,
    gene_info: str | Path | None = None,
    species: str | None = None,
) -> BuildResult:
    """Import precomputed gene vectors (e.g. GenePT) as the table of model `model`.

    With `gene_info` (and `species`), symbols are joined to NCBI records so that
    cells can also be matched by synonym and Ensembl id.
    """
    t0 = time.perf_counter()
    symbols, mat = read_vectors(path)
    df = pl.DataFrame({"symbol": symbols}).with_row_index("_row")
    df = df.unique("symbol", keep="first", maintain_order=True)
    if gene_info is not None:
        if species is None:
            raise StoreError("Importing with --gene-info also needs --species.")
        info = read_gene_info(gene_info, species=species)
        df = df.join(info, on="symbol", how="left")
    for col, dtype in (
        ("gene_id", pl.Int64),
        ("synonyms", pl.List(pl.String)),
        ("ensembl_id", pl.String),
        ("tax_id", pl.Int64),
        ("full_name", pl.String),
        ("type_of_gene", pl.String),
    ):
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=dtype).alias(col))
    if species is not None:
        df = df.with_columns(pl.col("tax_id").fill_null(tax_id_for(species)))
    df = df.with_columns(
        pl.col("synonyms").fill_null(pl.lit([], dtype=pl.List(pl.String))),
        pl.lit(None, dtype=pl.String).alias("text"),
        pl.lit(None, dtype=pl.String).alias("text_hash"),
    )
    vectors = mat[df["_row"].to_numpy()]
    from cellvec.gene_store.embedders.base import normalise_rows

    vectors = normalise_rows(vectors)
    spec = model if ":" in model or model == "minilm" else f"precomputed:{model}"
    meta = {
        "model": spec,
        "provider": "precomputed",
        "source": _file_info(path),
        "dimension": int(mat.shape[1]),
        "species": species,
        "tax_id": tax_id_for(species) if species else None,
        "template_version": None,
        "store_version": STORE_VERSION,
        "n_genes": df.height,
        "complete": True,
        "content_hash": content_hash(df["symbol"].to_list(), vectors),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    gs = GeneStore(store, create=True)
    name = table_name(spec)
    gs.store.replace_table(name, gene_arrow(df, vectors, meta))
    log.info(
        "Imported %s vectors (dim %d) from %s into %s",
        f"{df.height:,}",
        mat.shape[1],
        os.path.basename(str(path)),
        name,
    )
    return BuildResult(
        store=str(gs.path),
        table=name,
        model=spec,
        n_genes=df.height,
        n_embedded=0,
        n_reused=0,
        seconds=round(time.perf_counter() - t0, 2),
        meta=meta,
    )
