import gzip

import numpy as np
import pandas as pd
import polars as pl
import pytest
import scipy.io
import scipy.sparse as sp

from cellvec.cell_index.readers import COUNTS, LOGNORM, read_expression
from cellvec.errors import InputFormatError
from helpers import SPARSE_DAMAGE, replace_dataset, tiny_adata


def _lognorm(x):
    x = np.asarray(x, dtype=np.float64)
    return np.log1p(x / x.sum(1, keepdims=True) * 1e4)


def test_h5ad_counts_are_normalised(tmp_path):
    a = tiny_adata()
    a.write_h5ad(tmp_path / "a.h5ad")
    src = read_expression(tmp_path / "a.h5ad")
    assert src.kind == COUNTS and src.n_obs == 60 and src.var_names[0] == "TGENE0"
    np.testing.assert_allclose(src.to_csr().toarray(), _lognorm(a.X.toarray()), rtol=1e-5)


def test_h5ad_backed_chunks_match_in_memory(tmp_path):
    a = tiny_adata(n_cells=90)
    a.write_h5ad(tmp_path / "a.h5ad")
    mem = read_expression(tmp_path / "a.h5ad", backed=False)
    backed = read_expression(tmp_path / "a.h5ad", backed=True)
    chunks = list(backed.chunks(size=25))
    assert [c[0] for c in chunks] == [slice(0, 25), slice(25, 50), slice(50, 75), slice(75, 90)]
    np.testing.assert_allclose(sp.vstack([c for _, c in chunks]).toarray(), mem.to_csr().toarray())


def test_layer_and_raw(tmp_path):
    a = tiny_adata()
    a.layers["counts"] = a.X.copy()
    a.raw = a.copy()
    a.X = sp.csr_matrix(a.X.toarray() - 3.0)  # scaled: negative values
    src = read_expression(a)  # X is scaled: .raw is used
    assert src.kind == COUNTS
    assert read_expression(a, layer="counts").kind == COUNTS
    with pytest.raises(InputFormatError, match="no layer 'nope'.*counts"):
        read_expression(a, layer="nope")


def test_scaled_without_raw_is_refused():
    a = tiny_adata()
    a.X = sp.csr_matrix(a.X.toarray() - 3.0)
    with pytest.raises(InputFormatError, match=r"scaled \(negative entries\).*\.raw.*--layer"):
        read_expression(a)


def test_nan_is_refused():
    a = tiny_adata(counts=False)
    x = a.X.toarray()
    x[3, 2] = np.nan
    a.X = sp.csr_matrix(x)
    with pytest.raises(InputFormatError, match="NaN/inf"):
        read_expression(a)


def test_negative_counts_beyond_sample_are_refused():
    a = tiny_adata(n_cells=2100)
    x = a.X.toarray()
    x[2050, 1] = -4  # past the 2,000-row sample used for detection
    a.X = sp.csr_matrix(x)
    with pytest.raises(InputFormatError, match="negative values among cells 0-2100"):
        read_expression(a)


def test_empty_cells_and_duplicate_genes_are_counted(caplog):
    a = tiny_adata()
    x = a.X.toarray()
    x[5] = 0
    a.X = sp.csr_matrix(x)
    a.var_names = ["TGENE0"] + list(a.var_names[1:-1]) + ["TGENE0"]
    with caplog.at_level("WARNING"):
        src = read_expression(a)
    assert src.n_obs == 59 and "c5" not in src.obs_names
    assert len(src.var_names) == 29
    assert "1 cells with no expression excluded" in caplog.text
    assert "1 duplicated gene names" in caplog.text


def test_10x_mtx_directory(tmp_path):
    a = tiny_adata()
    d = tmp_path / "filtered_feature_bc_matrix"
    d.mkdir()
    with gzip.open(d / "matrix.mtx.gz", "wb") as fh:
        scipy.io.mmwrite(fh, sp.csr_matrix(a.X.T).astype(np.int64))
    pd.DataFrame(
        {
            "id": [f"ENSG{i}" for i in range(a.n_vars)],
            "name": a.var_names,
            "type": "Gene Expression",
        }
    ).to_csv(d / "features.tsv.gz", sep="\t", header=False, index=False)
    pd.Series(a.obs_names).to_csv(d / "barcodes.tsv.gz", sep="\t", header=False, index=False)
    src = read_expression(d)
    assert src.var_names == list(a.var_names) and src.obs_names == list(a.obs_names)
    np.testing.assert_allclose(src.to_csr().toarray(), _lognorm(a.X.toarray()), rtol=1e-5)


def test_10x_h5(tmp_path):
    import h5py

    a = tiny_adata()
    m = sp.csc_matrix(a.X.T)
    with h5py.File(tmp_path / "m.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, m.indices, m.indptr
        g["shape"] = np.array(m.shape)
        g["barcodes"] = np.array(a.obs_names, dtype="S")
        feats = g.create_group("features")
        feats["name"] = np.array(a.var_names, dtype="S")
        feats["id"] = np.array([f"ENSG{i}" for i in range(a.n_vars)], dtype="S")
        feats["feature_type"] = np.array(["Gene Expression"] * a.n_vars, dtype="S")
    src = read_expression(tmp_path / "m.h5")
    np.testing.assert_allclose(src.to_csr().toarray(), _lognorm(a.X.toarray()), rtol=1e-5)


@pytest.mark.parametrize("transpose", [False, True])
def test_csv_tsv(tmp_path, transpose):
    a = tiny_adata()
    df = pd.DataFrame(a.X.toarray(), index=a.obs_names, columns=a.var_names)
    path = tmp_path / ("x.tsv" if transpose else "x.csv")
    (df.T if transpose else df).to_csv(path, sep="\t" if transpose else ",")
    src = read_expression(path, transpose=transpose)
    assert src.var_names == list(a.var_names) and src.n_obs == 60


def test_csv_not_numeric(tmp_path):
    (tmp_path / "x.csv").write_text("cell,CD3E,kind\nc1,3,T\n")
    with pytest.raises(InputFormatError, match="non-numeric column.*kind.*--transpose"):
        read_expression(tmp_path / "x.csv")


def test_parquet_long_and_wide(tmp_path):
    a = tiny_adata()
    coo = a.X.tocoo()
    pl.DataFrame(
        {
            "cell": np.asarray(a.obs_names)[coo.row],
            "gene": np.asarray(a.var_names)[coo.col],
            "value": coo.data,
        }
    ).write_parquet(tmp_path / "long.parquet")
    wide = pl.DataFrame(
        {
            "cell_id": list(a.obs_names),
            **{g: a.X[:, i].toarray().ravel() for i, g in enumerate(a.var_names)},
        }
    )
    wide.write_parquet(tmp_path / "wide.parquet")
    for name in ("long.parquet", "wide.parquet"):
        src = read_expression(tmp_path / name)
        assert src.n_obs == 60 and len(src.var_names) == 30
        order = [src.var_names.index(g) for g in a.var_names]
        np.testing.assert_allclose(
            src.to_csr().toarray()[:, order], _lognorm(a.X.toarray()), rtol=1e-5
        )


def test_lognormalised_used_as_is():
    a = tiny_adata(counts=False)
    src = read_expression(a)
    assert src.kind == LOGNORM
    np.testing.assert_allclose(src.to_csr().toarray(), a.X.toarray())


def test_unknown_format(tmp_path):
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(InputFormatError, match="unknown expression format"):
        read_expression(tmp_path / "x.xlsx")
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(InputFormatError, match="not a readable h5ad"):
        read_expression(bad)


def test_backed_file_is_checked_as_it_streams(tmp_path):
    a = tiny_adata(n_cells=2100)
    x = a.X.toarray()
    x[2050, 3] = np.inf  # past the 2,000-row sample read at open
    a.X = sp.csr_matrix(x)
    a.write_h5ad(tmp_path / "a.h5ad")
    src = read_expression(tmp_path / "a.h5ad", backed=True)  # no upfront pass over the data
    with pytest.raises(InputFormatError, match="NaN/inf values in cells 2000-2100"):
        list(src.chunks(size=1000))


def _h5ad_with(tmp_path, edit, n_cells: int = 12):
    """tiny_adata written by anndata, then its datasets changed by `edit(h5py.File)`."""
    import h5py

    path = tmp_path / "a.h5ad"
    tiny_adata(n_cells=n_cells).write_h5ad(path)
    with h5py.File(path, "r+") as f:
        edit(f)
    return path


@pytest.mark.parametrize("damage", SPARSE_DAMAGE)
@pytest.mark.parametrize("backed", [False, True])
def test_a_sparse_matrix_whose_structure_points_outside_it_is_refused(tmp_path, damage, backed):
    """scipy builds the matrix from the file's indices unchecked; its compiled code then
    read and wrote past its arrays (a crash, or another cell's memory read as values)."""
    path = _h5ad_with(tmp_path, SPARSE_DAMAGE[damage])
    with pytest.raises(InputFormatError, match="sparse expression matrix is malformed"):
        src = read_expression(path, backed=backed)
        list(src.chunks())


def test_a_backed_matrix_damaged_past_its_first_rows_is_refused_as_it_streams(tmp_path):
    """Backed, the first 2,000 rows are checked before anything reads them; the rest as
    each chunk streams, named by its cells."""

    def cell_2050_points_past_the_genes(f):
        indices = f["X/indices"][:]
        indices[int(f["X/indptr"][2050])] = 10**6
        replace_dataset(f, "X/indices", indices)

    src = read_expression(_h5ad_with(tmp_path, cell_2050_points_past_the_genes, 2100), backed=True)
    with pytest.raises(InputFormatError, match=r"\(cells 2000-2100\): the sparse expression matrix is malformed"):  # fmt: skip
        list(src.chunks(size=1000))


@pytest.mark.parametrize("values", ["bytes", "complex"])
def test_an_expression_matrix_of_values_that_are_not_real_numbers_is_refused(tmp_path, values):
    def dense(f):
        x = np.arange(12 * 30).reshape(12, 30)
        del f["X"]
        f["X"] = x.astype("S8") if values == "bytes" else x + 1j

    with pytest.raises(InputFormatError, match="not real numbers"):
        read_expression(_h5ad_with(tmp_path, dense))


def test_a_10x_h5_whose_indices_point_outside_the_matrix_is_refused(tmp_path):
    import h5py

    a = tiny_adata()
    m = sp.csc_matrix(a.X.T)
    indices = m.indices.copy()
    indices[0] = 10**6
    with h5py.File(tmp_path / "m.h5", "w") as f:
        g = f.create_group("matrix")
        g["data"], g["indices"], g["indptr"] = m.data, indices, m.indptr
        g["shape"] = np.array(m.shape)
        g["barcodes"] = np.array(a.obs_names, dtype="S")
        g["gene_names"] = np.array(a.var_names, dtype="S")
        g["genes"] = np.array(a.var_names, dtype="S")
    with pytest.raises(InputFormatError, match="m.h5: the sparse expression matrix is malformed"):
        read_expression(tmp_path / "m.h5")


def test_a_backed_csc_matrix_is_checked_before_its_rows_are_converted(tmp_path):
    """Read backed, a CSC matrix's first rows were converted to CSR (past its arrays)
    before any check of its structure."""
    import anndata as ad

    a = tiny_adata(n_cells=12)
    a = ad.AnnData(sp.csc_matrix(a.X), obs=a.obs, var=a.var)
    path = tmp_path / "csc.h5ad"
    a.write_h5ad(path)
    import h5py

    with h5py.File(path, "r+") as f:
        replace_dataset(f, "X/indices", np.r_[10**8, f["X/indices"][1:]])
    with pytest.raises(InputFormatError, match="sparse expression matrix is malformed"):
        read_expression(path, backed=True)
