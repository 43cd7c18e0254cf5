"""Readers for gene text sources in their real formats.

NCBI `gene_info` and `gene2go` (tab-separated, `#tax_id` header, `-` for empty,
`|`-separated lists, gzipped or not), user summaries (GenePT-style JSON
symbol -> text, TSV/CSV, parquet) and precomputed vectors (GenePT pickle,
npz, parquet).
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
from pathlib import Path

import numpy as np
import polars as pl

from cellvec.errors import InputFormatError

SPECIES = {"human": 9606, "mouse": 10090}
TAX_NAMES = {v: k for k, v in SPECIES.items()}

GENE_INFO_COLUMNS = [
    "#tax_id",
    "GeneID",
    "Symbol",
    "LocusTag",
    "Synonyms",
    "dbXrefs",
    "chromosome",
    "map_location",
    "description",
    "type_of_gene",
    "Symbol_from_nomenclature_authority",
    "Full_name_from_nomenclature_authority",
    "Nomenclature_status",
    "Other_designations",
    "Modification_date",
    "Feature_type",
]
GENE2GO_COLUMNS = [
    "#tax_id",
    "GeneID",
    "GO_ID",
    "Evidence",
    "Qualifier",
    "GO_term",
    "PubMed",
    "Category",
]
NCBI_GENE_FTP = "https://ftp.ncbi.nlm.nih.gov/gene/DATA/"


def tax_id_for(species: str) -> int:
    """The NCBI taxonomy id of a species name (`human`, `mouse`) or a numeric string."""
    if str(species).isdigit():
        return int(species)
    try:
        return SPECIES[species.lower()]
    except KeyError:
        raise InputFormatError(
            f"Unknown species {species!r}: use one of {', '.join(SPECIES)} or an NCBI tax id."
        ) from None


def read_bytes(path: Path) -> bytes:
    """The bytes of a file, gunzipped when it is gzipped (whatever its name says)."""
    if not path.exists():
        raise InputFormatError(f"{path}: no such file.")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    opener = gzip.open if magic == b"\x1f\x8b" else open
    try:
        with opener(path, "rb") as fh:
            return fh.read()
    except (OSError, EOFError) as e:
        raise InputFormatError(f"{path}: cannot be read ({e}); is the download complete?") from e


def _read_ncbi_table(path: Path, required: list[str], what: str, fix: str) -> pl.DataFrame:
    data = read_bytes(path)
    header = data.split(b"\n", 1)[0].decode("utf-8", "replace").rstrip("\r").split("\t")
    missing = [c for c in required if c not in header]
    if missing:
        raise InputFormatError(
            f"{path} is not an NCBI {what} file: its first line lacks the column(s) "
            f"{', '.join(missing)} (found: {', '.join(header[:6])}...). {fix}"
        )
    try:
        df = pl.read_csv(
            io.BytesIO(data),
            separator="\t",
            quote_char=None,
            null_values=["-"],
            infer_schema=False,
            columns=required,
        )
    except pl.exceptions.PolarsError as e:
        raise InputFormatError(f"{path}: malformed {what} table ({e}). {fix}") from e
    return df.rename({"#tax_id": "tax_id"})


def read_gene_info(path: str | Path, *, species: str | int | None = None) -> pl.DataFrame:
    """Read an NCBI gene_info file into one row per gene.

    Columns: gene_id, tax_id, symbol, synonyms (list), ensembl_id, full_name,
    type_of_gene, description, other_designations (list). With `species`, keeps that
    species and raises if the file has none of it (a wrong-species file).
    """
    path = Path(path)
    fix = (
        f"Pass a gene_info file from {NCBI_GENE_FTP}GENE_INFO/ "
        "(e.g. Mammalia/Mus_musculus.gene_info.gz) with --gene-info."
    )
    req = [
        "#tax_id",
        "GeneID",
        "Symbol",
        "Synonyms",
        "dbXrefs",
        "description",
        "type_of_gene",
        "Full_name_from_nomenclature_authority",
        "Other_designations",
    ]
    df = _read_ncbi_table(path, req, "gene_info", fix)
    try:
        df = df.with_columns(pl.col("tax_id").cast(pl.Int64), pl.col("GeneID").cast(pl.Int64))
    except pl.exceptions.PolarsError as e:
        raise InputFormatError(f"{path}: tax_id/GeneID are not integers ({e}). {fix}") from e
    if species is not None:
        tax = tax_id_for(str(species))
        found = df["tax_id"].unique().to_list()
        df = df.filter(pl.col("tax_id") == tax)
        if df.height == 0:
            names = ", ".join(f"{t} ({TAX_NAMES.get(t, '?')})" for t in sorted(found)[:5])
            raise InputFormatError(
                f"{path} has no genes of species {species} (tax id {tax}); it holds tax id(s) "
                f"{names}. Use --species to match the file, or the gene_info file of {species}."
            )
    xref = pl.col("dbXrefs").fill_null("")
    return (
        df.select(
            pl.col("GeneID").alias("gene_id"),
            pl.col("tax_id"),
            pl.col("Symbol").alias("symbol"),
            pl.col("Synonyms")
            .str.split("|")
            .fill_null(pl.lit([], dtype=pl.List(pl.String)))
            .alias("synonyms"),
            xref.str.extract(r"Ensembl:(ENS[A-Z]*G\d+)", 1).alias("ensembl_id"),
            pl.coalesce("Full_name_from_nomenclature_authority", "description").alias("full_name"),
            pl.col("type_of_gene"),
            pl.col("description"),
            pl.col("Other_designations")
            .str.split("|")
            .fill_null(pl.lit([], dtype=pl.List(pl.String)))
            .alias("other_designations"),
        )
        .filter(pl.col("symbol").is_not_null())
        .unique("gene_id", keep="first", maintain_order=True)
    )


def read_gene2go(path: str | Path, *, tax_id: int | None = None) -> pl.DataFrame:
    """Read NCBI gene2go into one row per gene with its GO terms by category.

    Columns: gene_id, go_function, go_process, go_component (lists of term names,
    in file order, deduplicated; `NOT` qualified annotations are dropped).
    """
    path = Path(path)
    fix = f"Pass NCBI's gene2go file ({NCBI_GENE_FTP}gene2go.gz) with --gene2go."
    req = ["#tax_id", "GeneID", "GO_ID", "Qualifier", "GO_term", "Category"]
    df = _read_ncbi_table(path, req, "gene2go", fix)
    df = df.with_columns(
        pl.col("tax_id").cast(pl.Int64, strict=False), pl.col("GeneID").cast(pl.Int64, strict=False)
    )
    if tax_id is not None:
        df = df.filter(pl.col("tax_id") == tax_id)
    df = df.filter(~pl.col("Qualifier").fill_null("").str.starts_with("NOT"))
    cats = {"Function": "go_function", "Process": "go_process", "Component": "go_component"}
    out = (
        df.filter(pl.col("Category").is_in(list(cats)))
        .unique(["GeneID", "Category", "GO_term"], keep="first", maintain_order=True)
        .group_by("GeneID", "Category", maintain_order=True)
        .agg(pl.col("GO_term"))
        .pivot(on="Category", index="GeneID", values="GO_term")
        .rename({"GeneID": "gene_id"})
    )
    for cat, col in cats.items():
        if cat in out.columns:
            out = out.rename({cat: col})
        else:
            out = out.with_columns(pl.lit(None, dtype=pl.List(pl.String)).alias(col))
    return out.select("gene_id", *cats.values())


def read_summaries(
    path: str | Path, *, symbol_column: str | None = None, text_column: str | None = None
) -> pl.DataFrame:
    """Read gene summaries a user already has: columns symbol, summary.

    Formats: JSON object symbol -> text (GenePT's NCBI_summary_of_genes.json),
    TSV/CSV and parquet with columns named by `symbol_column` / `text_column`
    (defaults: the first of symbol/gene/gene_name and summary/text/description).
    """
    path = Path(path)
    suffixes = "".join(path.suffixes).lower()
    if ".json" in suffixes:
        try:
            obj = json.loads(read_bytes(path))
        except json.JSONDecodeError as e:
            raise InputFormatError(f"{path}: not valid JSON ({e}).") from e
        if not isinstance(obj, dict) or not all(isinstance(v, str) for v in obj.values()):
            raise InputFormatError(
                f"{path}: expected a JSON object mapping gene symbol -> summary text "
                "(as GenePT's NCBI_summary_of_genes.json); use TSV/CSV/parquet with "
                "--summary-symbol-column/--summary-text-column for other layouts."
            )
        df = pl.DataFrame({"symbol": list(obj), "summary": list(obj.values())})
    else:
        if not any(s in suffixes for s in (".parquet", ".tsv", ".txt", ".csv")):
            raise InputFormatError(
                f"{path}: unknown summaries format {suffixes!r}; use .json, .tsv, .csv or .parquet."
            )
        try:
            if ".parquet" in suffixes:
                df = pl.read_parquet(path)
            else:
                sep = "," if ".csv" in suffixes else "\t"
                df = pl.read_csv(io.BytesIO(read_bytes(path)), separator=sep, infer_schema=False)
        except pl.exceptions.PolarsError as e:  # empty, or not the format its name says
            raise InputFormatError(
                f"{path}: not a readable {path.suffix} table of gene summaries "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); give a table with a "
                "symbol and a summary column, named for its format."
            ) from e
        symbol_column = symbol_column or _first_present(
            df.columns, ["symbol", "gene", "gene_name", "Symbol"]
        )
        text_column = text_column or _first_present(
            df.columns, ["summary", "text", "description", "Summary"]
        )
        for flag, col in (
            ("--summary-symbol-column", symbol_column),
            ("--summary-text-column", text_column),
        ):
            if col is None or col not in df.columns:
                raise InputFormatError(
                    f"{path}: no column {col!r} (columns: {', '.join(df.columns)}); name it with {flag}."
                )
        df = df.select(
            pl.col(symbol_column).cast(pl.String).alias("symbol"),
            pl.col(text_column).cast(pl.String).alias("summary"),
        )
    return df.filter(pl.col("symbol").is_not_null() & pl.col("summary").is_not_null()).unique(
        "symbol", keep="first", maintain_order=True
    )


def _first_present(columns: list[str], candidates: list[str]) -> str | None:
    return next((c for c in candidates if c in columns), None)


# What a pickle of gene vectors (GenePT's: a dict of symbol -> list of floats, or numpy
# arrays) may name besides the builtins pickle builds without a name
_PICKLED_ARRAYS = (
    {
        (module, name)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    }
    | {(module, "_frombuffer") for module in ("numpy.core.numeric", "numpy._core.numeric")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}
    | {("_codecs", "encode")}  # protocol 2's way of writing bytes
)


class _VectorUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays, nothing else: a pickle
    names any function to call when it is loaded (`os.system` included), and a file of
    gene vectors is downloaded from elsewhere."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _PICKLED_ARRAYS:
            raise pickle.UnpicklingError(
                f"it asks for {module}.{name}, which a file of gene vectors never needs"
            )
        return super().find_class(module, name)


def read_vectors(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read precomputed gene vectors: (symbols, float32 matrix genes x dim).

    Formats: pickle of a dict symbol -> vector (GenePT), npz with a string array
    (`genes`/`symbols`) and a 2-D array (`vectors`/`embeddings`) or one array
    per symbol, parquet with a symbol column and a list column or float columns.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".pkl", ".pickle"):
            with open(path, "rb") as fh:
                obj = _VectorUnpickler(fh).load()
            if not isinstance(obj, dict):
                raise InputFormatError(
                    f"{path}: expected a pickled dict symbol -> vector, got {type(obj).__name__}."
                )
            symbols = [str(s) for s in obj]
            mat = np.asarray([np.asarray(v, dtype=np.float32).ravel() for v in obj.values()])
        elif suffix == ".npz":
            z = np.load(path, allow_pickle=False)
            names = _first_present(list(z.files), ["genes", "symbols", "gene", "symbol"])
            vecs = _first_present(list(z.files), ["vectors", "embeddings", "X"])
            if names and vecs:
                symbols, mat = [str(s) for s in z[names]], np.asarray(z[vecs], dtype=np.float32)
            else:
                symbols = list(z.files)
                mat = np.asarray([z[s].ravel() for s in symbols], dtype=np.float32)
        elif suffix == ".parquet":
            df = pl.read_parquet(path)
            sym = _first_present(df.columns, ["symbol", "gene", "gene_name"])
            if sym is None:
                raise InputFormatError(
                    f"{path}: needs a 'symbol' (or 'gene') column; has {', '.join(df.columns[:8])}."
                )
            listcol = next(
                (c for c in df.columns if isinstance(df.schema[c], (pl.List, pl.Array))), None
            )
            if listcol:
                mat = np.asarray(df[listcol].to_list(), dtype=np.float32)
            else:
                num = [c for c in df.columns if c != sym and df.schema[c].is_numeric()]
                mat = df.select(num).to_numpy().astype(np.float32)
            symbols = df[sym].cast(pl.String).to_list()
        else:
            raise InputFormatError(
                f"{path}: unknown vectors format {suffix!r}; use .pkl, .npz or .parquet."
            )
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, pl.exceptions.PolarsError) as e:
        # EOFError: an empty or cut-short pickle (click would take it for Ctrl-C)
        what = str(e).splitlines()[0][:200] if str(e) else "the file ends early"
        raise InputFormatError(
            f"{path}: cannot read vectors ({type(e).__name__}: {what}); give a pickle of a dict "
            "symbol -> vector (GenePT's), an npz or a parquet, complete and named for its format."
        ) from e
    if mat.ndim != 2 or mat.shape[0] != len(symbols) or mat.shape[0] == 0:
        raise InputFormatError(
            f"{path}: vectors must be a non-empty genes x dim matrix; got shape {mat.shape}."
        )
    if not np.isfinite(mat).all():
        raise InputFormatError(
            f"{path}: vectors contain NaN or inf values; clean them before importing."
        )
    return symbols, mat
