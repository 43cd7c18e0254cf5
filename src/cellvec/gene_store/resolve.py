"""Match a dataset's gene names to gene-store rows.

Order of preference: exact symbol, case-insensitive symbol, synonym (any case),
then Ensembl gene id (version suffix dropped). Each tier is a lookup of its own,
so a key an earlier tier also holds (`CD3E` is both the exact and the case-folded
key of CD3E) still serves queries that only reach the later tier (`cd3e`). A
case-folded symbol or a synonym that names two different genes is ambiguous: the
query gene stays unmatched (counted as "ambiguous") rather than falling through to
a later tier or to an arbitrary one of the two. Done as Polars joins, not a Python
loop.

With an ortholog table (`gene_store.orthologs`), a gene whose symbol (in any
case) is not in the store is matched through its ortholog(s) in the store's
species ("ortholog"), ahead of synonyms: across species a synonym is often the
name of a paralog (mouse Tac2 is a synonym of human TAC1; its ortholog is TAC3;
human ICAM3 is a synonym of mouse Icam5). Synonym and Ensembl matches stay where
the table has no ortholog in the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import polars as pl

log = logging.getLogger(__name__)


@dataclass
class GeneMatch:
    """`rows[i]` is the store row of query gene i, or -1; `how[i]` says by what
    ("symbol", "symbol (case)", "synonym", "ensembl", "ortholog", "ortholog (best of
    several)"), is "ambiguous" or "ortholog (ambiguous)" when the name fits several genes,
    or None when it fits none. Several names may reach one row (`vectors.fold_duplicates`
    counts such a gene once)."""

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


def _tier(keys: pl.DataFrame, prio: int, how: str, *, ambiguous: bool) -> pl.DataFrame:
    """One tier of the lookup: a key per row. A key naming several genes keeps the first
    (`ambiguous=False`) or becomes an "ambiguous" entry with row -1 (`ambiguous=True`)."""
    keys = keys.drop_nulls("key").unique(["key", "row"]).sort("row")
    if ambiguous:
        keys = keys.group_by("key", maintain_order=True).agg(
            pl.when(pl.col("row").n_unique() == 1).then(pl.col("row").first()).otherwise(-1)
        )
    else:
        keys = keys.unique("key", keep="first", maintain_order=True)
    return keys.select(
        "key",
        pl.col("row").cast(pl.Int64),
        pl.lit(prio).alias("prio"),
        pl.when(pl.col("row") >= 0).then(pl.lit(how)).otherwise(pl.lit("ambiguous")).alias("how"),
    )


def _lookup(genes: pl.DataFrame) -> pl.DataFrame:
    base = genes.select(
        pl.int_range(pl.len(), dtype=pl.Int64).alias("row"), "symbol", "synonyms", "ensembl_id"
    )
    symbol = base.select(pl.col("symbol").alias("key"), "row")
    upper = base.select(pl.col("symbol").str.to_uppercase().alias("key"), "row")
    syn = (
        base.select("row", "synonyms")
        .explode("synonyms")
        .select(pl.col("synonyms").str.to_uppercase().alias("key"), "row")
    )
    ens = base.select(pl.col("ensembl_id").alias("key"), "row")
    return pl.concat(
        [
            _tier(symbol, 0, "symbol", ambiguous=False),
            _tier(upper, 1, "symbol (case)", ambiguous=True),
            _tier(syn, 2, "synonym", ambiguous=True),
            _tier(ens, 3, "ensembl", ambiguous=False),
        ],
        how="vertical_relaxed",
    )


_BY_SYMBOL = ("symbol", "symbol (case)")

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


class Orthologs(Protocol):
    """What matching needs of an ortholog table (`gene_store.orthologs.OrthologTable`,
    which builds on this module's matching, so it is named here only by what it does)."""

    def store_rows(self, names, genes: pl.DataFrame) -> tuple[np.ndarray, list[str | None]]: ...


def match_genes(names, genes: pl.DataFrame, *, orthologs: Orthologs | None = None) -> GeneMatch:
    """Resolve query gene `names` against a store's gene frame (see module docstring);
    names that match nothing directly go through `orthologs` when given."""
    names = [str(n) for n in names]
    m = _match_direct(names, genes)
    if orthologs is None:
        return m
    todo = np.array([i for i, h in enumerate(m.how) if h not in _BY_SYMBOL], dtype=np.int64)
    if len(todo):
        rows, how = orthologs.store_rows([names[i] for i in todo], genes)
        for j, i in enumerate(todo.tolist()):
            if rows[j] >= 0 or (m.rows[i] < 0 and how[j] is not None):
                m.rows[i], m.how[i] = rows[j], how[j]
    return m


def _match_direct(names: list[str], genes: pl.DataFrame) -> GeneMatch:
    q = pl.DataFrame({"name": names}, schema={"name": pl.String}).with_row_index("i")
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
