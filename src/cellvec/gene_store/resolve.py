"""Match a dataset's gene names to gene-store rows.

Order of preference: exact symbol, case-insensitive symbol, an unambiguous
synonym (one that names a single gene), then Ensembl gene id (version suffix
dropped). Done as one Polars join, not a Python loop.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import polars as pl

log = logging.getLogger(__name__)


@dataclass
class GeneMatch:
    """`rows[i]` is the store row of query gene i, or -1; `how[i]` says by what."""

    rows: np.ndarray
    how: list[str | None]

    @property
    def n_matched(self) -> int:
        return int((self.rows >= 0).sum())

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.how:
            out[h or "unmatched"] = out.get(h or "unmatched", 0) + 1
        return out


def _lookup(genes: pl.DataFrame) -> pl.DataFrame:
    base = genes.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), "symbol", "synonyms", "ensembl_id"
    )
    symbol = base.select(
        pl.col("symbol").alias("key"), "row", pl.lit(0).alias("prio"), pl.lit("symbol").alias("how")
    )
    upper = base.select(
        pl.col("symbol").str.to_uppercase().alias("key"),
        "row",
        pl.lit(1).alias("prio"),
        pl.lit("symbol (case)").alias("how"),
    )
    syn = (
        base.select("row", pl.col("synonyms"))
        .explode("synonyms")
        .drop_nulls("synonyms")
        .select(pl.col("synonyms").str.to_uppercase().alias("key"), "row")
    )
    syn = syn.filter(
        pl.col("key").is_in(syn.group_by("key").len().filter(pl.col("len") == 1)["key"].implode())
    )
    syn = syn.with_columns(pl.lit(2).alias("prio"), pl.lit("synonym").alias("how"))
    ens = base.drop_nulls("ensembl_id").select(
        pl.col("ensembl_id").alias("key"),
        "row",
        pl.lit(3).alias("prio"),
        pl.lit("ensembl").alias("how"),
    )
    lk = pl.concat([symbol, upper, syn, ens], how="vertical_relaxed").drop_nulls("key")
    return lk.sort("prio", "row").unique("key", keep="first", maintain_order=True)


_LOOKUPS: dict[int, tuple[pl.DataFrame, pl.DataFrame]] = {}


def _cached_lookup(genes: pl.DataFrame) -> pl.DataFrame:
    # Keyed by object identity: a loaded gene table is immutable and cached by its store.
    hit = _LOOKUPS.get(id(genes))
    if hit is None or hit[0] is not genes:
        if len(_LOOKUPS) > 8:
            _LOOKUPS.clear()
        hit = (genes, _lookup(genes))
        _LOOKUPS[id(genes)] = hit
    return hit[1]


def match_genes(names, genes: pl.DataFrame) -> GeneMatch:
    """Resolve query gene `names` against a store's gene frame (see module docstring)."""
    q = pl.DataFrame({"name": [str(n) for n in names]}).with_row_index("i")
    q = q.with_columns(
        pl.col("name").alias("k0"),
        pl.col("name").str.to_uppercase().alias("k1"),
        pl.col("name").str.replace(r"\.\d+$", "").alias("k3"),
    )
    lk = _cached_lookup(genes)
    cands = []
    for key, prios in (("k0", [0]), ("k1", [1, 2]), ("k3", [3])):
        sub = lk.filter(pl.col("prio").is_in(prios))
        cands.append(
            q.join(sub, left_on=key, right_on="key", how="inner").select("i", "row", "prio", "how")
        )
    best = pl.concat(cands).sort("i", "prio").unique("i", keep="first")
    rows = np.full(q.height, -1, dtype=np.int64)
    how = np.full(q.height, None, dtype=object)
    idx = best["i"].to_numpy()
    rows[idx] = best["row"].to_numpy()
    how[idx] = best["how"].to_numpy()
    return GeneMatch(rows=rows, how=how.tolist())
