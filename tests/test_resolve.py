"""Gene-name resolution against real-format gene tables (NCBI gene_info written on the fly)."""

from __future__ import annotations

import numpy as np
import pytest

from cellvec.gene_store.resolve import match_genes
from cellvec.gene_store.sources import read_gene_info
from helpers import SHARED, requires_shared, tiny_genes, write_gene_info


def _gene(gid: int, symbol: str, syn: str = "-") -> dict:
    return {
        "id": gid,
        "symbol": symbol,
        "syn": syn,
        "ens": f"ENSMUSG{gid:011d}",
        "name": f"{symbol} protein",
    }


def _table(tmp_path, genes, tax=9606):
    return read_gene_info(write_gene_info(tmp_path / f"{tax}.gene_info.gz", genes, tax=tax))


def test_lower_case_names_match_a_human_table(tmp_path):
    table = _table(tmp_path, tiny_genes())
    names = list(table["symbol"])
    exact = match_genes(names, table)
    lower = match_genes([n.lower() for n in names], table)
    assert exact.n_matched == len(names) and set(exact.how) == {"symbol"}
    assert lower.n_matched == len(names) and set(lower.how) == {"symbol (case)"}
    np.testing.assert_array_equal(lower.rows, exact.rows)


def test_upper_case_names_match_a_mouse_table(tmp_path):
    # Macosko 2015 ships mouse genes upper-cased (CD3E for Cd3e).
    genes = [_gene(1, "Cd3e"), _gene(2, "Gad1"), _gene(3, "Slc17a6", "Vglut2")]
    table = _table(tmp_path, genes, tax=10090)
    m = match_genes(["CD3E", "GAD1", "SLC17A6", "VGLUT2", "Gad1"], table)
    assert m.rows.tolist() == [0, 1, 2, 2, 1]
    assert m.how == ["symbol (case)", "symbol (case)", "symbol (case)", "synonym", "symbol"]


def test_ambiguous_keys_are_not_used_and_exact_wins(tmp_path):
    genes = [
        _gene(1, "Foo"),
        _gene(2, "FOO"),  # same case-folded symbol as Foo: "foo" names neither
        _gene(3, "Bar", "Shared|Baz"),
        _gene(4, "Qux", "SHARED"),  # synonym naming two genes
        _gene(5, "Baz"),  # Baz is also a synonym of Bar: the symbol wins
    ]
    table = _table(tmp_path, genes, tax=10090)
    m = match_genes(["Foo", "FOO", "foo", "shared", "Baz", "BAZ", "bar", "nope"], table)
    assert m.rows.tolist() == [0, 1, -1, -1, 4, 4, 2, -1]
    assert m.how == [
        "symbol",
        "symbol",
        "ambiguous",
        "ambiguous",
        "symbol",
        "symbol (case)",
        "symbol (case)",
        None,
    ]
    assert m.n_matched == 5 and m.counts()["ambiguous"] == 2


@requires_shared
@pytest.mark.realdata
def test_real_names_match_in_either_case():
    """pbmc68k_reduced lower-cased against human NCBI genes (56 of 765 matched before the
    case tier was kept apart from the exact one); Macosko's upper-case names against mouse."""
    import anndata as ad

    cases = (
        ("pbmc68k_reduced", None, "human", str.lower),
        ("macosko2015_amacrine", "gene_symbol_upper", "mouse", str.upper),
    )
    for name, column, species, fold in cases:
        a = ad.read_h5ad(SHARED / "cells" / f"{name}.h5ad", backed="r")
        names = [str(v) for v in (a.var[column] if column else a.var_names)]
        table = read_gene_info(SHARED / "genes" / f"{species}.gene_info.gz", species=species)
        as_given = match_genes(names, table)
        folded = match_genes([fold(n) for n in names], table)
        assert as_given.n_matched > 0.95 * len(names), name
        assert folded.n_matched == as_given.n_matched, name
