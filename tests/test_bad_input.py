"""Bad input files on the command line (issue 20): each is refused with one paragraph naming
the file, the problem and the fix, a non-zero exit and no traceback, and leaves nothing in
the store (no atlas table, no artifact, no mapping) and no output file behind."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pandas as pd
import polars as pl
import pytest
from click.testing import CliRunner

from cellvec.cell_index.build import build_atlas
from cellvec.cli import cli
from cellvec.storage import Store
from helpers import tiny_adata, tiny_genes

GENES = [g["symbol"] for g in tiny_genes()]


@pytest.fixture(scope="module")
def store(tmp_path_factory, copy_of_tiny_store):
    """The tiny fake gene store with atlas `tiny`, shared by the module (each test only
    reads it, or fails before writing)."""
    store = copy_of_tiny_store(tmp_path_factory.mktemp("bad-input"))
    build_atlas(tiny_adata(seed=1), store=store, name="tiny", label_key="cell_type")
    return store


def refused(store, args: list[str], *fragments: str) -> None:
    """Run `cellvec ARGS`: it must exit 1 with a one-paragraph error holding each fragment,
    no traceback, and no table added to the store."""
    before = set(Store(store).table_names())
    res = CliRunner().invoke(cli, args)
    assert isinstance(res.exception, SystemExit), res.exception  # an error, not a crash
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    error = res.output[res.output.index("Error: ") :]
    assert error.count("\n") == 1, error
    for f in fragments:
        assert f in error, error
    assert set(Store(store).table_names()) == before


def build_args(store, path, *extra: str, name: str = "bad") -> list[str]:
    return [
        *("atlas", "build", str(path), "--store", str(store), "--name", name),
        *("--label-key", "cell_type", "--top-genes", "10", *extra),
    ]


def map_args(store, path, *extra: str) -> list[str]:
    return ["map", str(path), "--store", str(store), "--atlas", "tiny", *extra]


# --- atlas build: labels ------------------------------------------------------------------


def with_labels(tmp_path, labels):
    a = tiny_adata()
    a.obs["cell_type"] = labels
    path = tmp_path / "ref.h5ad"
    a.write_h5ad(path)
    return path


def test_build_with_no_labels_at_all(tmp_path, store):
    path = with_labels(tmp_path, pd.Categorical([np.nan] * 60, categories=["T"]))
    refused(
        store,
        build_args(store, path),
        str(path),
        "none of its 60 cells has a 'cell_type' label",
        "--label-key (obs columns: cell_type, batch)",
    )


def test_build_with_one_class(tmp_path, store):
    path = with_labels(tmp_path, ["T"] * 60)
    refused(
        store,
        build_args(store, path),
        str(path),
        "all 60 labelled cells are 'T'",
        "at least two",
        "--label-key",
    )


def test_build_whose_exclusions_leave_one_class(tmp_path, store):
    path = with_labels(tmp_path, tiny_adata().obs["cell_type"])
    refused(
        store,
        build_args(store, path, "--exclude-labels", "B,M"),
        str(path),
        "after --exclude-labels B,M are 'T'",
        "exclude fewer labels",
    )


@pytest.mark.parametrize("option", ["--batch-key", "--broad-label-key"])
def test_build_with_a_missing_obs_column(tmp_path, store, option):
    path = with_labels(tmp_path, tiny_adata().obs["cell_type"])
    refused(
        store,
        build_args(store, path, option, "donor"),
        str(path),
        "no cell annotation 'donor'",
        f"Name one with {option}.",
    )


def test_build_leaves_unlabelled_cells_out_with_a_count(tmp_path, store, caplog):
    labels = tiny_adata().obs["cell_type"].astype(object)
    labels[:7] = np.nan
    path = with_labels(tmp_path, labels)
    with caplog.at_level(logging.WARNING):
        res = CliRunner().invoke(cli, build_args(store, path, name="partly"))
    assert res.exit_code == 0, res.output
    assert "53 cells, 3 classes" in res.output
    assert "7 cells without a cell_type label excluded" in caplog.text


# --- map: query files ---------------------------------------------------------------------


def h5ad_without_genes(path):
    tiny_adata()[:, :0].copy().write_h5ad(path)


def h5ad_without_cells(path):
    tiny_adata()[:0].copy().write_h5ad(path)


def hdf5_not_anndata(path):
    with h5py.File(path, "w") as f:
        f.create_group("matrix").create_dataset("data", data=np.arange(3))


def mtx_dir(missing: str = "", matrix: str | None = None):
    def write(path):
        path.mkdir()
        files = {
            "matrix.mtx": matrix
            or "%%MatrixMarket matrix coordinate integer general\n1 1 1\n1 1 5\n",
            "features.tsv": "g1\tTGENE0\tGene Expression\n",
            "barcodes.tsv": "c1\n",
        }
        for name, text in files.items():
            if name != missing:
                (path / name).write_text(text)

    return write


def parquet_without_rows(path):
    pl.DataFrame(
        {"cell": pl.Series([], dtype=pl.String), "TGENE0": pl.Series([], dtype=pl.Float32)}
    ).write_parquet(path)


QUERIES = {
    # name: (file name, writer, what the message says beyond the file's name)
    "h5ad-0-genes": ("q.h5ad", h5ad_without_genes, ["no genes", "--layer or .raw"]),
    "h5ad-0-cells": ("q.h5ad", h5ad_without_cells, ["no cells", "give a file that holds cells"]),
    "csv-header-only": (
        "q.csv",
        lambda p: p.write_text("cell," + ",".join(GENES) + "\n"),
        ["a header line but no rows", "each line after the header is a cell"],
    ),
    "csv-blank-lines": (
        "q.csv",
        lambda p: p.write_text("\n\n"),
        ["no table in the file", "the first line names the genes"],
    ),
    "h5ad-empty": ("q.h5ad", lambda p: p.write_bytes(b""), ["empty (0 bytes)", "again"]),
    "h5ad-not-hdf5": (
        "q.h5ad",
        lambda p: p.write_text("cell,TGENE0\nc1,3\n"),
        ["not an HDF5 file", "name it for its real format"],
    ),
    "h5ad-hdf5-not-anndata": (
        "q.h5ad",
        hdf5_not_anndata,
        ["an HDF5 file but not a readable h5ad", "AnnData.write_h5ad"],
    ),
    "h5ad-directory": (
        "q.h5ad",
        lambda p: p.mkdir(),
        ["a directory, not a .h5ad file", "give the path of the file itself"],
    ),
    "h5-not-hdf5": ("q.h5", lambda p: p.write_text("x"), ["not an HDF5 file", "real format"]),
    "10x-missing-features": (
        "filtered",
        mtx_dir(missing="features.tsv"),
        ["features.tsv (or genes.tsv) missing", "copy the missing files there"],
    ),
    "10x-bad-matrix": (
        "filtered",
        mtx_dir(matrix="not a matrix\n"),
        ["not a Matrix Market file", "copy Cell Ranger's matrix.mtx"],
    ),
    "10x-empty-barcodes": (
        "filtered",
        lambda p: (mtx_dir(missing="barcodes.tsv")(p), (p / "barcodes.tsv").write_text("")),
        ["barcodes.tsv: the file is empty", "copy Cell Ranger's barcodes.tsv"],
    ),
    "parquet-0-rows": ("q.parquet", parquet_without_rows, ["no cells (", "holds cells"]),
    "parquet-not-parquet": (
        "q.parquet",
        lambda p: p.write_text("not parquet"),
        ["not a readable parquet file", "real format"],
    ),
}


@pytest.mark.parametrize("case", list(QUERIES))
def test_map_refuses_a_bad_query_file(tmp_path, store, case):
    name, write, fragments = QUERIES[case]
    path = tmp_path / name
    write(path)
    out = tmp_path / "mapped.h5ad"
    refused(
        store, map_args(store, path, "--out", str(out), "--save-as", "run1"), str(path), *fragments
    )
    assert not out.exists()


# --- map: outputs and keys, refused before mapping ----------------------------------------


@pytest.fixture
def query(tmp_path):
    path = tmp_path / "q.h5ad"
    tiny_adata(n_cells=9, seed=2, prefix="q").write_h5ad(path)
    return path


def test_map_out_under_a_file(tmp_path, store, query):
    (tmp_path / "results").write_text("a file, not a folder")
    out = tmp_path / "results" / "mapped.h5ad"
    refused(
        store,
        map_args(store, query, "--out", str(out), "--save-as", "run1"),
        str(out),
        "results is a file",
        "write the output into another folder",
    )


def test_map_save_as_a_name_sql_cannot_hold(tmp_path, store, query):
    out = tmp_path / "mapped.h5ad"
    refused(
        store,
        map_args(store, query, "--out", str(out), "--save-as", "my run"),
        "'my run'",
        "use letters, digits and underscores",
    )
    assert not out.exists()
    # the atlases' limit too: mapping_<name>_clusters.lance must fit a file name
    refused(
        store,
        map_args(store, query, "--out", str(out), "--save-as", "a" * 201),
        "use letters, digits and underscores, up to 200",
    )
    assert not out.exists()


def test_map_truth_key_missing_names_its_option(store, query):
    refused(
        store,
        map_args(store, query, "--truth-key", "celltype"),
        str(query),
        "no cell annotation 'celltype'",
        "Name one with --truth-key.",
    )
