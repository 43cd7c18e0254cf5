"""Read expression data into an `ExpressionSource`: cells x genes, log-normalised, in chunks.

Formats: h5ad (X, a named layer, or .raw; read backed in chunks when large),
10x Genomics (matrix.mtx directory, filtered_feature_bc_matrix.h5), CSV/TSV
(cells x genes; `transpose=True` for genes x cells) and parquet (wide, or long
with cell, gene, value columns).

What the values are is detected, not assumed: raw counts are normalised to
10,000 per cell and log1p-transformed; log-normalised values are used as they
are; scaled values (negative entries) are refused unless `.raw` holds
log-normalised ones. NaN/inf and negative counts are errors; empty cells and
duplicated gene names are excluded with a logged count.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from cellvec.errors import InputFormatError

log = logging.getLogger(__name__)

BACKED_ABOVE_BYTES = 1 << 30  # h5ad files larger than this are read backed, in chunks
# the suffixes of the formats read from one file (a directory is a 10x matrix directory)
FILE_SUFFIXES = (
    ".h5ad",
    ".h5",
    ".csv",
    ".tsv",
    ".txt",
    ".csv.gz",
    ".tsv.gz",
    ".txt.gz",
    ".parquet",
)
COUNTS, LOGNORM, SCALED = "counts", "log-normalised", "scaled"
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class ExpressionSource:
    """Cells x genes expression, yielded as log-normalised CSR chunks.

    `obs` holds the cell annotations of the kept cells, `var_names` the kept genes.
    """

    path: str
    obs: pd.DataFrame
    var_names: list[str]
    kind: str
    _matrix: object = field(repr=False)  # in-memory matrix or backed h5 dataset
    _cols: np.ndarray | None = field(default=None, repr=False)  # kept gene columns
    _rows: np.ndarray | None = field(default=None, repr=False)  # kept cell rows
    _adata: object = field(default=None, repr=False)
    validated: bool = True  # False: values are checked chunk by chunk as they stream (backed files)
    # (file, matrix key such as "X", "layers/counts" or "raw/X") when read from an h5ad file:
    # Ray workers open the same matrix there, backed, and read their own rows
    h5ad: tuple[str, str] | None = None

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def obs_names(self) -> list[str]:
        return self.obs.index.astype(str).tolist()

    def chunks(
        self, size: int = 20_000, *, as_stored: bool = False
    ) -> Iterator[tuple[slice, sp.csr_matrix]]:
        """Yield (slice into obs, log-normalised float32 CSR) over all kept cells.

        `as_stored=True` yields the values as stored (counts stay counts), for validation.
        """
        rows = self._rows if self._rows is not None else np.arange(self.n_obs)
        for start in range(0, len(rows), size):
            sel = rows[start : start + size]
            lo, hi = int(sel[0]), int(sel[-1]) + 1
            block = self._matrix[lo:hi]
            if not self.validated:  # read backed: its structure is checked as it streams
                check_matrix(block, f"{self.path} (cells {lo}-{hi})")
            block = _to_csr(block)
            if len(sel) != hi - lo:
                block = block[sel - lo]
            if self._cols is not None:
                block = block[:, self._cols]
            if not self.validated:
                _check_block(block, self.path, lo, hi, self.kind)
            yield (
                slice(start, start + len(sel)),
                block if as_stored else _as_lognorm(block, self.kind, self.path),
            )

    def subset(self, mask: np.ndarray) -> ExpressionSource:
        """The same source restricted to the cells where `mask` is true (no copy of data)."""
        rows = self._rows if self._rows is not None else np.arange(self.n_obs)
        return replace(self, obs=self.obs[mask], _rows=rows[np.asarray(mask)])

    def subset_genes(self, keep: np.ndarray) -> ExpressionSource:
        """The same cells measured on the genes where `keep` is true, as a panel would be:
        raw counts are normalised over the kept genes only (no copy of data)."""
        cols = self._cols if self._cols is not None else np.arange(len(self.var_names))
        keep = np.asarray(keep, dtype=bool)
        return replace(
            self, var_names=[v for v, k in zip(self.var_names, keep) if k], _cols=cols[keep]
        )

    def to_csr(self) -> sp.csr_matrix:
        """All kept cells as one log-normalised CSR matrix (for small data and baselines)."""
        parts = [c for _, c in self.chunks()]
        return (
            sp.vstack(parts, format="csr")
            if parts
            else sp.csr_matrix((0, len(self.var_names)), dtype=np.float32)
        )


def align_genes(x: sp.csr_matrix, var_names: list[str], to: list[str]) -> sp.csr_matrix:
    """The columns of `x` (genes `var_names`) reordered to genes `to`; zeros for the missing."""
    pos = {g: i for i, g in enumerate(var_names)}
    src = np.array([pos.get(g, -1) for g in to], dtype=np.int64)
    have = np.flatnonzero(src >= 0)
    # a 0/1 matrix taking column src[j] of x to column j of the output
    move = sp.csr_matrix(
        (np.ones(len(have), np.float32), (src[have], have)), shape=(x.shape[1], len(to))
    )
    return sp.csr_matrix(x @ move, dtype=np.float32)


def _to_csr(x) -> sp.csr_matrix:
    if sp.issparse(x):
        return sp.csr_matrix(x, dtype=np.float32)
    if hasattr(x, "to_memory"):  # anndata backed sparse dataset
        return sp.csr_matrix(x.to_memory(), dtype=np.float32)
    return sp.csr_matrix(np.asarray(x, dtype=np.float32))


def check_matrix(x, where: str) -> None:
    """Refuse an expression matrix of values that are not numbers (strings, records,
    complex numbers) or, when sparse, whose structure points outside it: column indices
    out of range or an index pointer that runs backwards. scipy builds a sparse matrix
    from a file's `indices` and `indptr` without checking them, and its compiled code then
    reads and writes past its arrays (a crash, or another cell's memory read as values).
    A backed sparse dataset has its dtype checked here and its structure chunk by chunk."""
    kind = np.dtype(getattr(x, "dtype", np.float32)).kind
    if kind not in "biuf":
        raise InputFormatError(
            f"{where}: the expression matrix holds {np.dtype(x.dtype)} values, not real numbers; "
            "give counts or log-normalised values (integers or floats)."
        )
    if sp.issparse(x):
        try:
            if x.format in ("csr", "csc"):
                # scipy's full check skips the index pointer when its last entry is 0 (no
                # values): [0, 10**8, 0, ...] passed, and slicing rows then crashed
                steps = np.diff(x.indptr)
                if len(steps) and (x.indptr[0] != 0 or steps.min() < 0):
                    raise ValueError("indptr must start at 0 and never decrease")
                if x.indptr[-1] != len(x.indices) or len(x.indices) != len(x.data):
                    raise ValueError("indptr, indices and data disagree in length")
            x.check_format(full_check=True)
        except ValueError as e:
            raise InputFormatError(
                f"{where}: the sparse expression matrix is malformed ({e}); its indices and "
                "indptr do not describe a matrix of its shape. Write it again with anndata "
                "(AnnData.write_h5ad) from a matrix scipy built."
            ) from e


def _checked_rows(matrix, where: str):
    """The first 2,000 rows of `matrix` (checked whole already when in memory), checked
    before anything converts them when it is backed: its structure is only checked as
    it is read."""
    n = min(matrix.shape[0], 2000)
    rows = matrix[:n]
    if not (sp.issparse(matrix) or isinstance(matrix, np.ndarray)):
        check_matrix(rows, f"{where} (cells 0-{n})")
    return rows


def _as_lognorm(x: sp.csr_matrix, kind: str, path: str) -> sp.csr_matrix:
    if kind == COUNTS:
        # float64: a float32 total overflows past 3.4e38 (two values of 3e38), and the cell
        # would silently become all zeros
        totals = np.asarray(x.sum(axis=1, dtype=np.float64)).ravel()
        scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
        x = sp.csr_matrix(sp.diags(scale.astype(np.float32)) @ x)
        np.log1p(x.data, out=x.data)
    return x


def detect_kind(sample: sp.csr_matrix, where: str) -> str:
    """Counts, log-normalised or scaled, from a sample of rows; errors on NaN/inf."""
    data = sample.data if sp.issparse(sample) else np.asarray(sample).ravel()
    if data.size == 0:
        return LOGNORM
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputFormatError(
            f"{where}: {int(bad.sum()):,} NaN/inf values in the expression matrix; "
            "remove or impute them before embedding cells."
        )
    if (data < 0).any():
        return SCALED
    integer = np.allclose(data, np.round(data))
    if integer and data.max() > 30:
        return COUNTS
    if integer and data.max() <= 30:
        # small integers: counts of a shallow dataset or binarised data; counts is the safe reading
        return COUNTS
    return LOGNORM


def read_expression(
    data,
    *,
    layer: str | None = None,
    use_raw: bool | None = None,
    transpose: bool = False,
    backed: bool | None = None,
    gene_column: str | None = None,
    label: str = "<AnnData>",
) -> ExpressionSource:
    """Open expression data (a path or an AnnData) as an `ExpressionSource`; `label` is
    what messages call an AnnData (a file is called by its path)."""
    import anndata as ad

    if isinstance(data, ExpressionSource):
        return data
    if isinstance(data, ad.AnnData):
        return _from_anndata(data, label, layer, use_raw, gene_column)
    path = Path(data)
    if not path.exists():
        raise InputFormatError(f"{path}: no such file or directory.")
    name = path.name.lower()
    if path.is_dir():
        if name.endswith(FILE_SUFFIXES):
            raise InputFormatError(
                f"{path}: a directory, not a {path.suffix} file; give the path of the file "
                "itself (a directory is read as a 10x matrix directory)."
            )
        adata = read_10x_mtx(path)
    elif not name.endswith(FILE_SUFFIXES):
        raise InputFormatError(
            f"{path}: unknown expression format; use .h5ad, a 10x matrix directory or .h5, .csv/.tsv or .parquet."
        )
    elif path.stat().st_size == 0:
        raise InputFormatError(
            f"{path}: the file is empty (0 bytes); was it written or downloaded to the end? "
            "Write or download it again."
        )
    elif name.endswith(".h5ad"):
        if backed is None:
            backed = path.stat().st_size > BACKED_ABOVE_BYTES
        adata = open_h5ad(path, backed=backed)
    elif name.endswith(".h5"):
        adata = read_10x_h5(path)
    elif name.endswith(".parquet"):
        adata = read_parquet(path)
    else:
        adata = read_table(path, transpose=transpose)
    return _from_anndata(adata, str(path), layer, use_raw, gene_column, h5ad=name.endswith(".h5ad"))


def open_h5ad(path: Path, *, backed: bool = False):
    """An h5ad file as an AnnData (backed: rows read on demand), or an error naming the
    file and what it is instead."""
    import anndata as ad
    import h5py

    if not h5py.is_hdf5(path):
        raise InputFormatError(
            f"{path}: not a readable h5ad: it is not an HDF5 file (AnnData.write_h5ad writes "
            "one); check that it is the file you meant, or name it for its real format (.csv, "
            ".tsv, .parquet)."
        )
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except (OSError, KeyError, TypeError, ValueError) as e:
        # anndata raises any of these on an HDF5 file it cannot read as AnnData
        raise InputFormatError(
            f"{path}: an HDF5 file but not a readable h5ad ({type(e).__name__}: {e}); write it "
            "with AnnData.write_h5ad (a Cell Ranger matrix is read when named .h5)."
        ) from e


def _require_cells_and_genes(shape: tuple[int, int], where: str) -> None:
    """An empty matrix is refused by name, before anything reads it as having no expression."""
    n_cells, n_genes = shape
    if n_cells == 0:
        raise InputFormatError(
            f"{where}: no cells (the expression matrix is 0 cells x {n_genes:,} genes); give a "
            "file that holds cells."
        )
    if n_genes == 0:
        raise InputFormatError(
            f"{where}: no genes (the expression matrix is {n_cells:,} cells x 0 genes); give "
            "the data before its genes were filtered away, or name the --layer or .raw "
            "(--use-raw) that holds them."
        )


def _from_anndata(
    adata, where: str, layer, use_raw, gene_column, *, h5ad: bool = False
) -> ExpressionSource:
    raw = getattr(adata, "raw", None)
    if layer is not None:
        if layer not in adata.layers:
            raise InputFormatError(
                f"{where}: no layer {layer!r} (layers: {', '.join(adata.layers) or 'none'})."
            )
        matrix, var = adata.layers[layer], adata.var
    elif use_raw:
        if raw is None:
            raise InputFormatError(f"{where}: use_raw was asked for but the file has no .raw.")
        matrix, var = raw.X, raw.var
    else:
        matrix, var = adata.X, adata.var
    if matrix is None:
        raise InputFormatError(
            f"{where}: the expression matrix is empty (X is None); name a --layer."
        )
    check_matrix(matrix, where)
    _require_cells_and_genes(matrix.shape, where)
    kind = detect_kind(_to_csr(_checked_rows(matrix, where)), where)
    if kind == SCALED and use_raw is None and layer is None and raw is not None:
        check_matrix(raw.X, f"{where} (.raw)")
        _require_cells_and_genes(raw.X.shape, f"{where} (.raw)")
        raw_kind = detect_kind(_to_csr(_checked_rows(raw.X, f"{where} (.raw)")), f"{where} (.raw)")
        if raw_kind != SCALED:
            log.info(
                "%s: X holds scaled values (negative entries); using .raw (%s)", where, raw_kind
            )
            matrix, var, kind, use_raw = raw.X, raw.var, raw_kind, True
    if kind == SCALED:
        raise InputFormatError(
            f"{where}: the expression values are scaled (negative entries), so the most-expressed genes "
            "cannot be read from them. Give counts or log-normalised values: a file with .raw, "
            "a --layer holding counts, or the data before sc.pp.scale."
        )
    if gene_column and gene_column not in var.columns:
        raise InputFormatError(
            f"{where}: no var column {gene_column!r} for gene names (var columns: "
            f"{', '.join(map(str, var.columns)) or 'none'}); leave --gene-column out to use var_names."
        )
    names = (
        var[gene_column].astype(str).to_numpy()
        if gene_column
        else np.asarray(var.index.astype(str))
    )
    cols = None
    dup = pd.Index(names).duplicated()
    if dup.any():
        log.warning(
            "%s: %d duplicated gene names; keeping the first of each", where, int(dup.sum())
        )
        cols = np.flatnonzero(~dup)
        names = names[cols]
    obs = adata.obs.copy()
    obs.index = obs.index.astype(str)
    key = f"layers/{layer}" if layer is not None else ("raw/X" if use_raw else "X")
    src = ExpressionSource(
        where,
        obs,
        names.tolist(),
        kind,
        matrix,
        cols,
        None,
        adata,
        h5ad=(str(Path(where).resolve()), key) if h5ad else None,
    )
    if getattr(adata, "isbacked", False):
        # Large files: no separate pass over the data; each chunk is checked as it streams,
        # and empty cells get zero vectors (mapped as 'unassigned').
        src.validated = False
    else:
        src = _drop_empty_and_check(src, where)
    log.info(
        "%s: %s cells x %s genes (%s)", where, f"{src.n_obs:,}", f"{len(src.var_names):,}", kind
    )
    return src


def read_matrix(
    x, var_names: list[str], where: str = "<request>"
) -> tuple[sp.csr_matrix, np.ndarray, list[str]]:
    """Cells x genes held in memory, read as `read_expression` reads an AnnData, without one.

    The kind of values is detected, duplicated genes keep their first column, values are
    checked and cells with no expression are excluded. Returns (log-normalised float32 CSR
    of the kept cells, their row numbers, the kept gene names): the HTTP service's
    per-request path, where building an AnnData costs more than mapping one cell.
    """
    if not (sp.isspmatrix_csr(x) and x.dtype == np.float32):
        x = _to_csr(x)
    n = x.shape[0]
    kind = detect_kind(x if n <= 2000 else x[:2000], where) if n else LOGNORM
    if kind == SCALED:
        raise InputFormatError(
            f"{where}: the expression values are scaled (negative entries), so the most-expressed "
            "genes cannot be read from them. Give counts or log-normalised values."
        )
    names = var_names if isinstance(var_names, list) else [str(v) for v in var_names]
    if len(set(names)) < len(names):
        dup = pd.Index(names).duplicated()
        log.warning(
            "%s: %d duplicated gene names; keeping the first of each", where, int(dup.sum())
        )
        cols = np.flatnonzero(~dup)
        x, names = x[:, cols], [names[i] for i in cols]
    # values are checked non-negative: a cell is expressed where its total is positive
    rows = np.flatnonzero(_check_block(x, where, 0, n, kind) > 0)
    if len(rows) < n:
        log.warning("%s: %d cells with no expression excluded", where, n - len(rows))
        x = x[rows]
    if len(rows) == 0:
        raise InputFormatError(f"{where}: no cells with any expression.")
    return _as_lognorm(x, kind, where), rows, names


def _check_block(block: sp.csr_matrix, where: str, start: int, stop: int, kind: str) -> np.ndarray:
    """Refuse NaN/inf, negative values and cells whose values add up past float32; returns
    each cell's total (float64)."""
    if block.data.size and not np.isfinite(block.data).all():
        raise InputFormatError(
            f"{where}: NaN/inf values in cells {start}-{stop}; remove or impute them."
        )
    totals = np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
    if totals.size and totals.max() > FLOAT32_MAX:
        raise InputFormatError(
            f"{where}: the values of a cell among cells {start}-{stop} add up past 3.4e38 (the "
            "float32 range), which no expression data reaches; check the input's units."
        )
    if block.data.size and (block.data < 0).any():
        raise InputFormatError(
            f"{where}: negative values among cells {start}-{stop} of a {kind} matrix; "
            "counts and log-normalised values cannot be negative. Check the input layer."
        )
    return totals


def _drop_empty_and_check(src: ExpressionSource, where: str) -> ExpressionSource:
    totals = np.empty(src.n_obs, dtype=np.float64)
    for sl, block in src.chunks(as_stored=True):
        totals[sl] = _check_block(block, where, sl.start, sl.stop, src.kind)
    empty = totals <= 0
    if empty.any():
        log.warning("%s: %d cells with no expression excluded", where, int(empty.sum()))
        src = src.subset(~empty)
    if src.n_obs == 0:
        raise InputFormatError(f"{where}: no cells with any expression.")
    return src


def read_10x_mtx(path: Path):
    """A 10x `filtered_feature_bc_matrix/` directory (matrix.mtx, features/genes.tsv, barcodes.tsv)."""
    import anndata as ad
    import scipy.io

    def find(*names):
        for n in names:
            for suffix in ("", ".gz"):
                if (path / f"{n}{suffix}").exists():
                    return path / f"{n}{suffix}"
        return None

    mtx, feats, bcs = find("matrix.mtx"), find("features.tsv", "genes.tsv"), find("barcodes.tsv")
    if not (mtx and feats and bcs):
        missing = [
            n
            for n, found in (
                ("matrix.mtx", mtx),
                ("features.tsv (or genes.tsv)", feats),
                ("barcodes.tsv", bcs),
            )
            if not found
        ]
        raise InputFormatError(
            f"{path}: not a 10x matrix directory: {' and '.join(missing)} missing; it needs "
            "matrix.mtx, features.tsv (or genes.tsv) and barcodes.tsv (optionally gzipped), as "
            "in Cell Ranger's filtered_feature_bc_matrix/: copy the missing files there, or "
            "give the path of the expression file itself."
        )
    try:
        m = scipy.io.mmread(str(mtx))
    except ValueError as e:
        raise InputFormatError(
            f"{mtx}: not a Matrix Market file ({e}); copy Cell Ranger's matrix.mtx(.gz) again."
        ) from e
    m = sp.csr_matrix(m).T.tocsr().astype(np.float32)  # genes x cells -> cells x genes
    f, b = _tsv_column(feats), _tsv_column(bcs)
    if m.shape != (len(b), len(f)):
        raise InputFormatError(
            f"{path}: matrix is {m.shape[1]} x {m.shape[0]} but has {len(f)} features and {len(b)} barcodes."
        )
    if f.shape[1] >= 3:
        keep = f[2].astype(str).str.contains("Gene Expression").to_numpy()
        m, f = m[:, keep], f[keep]
    var = pd.DataFrame(
        {"gene_ids": f[0].astype(str).to_numpy()},
        index=f[1 if f.shape[1] > 1 else 0].astype(str).to_numpy(),
    )
    return ad.AnnData(m, obs=pd.DataFrame(index=b[0].astype(str).to_numpy()), var=var)


def _tsv_column(path: Path) -> pd.DataFrame:
    """A 10x features or barcodes file (tab-separated, no header), or an error naming it."""
    try:
        return pd.read_csv(path, sep="\t", header=None)
    except pd.errors.EmptyDataError as e:
        raise InputFormatError(
            f"{path}: the file is empty; copy Cell Ranger's {path.name} into its matrix directory again."
        ) from e
    except (ValueError, pd.errors.ParserError) as e:
        raise InputFormatError(
            f"{path}: cannot parse as a tab-separated 10x file ({e}); copy Cell Ranger's "
            f"{path.name} into its matrix directory again."
        ) from e


def read_10x_h5(path: Path):
    """A 10x Cell Ranger .h5 matrix (v3 `matrix` group, or v2 per-genome groups)."""
    import anndata as ad
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise InputFormatError(
            f"{path}: not an HDF5 file ({e}); a .h5 file is read as a Cell Ranger matrix: check "
            "that it is the file you meant, or name it for its real format (.h5ad, .csv, .tsv, "
            ".parquet)."
        ) from e
    with f:
        grp = f["matrix"] if "matrix" in f else (f[next(iter(f.keys()))] if len(f.keys()) else None)
        if grp is None or not {"data", "indices", "indptr", "shape"} <= set(grp.keys()):
            raise InputFormatError(
                f"{path}: not a 10x Cell Ranger matrix .h5 (no data/indices/indptr/shape)."
            )
        n_genes, n_cells = (int(x) for x in grp["shape"][:])
        m = sp.csc_matrix(
            (grp["data"][:].astype(np.float32), grp["indices"][:], grp["indptr"][:]),
            shape=(n_genes, n_cells),
        )
        check_matrix(m, str(path))
        m = m.T.tocsr()
        if "features" in grp:
            names = grp["features/name"][:].astype(str)
            ids = grp["features/id"][:].astype(str)
            ftype = (
                grp["features/feature_type"][:].astype(str)
                if "feature_type" in grp["features"]
                else None
            )
        else:
            names, ids, ftype = grp["gene_names"][:].astype(str), grp["genes"][:].astype(str), None
        barcodes = grp["barcodes"][:].astype(str)
    if ftype is not None:
        keep = ftype == "Gene Expression"
        m, names, ids = m[:, keep], names[keep], ids[keep]
    return ad.AnnData(
        m, obs=pd.DataFrame(index=barcodes), var=pd.DataFrame({"gene_ids": ids}, index=names)
    )


def read_table(path: Path, *, transpose: bool = False):
    """CSV/TSV with cells as rows and genes as columns (first column: cell ids)."""
    import anndata as ad

    sep = "," if ".csv" in path.name.lower() else "\t"
    kind = "CSV" if sep == "," else "TSV"
    row, value = ("a gene: its name", "cell") if transpose else ("a cell: its id", "gene")
    try:
        df = pd.read_csv(path, sep=sep, index_col=0)
    except pd.errors.EmptyDataError as e:
        raise InputFormatError(
            f"{path}: no table in the file (not even a header line); the first line names the "
            f"{value}s, and each line after it is {row}, then one value per {value}."
        ) from e
    except (ValueError, pd.errors.ParserError) as e:
        raise InputFormatError(
            f"{path}: cannot parse as a {kind} table ({e}); a .csv file is read "
            "comma-separated, .tsv and .txt tab-separated: name the file for its separator."
        ) from e
    if len(df) == 0:
        raise InputFormatError(
            f"{path}: a header line but no rows below it; each line after the header is {row}, "
            f"then one value per {value}."
        )
    if transpose:
        df = df.T
    nonnum = [c for c in df.columns if not pd.api.types.is_numeric_dtype(df[c])]
    if nonnum:
        raise InputFormatError(
            f"{path}: non-numeric column(s) {', '.join(map(str, nonnum[:5]))}; the table must be cells x genes "
            "with a first column of cell ids (use --transpose for genes x cells)."
        )
    return ad.AnnData(
        sp.csr_matrix(df.to_numpy(dtype=np.float32)),
        obs=pd.DataFrame(index=df.index.astype(str)),
        var=pd.DataFrame(index=df.columns.astype(str)),
    )


def read_parquet(path: Path):
    """Parquet: long (cell, gene, value columns) or wide (a cell id column + one column per gene)."""
    import anndata as ad
    import polars as pl

    try:
        df = pl.read_parquet(path)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise InputFormatError(
            f"{path}: not a readable parquet file ({e}); check that it is the file you meant and "
            "was written to the end, or name it for its real format (.h5ad, .csv, .tsv)."
        ) from e
    cols = {c.lower(): c for c in df.columns}
    if {"cell", "gene", "value"} <= set(cols):
        cell, gene, value = cols["cell"], cols["gene"], cols["value"]
        cells = df[cell].cast(pl.String).unique(maintain_order=True)
        genes = df[gene].cast(pl.String).unique(maintain_order=True)
        ci = (
            df[cell]
            .cast(pl.String)
            .replace_strict(cells, pl.int_range(len(cells), eager=True))
            .to_numpy()
        )
        gi = (
            df[gene]
            .cast(pl.String)
            .replace_strict(genes, pl.int_range(len(genes), eager=True))
            .to_numpy()
        )
        m = sp.coo_matrix(
            (df[value].cast(pl.Float32).to_numpy(), (ci, gi)), shape=(len(cells), len(genes))
        ).tocsr()
        m.sum_duplicates()
        return ad.AnnData(
            m, obs=pd.DataFrame(index=cells.to_list()), var=pd.DataFrame(index=genes.to_list())
        )
    idcol = next((c for c in df.columns if not df.schema[c].is_numeric()), None)
    if idcol is None:
        raise InputFormatError(
            f"{path}: wide parquet needs a string cell-id column; long parquet needs cell, gene, value."
        )
    num = [c for c in df.columns if c != idcol]
    return ad.AnnData(
        sp.csr_matrix(df.select(num).to_numpy().astype(np.float32)),
        obs=pd.DataFrame(index=df[idcol].cast(pl.String).to_list()),
        var=pd.DataFrame(index=num),
    )
