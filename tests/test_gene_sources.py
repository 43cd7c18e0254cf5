import json
import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cellvec.errors import InputFormatError
from cellvec.gene_store.sources import read_gene2go, read_gene_info, read_summaries, read_vectors
from cellvec.gene_store.text import TEMPLATE_VERSION, compose_texts, text_hash
from helpers import SHARED, requires_shared, tiny_genes, write_gene_info


@pytest.mark.parametrize("gz", [True, False])
def test_gene_info_parses_real_format(tmp_path, gz):
    path = write_gene_info(
        tmp_path / ("g.gene_info.gz" if gz else "g.gene_info"), tiny_genes(2), gz=gz
    )
    df = read_gene_info(path, species="human")
    assert df.height == 6
    row = df.filter(pl.col("symbol") == "TGENE0").row(0, named=True)
    assert row["synonyms"] == ["TALIAS0", "TOLD0"]
    assert row["ensembl_id"].startswith("ENSG")
    assert row["tax_id"] == 9606 and row["type_of_gene"] == "protein-coding"


def test_gene_info_dash_means_empty(tmp_path):
    genes = tiny_genes(1)
    genes[0]["syn"] = "-"
    df = read_gene_info(write_gene_info(tmp_path / "g.gz", genes))
    assert df.filter(pl.col("symbol") == "TGENE0")["synonyms"].to_list() == [[]]


def test_not_gene_info_is_refused_with_fix(tmp_path):
    bad = tmp_path / "expr.tsv"
    bad.write_text("gene\tcell1\nCD3E\t4\n")
    with pytest.raises(
        InputFormatError, match=r"expr.tsv is not an NCBI gene_info file.*--gene-info"
    ):
        read_gene_info(bad)


def test_wrong_species_is_refused(tmp_path):
    path = write_gene_info(tmp_path / "g.gz", tiny_genes(1), tax=10090)
    with pytest.raises(
        InputFormatError, match=r"no genes of species human.*10090 \(mouse\).*--species"
    ):
        read_gene_info(path, species="human")


def test_gene2go_groups_by_category_and_drops_not(gene_files):
    go = read_gene2go(gene_files["gene2go"], tax_id=9606)
    row = go.filter(pl.col("gene_id") == 1001).row(0, named=True)
    assert row["go_process"] == ["T cell receptor signaling pathway"]
    assert row["go_function"] == ["lymphocyte activation"]  # the NOT-qualified term is dropped


def test_text_template_has_every_part(gene_files):
    genes = read_gene_info(gene_files["gene_info"])
    go = read_gene2go(gene_files["gene2go"])
    summ = pl.DataFrame({"symbol": ["TGENE0"], "summary": ["Drives T cell fate."]})
    df = compose_texts(genes, go, summ)
    text = df.filter(pl.col("symbol") == "TGENE0")["text"][0]
    for part in (
        "TGENE0: T lineage gene 0.",
        "protein-coding gene of human",
        "Summary: Drives T cell fate.",
        "Biological process: T cell receptor",
        "Cellular component: immune synapse",
        "Molecular function: lymphocyte activation",
        "Also known as: TALIAS0, TOLD0",
        "Other designations: T lineage gene 0 protein",
    ):
        assert part in text
    assert df["text_hash"][0] == text_hash(df["text"][0]) and TEMPLATE_VERSION == "ncbi-v1"


@pytest.mark.parametrize("fmt", ["json", "tsv", "csv", "parquet"])
def test_summaries_formats(tmp_path, fmt):
    data = {"CD3E": "T cell co-receptor.", "MS4A1": "B cell marker."}
    path = tmp_path / f"s.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps(data))
        df = read_summaries(path)
    elif fmt == "parquet":
        pl.DataFrame({"gene": list(data), "desc": list(data.values())}).write_parquet(path)
        df = read_summaries(path, symbol_column="gene", text_column="desc")
    else:
        sep = "\t" if fmt == "tsv" else ","
        path.write_text(
            f"symbol{sep}summary\n" + "".join(f"{k}{sep}{v}\n" for k, v in data.items())
        )
        df = read_summaries(path)
    assert dict(zip(df["symbol"], df["summary"])) == data


def test_summaries_bad_json_and_missing_column(tmp_path):
    p = tmp_path / "s.json"
    p.write_text(json.dumps(["not", "a", "dict"]))
    with pytest.raises(InputFormatError, match="symbol -> summary"):
        read_summaries(p)
    q = tmp_path / "s.tsv"
    q.write_text("a\tb\nx\ty\n")
    with pytest.raises(InputFormatError, match="--summary-symbol-column"):
        read_summaries(q)


FORMATS = [
    "pkl",
    "pkl_arrays_2",
    "pkl_arrays_4",
    "pkl_arrays_5",
    "npz",
    "npz_per_gene",
    "parquet_list",
    "parquet_wide",
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_vector_formats(tmp_path, fmt):
    vecs = {"CD3E": np.arange(4, dtype=np.float32), "MS4A1": np.ones(4, dtype=np.float32)}
    if fmt == "pkl":
        path = tmp_path / "v.pkl"
        path.write_bytes(pickle.dumps({k: list(map(float, v)) for k, v in vecs.items()}))
    elif fmt.startswith("pkl_arrays"):  # numpy arrays and scalars, as other exports pickle them
        path = tmp_path / "v.pickle"
        protocol = int(fmt.rsplit("_", 1)[1])
        obj = OrderedDict(CD3E=vecs["CD3E"], MS4A1=[np.float32(1)] * 4)
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
    elif fmt == "npz":
        path = tmp_path / "v.npz"
        np.savez(path, genes=np.array(list(vecs)), vectors=np.stack(list(vecs.values())))
    elif fmt == "npz_per_gene":
        path = tmp_path / "v.npz"
        np.savez(path, **vecs)
    elif fmt == "parquet_list":
        path = tmp_path / "v.parquet"
        pl.DataFrame(
            {"symbol": list(vecs), "vector": [v.tolist() for v in vecs.values()]}
        ).write_parquet(path)
    else:
        path = tmp_path / "v.parquet"
        pl.DataFrame(
            {
                "gene": list(vecs),
                **{f"d{i}": [float(v[i]) for v in vecs.values()] for i in range(4)},
            }
        ).write_parquet(path)
    symbols, mat = read_vectors(path)
    assert symbols == ["CD3E", "MS4A1"]
    np.testing.assert_allclose(mat, np.stack(list(vecs.values())))


class _Payload:
    """What a hostile pickle holds: loading it calls a function of the pickle's choosing."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_of_vectors_cannot_run_code(tmp_path):
    """GenePT's vectors are a pickle downloaded from elsewhere; pickle.load ran whatever
    function the file named (os.system included)."""
    marker = tmp_path / "ran"
    path = tmp_path / "v.pickle"
    path.write_bytes(pickle.dumps({"CD3E": [1.0, 2.0], "X": _Payload(marker)}))
    with pytest.raises(InputFormatError, match="asks for pathlib.*Path.touch"):
        read_vectors(path)
    assert not marker.exists()


def test_vectors_with_nan_are_refused(tmp_path):
    path = tmp_path / "v.npz"
    np.savez(path, genes=np.array(["A"]), vectors=np.array([[np.nan, 1.0]]))
    with pytest.raises(InputFormatError, match="NaN"):
        read_vectors(path)


@requires_shared
def test_real_mouse_gene_info_and_gene2go():
    df = read_gene_info(SHARED / "genes" / "mouse.gene_info.gz", species="mouse")
    assert df.height == 69_864
    assert (df["type_of_gene"] == "protein-coding").sum() == 25_942
    go = read_gene2go(SHARED / "genes" / "mouse.gene2go.gz", tax_id=10090)
    assert 24_000 <= go.height <= 24_193
    texts = compose_texts(df.head(2000), go)
    assert texts["text"].str.contains("Biological process:").sum() > 1000
