"""Ortholog-aware gene matching: tiny tables against the fake store, and the real HCOP table."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from unittest import mock

import numpy as np
import pandas as pd
import pytest

from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.build import build_atlas
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.recipe import Recipe
from cellvec.errors import CellvecError, GeneMatchError, InputFormatError
from cellvec.gene_store import GeneStore
from cellvec.gene_store.orthologs import read_orthologs
from cellvec.gene_store.resolve import match_genes
from cellvec.gene_store.sources import read_gene_info
from helpers import SHARED, requires_shared, tiny_adata, tiny_genes, write_gene_info

FAST_REFINE = {"steps": 30, "batch_size": 32}  # the tests check plumbing, not accuracy
HCOP_HEADER = "Gene stable ID,Gene name,Human gene stable ID,Human gene name,supporting_source\n"


def _other_species(name: str) -> str:
    """TGENE3 -> Zt3: a name of 'another species' that matches no store gene directly."""
    return "Z" + name[0].lower() + name[len("XGENE") :]


def _pairs_csv(path, pairs):
    path.write_text("".join(f"{q},{s}\n" for q, s in pairs))
    return path


@pytest.fixture
def atlas_store(fake_store):
    build_atlas(
        tiny_adata(n_cells=90, seed=1), store=fake_store, name="tiny", label_key="cell_type"
    )
    return fake_store


def test_query_of_another_species_maps_through_orthologs(atlas_store, tmp_path, caplog):
    query = tiny_adata(n_cells=30, seed=2, prefix="q")
    renamed = query.copy()
    renamed.var_names = [_other_species(n) for n in query.var_names]
    table = _pairs_csv(tmp_path / "orth.csv", [(_other_species(n), n) for n in query.var_names])
    with pytest.raises(GeneMatchError, match=r"only 0 of 30 genes.*--orthologs"):
        map_cells(renamed, "tiny", store=atlas_store)
    with caplog.at_level("INFO"):
        res = map_cells(renamed, "tiny", store=atlas_store, orthologs=table, truth_key="cell_type")
    assert "0 genes matched directly, 30 through orthologs (orth.csv)" in caplog.text
    assert "compared with the atlas's cross-species view" in caplog.text
    assert res.metrics["accuracy"] == 1.0 and res.summary()["orthologs"] == "orth.csv"
    assert res.atlas == "tiny" and res.recipe["weighting"] == "softmax"
    # the same store genes, the view's recipe: the very vectors of the original names
    # mapped onto the view itself
    view = Atlas.open(atlas_store, "tiny__species")
    assert view.meta["species_view_of"] == "tiny" and view.meta["vote"] == "by_class_size"
    direct = map_cells(query, view)
    np.testing.assert_allclose(res.vectors, direct.vectors, atol=1e-6)
    assert res.recipe == direct.recipe
    # within the species, the atlas itself answers
    assert map_cells(query, "tiny", store=atlas_store).recipe["weighting"] == "value"


def test_the_cross_species_view_is_an_atlas_of_its_own_paired_by_an_id(fake_store):
    """`atlas build` writes the view just before the atlas; both carry one id (a digest of
    the view's fit and its cells), by which the atlas finds its own view. Listings and
    names keep it out of sight; a rebuild replaces both; reindexing keeps the pair."""
    from cellvec.cell_index.build import SPECIES_VIEW, index_atlas
    from cellvec.cell_index.table import list_atlases

    ref = tiny_adata(n_cells=90, seed=1)
    atlas = build_atlas(ref, store=fake_store, name="tiny", label_key="cell_type")
    info = atlas.meta["cross_species"]
    view = Atlas.open(fake_store, "tiny__species")
    assert info == {"id": view.meta["species_view_id"], **SPECIES_VIEW}
    assert view.recipe.weighting == "softmax" and view.meta["refine_options"]["level_shift"] == 1
    assert view.recipe.top_genes == atlas.recipe.top_genes and view.n_cells == atlas.n_cells
    np.testing.assert_array_equal(view.labels, atlas.labels)
    assert list_atlases(fake_store) == ["tiny"]
    with pytest.raises(CellvecError, match="not ending in __species"):
        build_atlas(ref, store=fake_store, name="x__species", label_key="cell_type")
    # the same cells and seed: the same view, the same id
    again = build_atlas(ref, store=fake_store, name="tiny", label_key="cell_type")
    assert again.meta["cross_species"]["id"] == info["id"]
    assert again.cross_species().version > view.version
    # another reference: another id
    other = build_atlas(tiny_adata(n_cells=60, seed=5), store=fake_store, name="tiny", label_key="cell_type")  # fmt: skip
    assert other.meta["cross_species"]["id"] != info["id"]
    # (re)indexing the atlas, or the view alone, writes new versions and keeps the pair
    index_atlas(fake_store, "tiny", index="memory")
    index_atlas(fake_store, "tiny__species", index="memory")
    reindexed = Atlas.open(fake_store, "tiny")
    assert reindexed.cross_species() is not None
    assert reindexed.cross_species().n_cells == reindexed.n_cells == 60


def test_a_build_that_fails_leaves_the_atlas_and_its_view_a_pair(fake_store, monkeypatch, caplog):
    """Both fits run before either write, so a rebuild that fails while fitting the atlas
    writes nothing; and `atlas index` never takes another build's view for the atlas's
    own (it indexes the atlas alone, with a warning)."""
    import cellvec.cell_index.build as build_mod
    from cellvec.cell_index.build import index_atlas

    build_atlas(tiny_adata(n_cells=90, seed=1), store=fake_store, name="tiny", label_key="cell_type")  # fmt: skip
    before = Atlas.open(fake_store, "tiny").cross_species().version
    fits = []
    real = build_mod.fit_encoder

    def second_fit_fails(*args, **kwargs):
        fits.append(1)
        if len(fits) == 2:  # the view fitted, the atlas's own fit fails
            raise MemoryError("out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_mod, "fit_encoder", second_fit_fails)
    with pytest.raises(MemoryError):
        build_atlas(tiny_adata(n_cells=60, seed=5), store=fake_store, name="tiny", label_key="cell_type")  # fmt: skip
    monkeypatch.undo()
    kept = Atlas.open(fake_store, "tiny")
    assert kept.n_cells == 90 and kept.cross_species().version == before
    # another build's view in place of the atlas's own (here: another atlas's view, copied)
    build_atlas(tiny_adata(n_cells=60, seed=5), store=fake_store, name="b", label_key="cell_type")  # fmt: skip
    from cellvec.storage import Store

    s = Store.of(fake_store)
    s.db.drop_table("atlas_tiny__species")
    s.db.create_table("atlas_tiny__species", s.open_table("atlas_b__species").to_arrow())
    with caplog.at_level("WARNING"):
        index_atlas(fake_store, "tiny", index="memory")
        assert Atlas.open(fake_store, "tiny").cross_species() is None
    assert "or is another build's" in caplog.text
    # the view gone: the atlas is still indexed
    s.db.drop_table("atlas_tiny__species")
    assert index_atlas(fake_store, "tiny", index="memory") == {"kind": "memory"}


def test_a_rebuild_without_a_view_removes_the_earlier_builds_view(fake_store):
    from cellvec.cell_index.build import BuildOptions
    from cellvec.storage import Store

    ref = tiny_adata(n_cells=90, seed=1)
    build_atlas(ref, store=fake_store, name="tiny", label_key="cell_type")
    assert "atlas_tiny__species" in Store.of(fake_store).table_names()
    atlas = build_atlas(
        ref,
        store=fake_store,
        name="tiny",
        label_key="cell_type",
        options=BuildOptions(cross_species=False),
    )
    assert "atlas_tiny__species" not in Store.of(fake_store).table_names()
    assert atlas.cross_species() is None and "cross_species" not in atlas.meta


@pytest.mark.parametrize(
    "recipe, options, why",
    [
        (Recipe(refine="none"), {}, "as it has no refinement"),
        (
            Recipe(weighting="softmax"),
            {"refine_options": {"level_shift": 1.0}},
            "as its own recipe is the cross-species one",
        ),
        (Recipe(), {"cross_species": False}, None),
    ],
)
def test_atlases_without_a_cross_species_view(fake_store, tmp_path, caplog, recipe, options, why):
    """No view where it would add nothing (no refinement; the atlas's own recipe is the
    view's) or where the user said so; a query of another species is then compared with
    the atlas itself, with a warning where its weighting carries across species badly."""
    from cellvec.cell_index.build import BuildOptions
    from cellvec.cell_index.table import ATLAS_PREFIX
    from cellvec.storage import Store

    with caplog.at_level("INFO"):
        atlas = build_atlas(
            tiny_adata(n_cells=90, seed=1),
            store=fake_store,
            name="plain",
            label_key="cell_type",
            recipe=recipe,
            options=BuildOptions(**options),
        )
    assert "cross_species" not in atlas.meta and atlas.cross_species() is None
    assert ATLAS_PREFIX + "plain__species" not in Store.of(fake_store).table_names()
    if why:
        assert f"no cross-species view, {why}" in caplog.text
    query = tiny_adata(n_cells=30, seed=2, prefix="q")
    table = _pairs_csv(tmp_path / "orth.csv", [(_other_species(n), n) for n in query.var_names])
    query.var_names = [_other_species(n) for n in query.var_names]
    caplog.clear()
    with caplog.at_level("INFO"):
        res = map_cells(query, atlas, orthologs=table)
    assert res.recipe == atlas.recipe.to_dict()
    assert ("has no cross-species view" in caplog.text) == (recipe.weighting == "value")


def test_the_view_leaves_the_atlas_as_it_was(fake_store):
    """Fitting the view first changes nothing of the atlas itself (same seed, same vectors,
    same calibration), so nothing mapped within a species moves."""
    from cellvec.cell_index.build import BuildOptions

    ref = tiny_adata(n_cells=90, seed=1)
    with_view, without = (
        build_atlas(
            ref,
            store=fake_store,
            name=name,
            label_key="cell_type",
            options=BuildOptions(calibration_split=0.2, cross_species=view),
        )
        for name, view in (("with_view", True), ("without", False))
    )
    assert with_view.cross_species() is not None and without.cross_species() is None
    np.testing.assert_array_equal(with_view.vectors, without.vectors)
    np.testing.assert_array_equal(with_view.calibration(), without.calibration())
    assert with_view.recipe == without.recipe


def test_metadata_cannot_point_an_atlas_at_another_table(atlas_store, tmp_path, caplog):
    """The view's table is named from the atlas's own name, never from its metadata: an
    atlas (say, from a hostile bundle) whose metadata names another table, a path out of
    the store, or another id gets its own view, or none, and reads nothing else."""
    import json as json_

    from cellvec.storage import META_KEY, Store

    build_atlas(tiny_adata(n_cells=60, seed=3), store=atlas_store, name="other", label_key="cell_type")  # fmt: skip
    query = tiny_adata(n_cells=30, seed=2, prefix="q")
    table = _pairs_csv(tmp_path / "orth.csv", [(_other_species(n), n) for n in query.var_names])
    query.var_names = [_other_species(n) for n in query.var_names]
    want = map_cells(query, "tiny", store=atlas_store, orthologs=table)
    ds = Store.of(atlas_store).open_table("atlas_tiny").to_lance()
    meta = json_.loads(ds.schema.metadata[META_KEY])
    own = meta["cross_species"]["id"]
    for hostile in ("other", "other__species", "../../../etc/passwd", "tiny__species/../x"):
        cross = {**meta["cross_species"], "atlas": hostile}
        ds.update_schema_metadata(
            {META_KEY.decode(): json_.dumps({**meta, "cross_species": cross})}
        )
        atlas = Atlas.open(atlas_store, "tiny")
        assert atlas.cross_species().name == "tiny__species"
        got = map_cells(query, atlas, orthologs=table)
        np.testing.assert_array_equal(got.vectors, want.vectors)
    # an id that is not the view's (another, a number, none): the atlas answers alone
    for bad in (own[::-1], 7, None, [own]):
        cross = {**meta["cross_species"], "id": bad}
        ds.update_schema_metadata(
            {META_KEY.decode(): json_.dumps({**meta, "cross_species": cross})}
        )
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert Atlas.open(atlas_store, "tiny").cross_species() is None
        assert (
            "cross-species view tiny__species" in caplog.text and "Rebuild the atlas" in caplog.text
        )


def test_an_atlas_whose_view_is_gone_is_mapped_by_itself_with_a_warning(
    atlas_store, tmp_path, caplog
):
    from cellvec.storage import Store

    Store.of(atlas_store).db.drop_table("atlas_tiny__species")
    query = tiny_adata(n_cells=30, seed=2, prefix="q")
    table = _pairs_csv(tmp_path / "orth.csv", [(_other_species(n), n) for n in query.var_names])
    query.var_names = [_other_species(n) for n in query.var_names]
    with caplog.at_level("WARNING"):
        res = map_cells(query, "tiny", store=atlas_store, orthologs=table)
    assert f"cross-species view tiny__species is not in {atlas_store}" in caplog.text
    assert "Rebuild the atlas" in caplog.text and res.recipe["weighting"] == "value"


def test_the_view_s_vote_lets_a_class_smaller_than_k_win():
    """A class of 2 reference cells holding 2 of 5 neighbours outweighs a class of 10
    holding 3: scaled by 5 / 2 against 5 / 5. Classes of k cells or more are not scaled."""
    from cellvec.cell_index.knn import vote

    codes = np.array([0] * 10 + [1] * 2)
    idx = np.array([[0, 1, 10, 2, 11]])
    sim = np.full((1, 5), 0.9)
    plain = vote(idx, sim, codes, 2)
    np.testing.assert_allclose(plain, [[0.6, 0.4]])
    scaled = vote(idx, sim, codes, 2, class_sizes=np.bincount(codes))
    np.testing.assert_allclose(scaled, [[3 / 8, 5 / 8]])
    big = np.array([0] * 10 + [1] * 10)
    np.testing.assert_allclose(vote(idx, sim, big, 2, class_sizes=np.bincount(big)), plain)


def test_typicality_of_another_species_is_calibrated_on_level_shifted_views(fake_store, tmp_path):
    """Through orthologs, a query's typicality is judged against the calibration cells seen
    with every gene's level shifted, as another species shifts it: views further from
    their class than the cells themselves, the same on every open. A query whose levels
    are shifted keeps its known cells at 0.05, and most cells of a class the atlas lacks
    still come back unassigned (measured on 6 seeds: known 0.00, novel 0.65-0.90)."""
    import scipy.sparse as sp

    from cellvec.cell_index import mapping
    from cellvec.cell_index.build import BuildOptions
    from cellvec.cell_index.calibration import SPECIES_DRAWS, Calibration
    from cellvec.cell_index.calibration import species_calibrations as real
    from cellvec.cell_index.mapping import Reference

    ref = tiny_adata(n_cells=120, seed=1)
    ref = ref[ref.obs["cell_type"] != "M"].copy()
    options = BuildOptions(
        calibration_split=0.2,
        refine_options={"steps": 30, "batch_size": 32},
        cross_species=False,  # the calibration of the atlas itself (the view's: the same code)
    )
    atlas = build_atlas(ref, store=fake_store, name="ref", label_key="cell_type", options=options)
    own = Calibration.of_cells(Reference.of(atlas).target(None).calibration, atlas.label_codes()[1])
    other = Reference.of(atlas).target(None, other_species=True).calibration
    assert other.draws == SPECIES_DRAWS and len(other.values) == SPECIES_DRAWS * len(own.values)
    for c in np.unique(own.codes):
        assert other.values[other.codes == c].mean() < own.values[own.codes == c].mean() - 0.03
    again = Reference.of(Atlas.open(fake_store, "ref")).target(None, other_species=True)
    np.testing.assert_array_equal(again.calibration.values, other.values)

    query = tiny_adata(n_cells=60, seed=9, prefix="q")
    shift = np.exp(np.random.default_rng(0).normal(0, 1, query.n_vars))
    query.X = sp.csr_matrix(np.rint(query.X.toarray() * shift))
    table = _pairs_csv(tmp_path / "orth.csv", [(_other_species(n), n) for n in query.var_names])
    query.var_names = [_other_species(n) for n in query.var_names]
    calibrated = []
    with mock.patch.object(
        mapping, "species_calibrations", side_effect=lambda *a: calibrated.append(1) or real(*a)
    ):
        fresh = Atlas.open(fake_store, "ref")
        res = map_cells(query, fresh, orthologs=table, min_typicality=0.05)
        again = map_cells(query, fresh, orthologs=table, min_typicality=0.05)
    assert len(calibrated) == 1  # once per atlas and panel, not once per call
    np.testing.assert_array_equal(again.typicality, res.typicality)
    # a client sending ever other gene lists cannot grow what a served atlas keeps
    served = Reference.of(Atlas.open(fake_store, "ref"))
    for start in range(6):
        served.target(np.arange(start, start + 20), other_species=True)
    assert len(served._species) == 4
    novel = (query.obs["cell_type"] == "M").to_numpy()
    assert (res.labels[~novel] == "unassigned").mean() <= 0.1
    assert (res.labels[novel] == "unassigned").mean() >= 0.5


@pytest.mark.parametrize("weighting", ["softmax", "sqrt"])
def test_no_weighting_hint_for_an_atlas_weighted_for_other_species(
    fake_store, tmp_path, caplog, weighting
):
    build_atlas(
        tiny_adata(n_cells=90, seed=1),
        store=fake_store,
        name="soft",
        label_key="cell_type",
        recipe=Recipe(weighting=weighting),
    )
    query = tiny_adata(n_cells=30, seed=2, prefix="q")
    table = _pairs_csv(tmp_path / "orth.csv", [(_other_species(n), n) for n in query.var_names])
    query.var_names = [_other_species(n) for n in query.var_names]
    with caplog.at_level("INFO"):
        map_cells(query, "soft", store=fake_store, orthologs=table)
    assert "through orthologs" in caplog.text and "has no cross-species view" not in caplog.text


def test_one_to_many_resolution_is_deterministic(fake_store, tmp_path):
    genes = GeneStore(fake_store).load("fake").genes
    row = {s: i for i, s in enumerate(genes["symbol"])}
    table = _pairs_csv(
        tmp_path / "orth.csv",
        [
            ("Zt1", "TGENE1"),
            ("Zt1", "NOT_IN_STORE"),  # only one ortholog in the store: that one
            ("Zt2", "TGENE2"),
            ("Zt2", "TGENE3"),  # two in the store, equal support: skipped as ambiguous
            ("ZT4", "TGENE4"),  # reached case-insensitively (upper-case mouse names)
        ],
    )
    orth = read_orthologs(table)
    m = match_genes(["Zt1", "Zt2", "zt4", "Zt9"], genes, orthologs=orth)
    assert m.rows.tolist() == [row["TGENE1"], -1, row["TGENE4"], -1]
    assert m.how == ["ortholog", "ortholog (ambiguous)", "ortholog", None]
    # a tie goes to the ortholog with the query's own symbol, case aside
    tie = read_orthologs(
        _pairs_csv(tmp_path / "tie.csv", [("Tgene5", "TGENE6"), ("Tgene5", "TGENE5")])
    )
    assert tie.store_rows(["TGENE5"], genes) == ([row["TGENE5"]], ["ortholog (best of several)"])


def test_more_supporting_sources_win_in_an_hcop_table(fake_store, tmp_path):
    genes = GeneStore(fake_store).load("fake").genes
    row = {s: i for i, s in enumerate(genes["symbol"])}
    path = tmp_path / "hcop.csv.gz"
    lines = [
        "ENSMUSG00000000001,Zb0,ENSG00000001012,BGENE1,OrthoMCL\n",
        'ENSMUSG00000000001,Zb0,ENSG00000001011,BGENE0,"HGNC,NCBI,Ensembl"\n',
        "ENSMUSG00000000002,Zb2,ENSG00000001014,-,Ensembl\n",  # no human symbol: its Ensembl id
    ]
    path.write_bytes(gzip.compress((HCOP_HEADER + "".join(lines)).encode()))
    orth = read_orthologs(path)
    assert (orth.query_species, orth.store_species) == ("mouse", "human")
    m = match_genes(["Zb0", "Zb2"], genes, orthologs=orth)
    assert m.rows.tolist() == [row["BGENE0"], row["BGENE3"]]
    assert m.how == ["ortholog (best of several)", "ortholog"]
    assert m.counts() == {"ortholog (best of several)": 1, "ortholog": 1}


def test_one_hcop_table_serves_both_directions(tmp_path):
    human = tiny_genes()
    mouse = [{**g, "id": g["id"] + 5000, "symbol": _other_species(g["symbol"])} for g in human]
    hu = read_gene_info(write_gene_info(tmp_path / "hu.gz", human, tax=9606))
    mo = read_gene_info(write_gene_info(tmp_path / "mo.gz", mouse, tax=10090))
    path = tmp_path / "hcop.csv"
    path.write_text(
        HCOP_HEADER
        + "".join(
            f"ENSMUSG{m['id']:011d},{m['symbol']},ENSG{h['id']:011d},{h['symbol']},HGNC\n"
            for m, h in zip(mouse, human)
        )
    )
    orth = read_orthologs(path)
    mouse_names, human_names = list(mo["symbol"]), list(hu["symbol"])
    to_human = match_genes([n.upper() for n in mouse_names], hu, orthologs=orth)
    to_mouse = match_genes(human_names, mo, orthologs=orth)
    assert to_human.rows.tolist() == list(range(30)) and set(to_human.how) == {"ortholog"}
    assert to_mouse.rows.tolist() == list(range(30)) and set(to_mouse.how) == {"ortholog"}


def test_orthologs_come_before_synonyms_but_not_symbols(tmp_path):
    # Across species a synonym often names a paralog: mouse Tac2 is a synonym of human TAC1,
    # its ortholog is TAC3.
    genes = [
        {"id": 1, "symbol": "TAC1", "syn": "TAC2|NKNA", "ens": "ENSG1", "name": "tachykinin 1"},
        {"id": 3, "symbol": "TAC3", "syn": "NKB", "ens": "ENSG3", "name": "tachykinin 3"},
        {"id": 4, "symbol": "GAD1", "syn": "-", "ens": "ENSG4", "name": "decarboxylase 1"},
        {"id": 5, "symbol": "GAD2", "syn": "-", "ens": "ENSG5", "name": "decarboxylase 2"},
    ]
    hu = read_gene_info(write_gene_info(tmp_path / "hu.gz", genes))
    orth = read_orthologs(
        _pairs_csv(tmp_path / "o.csv", [("Tac2", "TAC3"), ("Gad1", "GAD2"), ("Nkna", "TAC3")])
    )
    plain = match_genes(["Tac2", "Gad1", "Nkna"], hu)
    assert plain.how == ["synonym", "symbol (case)", "synonym"]
    m = match_genes(["Tac2", "Gad1", "Nkna"], hu, orthologs=orth)
    assert m.rows.tolist() == [1, 2, 1] and m.how == ["ortholog", "symbol (case)", "ortholog"]


def test_gene_basis_cache_is_keyed_by_the_ortholog_table(atlas_store, tmp_path):
    enc = Atlas.open(atlas_store, "tiny").encoder()
    names = ["Zt0", "Zt1"] + [g["symbol"] for g in tiny_genes()[2:]]
    one = read_orthologs(_pairs_csv(tmp_path / "a.csv", [("Zt0", "TGENE0"), ("Zt1", "TGENE1")]))
    other = read_orthologs(_pairs_csv(tmp_path / "b.csv", [("Zt0", "MGENE0"), ("Zt1", "MGENE1")]))
    b1, b2 = enc.basis(names, orthologs=one), enc.basis(names, orthologs=other)
    row = {s: i for i, s in enumerate(enc.genes.genes["symbol"])}
    assert b1.rows[:2].tolist() == [row["TGENE0"], row["TGENE1"]]
    assert b2.rows[:2].tolist() == [row["MGENE0"], row["MGENE1"]]
    assert enc.basis(names, orthologs=read_orthologs(tmp_path / "a.csv")) is b1  # same content
    assert len(enc.basis(names).rows) == 28  # no table: the two names match nothing


@pytest.mark.parametrize(
    "text, message",
    [
        ("Zt0\nZt1\n", r"bad\.csv: not an ortholog table \(1 column.*two columns"),
        ("a,b,c\n1,2,3\n", r"bad\.csv: not an ortholog table: its first row has 3 columns"),
        (
            "Gene stable ID,Human gene name\nENSMUSG1,CD3E\n",
            r"bad\.csv: an Ensembl/HCOP ortholog table needs both 'Gene name' and 'Human gene name'",
        ),
        ("mouse,human\nZt0,-\n", r"bad\.csv: no ortholog pairs"),
    ],
)
def test_malformed_tables_name_the_file_and_the_columns(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(InputFormatError, match=message):
        read_orthologs(path)


def test_map_cli_takes_orthologs(atlas_store, tmp_path, caplog):
    from click.testing import CliRunner

    from cellvec.cli import cli

    query = tiny_adata(n_cells=30, seed=2, prefix="q")
    query.var_names = [_other_species(n) for n in query.var_names]
    q = tmp_path / "q.h5ad"
    query.write_h5ad(q)
    table = tmp_path / "orth.tsv"
    table.write_text(
        "mouse\thuman\n" + "".join(f"{_other_species(n)}\t{n}\n" for n in tiny_adata().var_names)
    )
    args = [
        "map",
        str(q),
        "--store",
        str(atlas_store),
        "--atlas",
        "tiny",
        "--truth-key",
        "cell_type",
    ]
    with caplog.at_level("INFO"):
        res = CliRunner().invoke(cli, [*args, "--orthologs", str(table), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["accuracy"] == 1.0 and out["orthologs"] == "orth.tsv"
    assert "30 through orthologs (orth.tsv)" in caplog.text
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "--orthologs" in res.output
    # the view is reached through its atlas, never by its own name
    view = [*args[:5], "tiny__species", *args[6:], "--orthologs", str(table)]
    res = CliRunner().invoke(cli, view)
    assert (
        res.exit_code == 1
        and "'tiny__species' is the cross-species view of atlas 'tiny'" in res.output
    )


@requires_shared
@pytest.mark.realdata
def test_hcop_translates_upper_case_amacrine_genes_to_human():
    """Macosko 2015's upper-case mouse names through the real HCOP table onto NCBI human genes."""
    import anndata as ad

    orth = read_orthologs(SHARED / "genes" / "hcop_mouse_to_human.csv.gz")
    assert (orth.query_species, orth.store_species) == ("mouse", "human")
    human = read_gene_info(SHARED / "genes" / "human.gene_info.gz", species="human")
    a = ad.read_h5ad(SHARED / "cells" / "macosko2015_amacrine.h5ad", backed="r")
    names = [str(v) for v in a.var["gene_symbol_upper"]]
    assert len(names) > 500
    rows, how = orth.store_rows(names, human)  # through the table alone: 572 of 614 measured
    assert (rows >= 0).mean() > 0.85
    sym = dict(zip(names, (human["symbol"][int(r)] if r >= 0 else None for r in rows)))
    assert sym["GAD1"] == "GAD1"  # one-to-many (GAD1, GAD2): the better supported
    assert sym["TAC2"] == "TAC3" and sym["CAR2"] == "CA2"  # orthologs with other names
    with_table = match_genes(names, human, orthologs=orth)
    without = match_genes(names, human)
    assert with_table.n_matched > without.n_matched  # 594 against 587 measured
    assert with_table.counts()["ortholog"] >= 5


def test_evaluate_species_swap_maps_each_folds_query_back_through_the_table(fake_store, tmp_path):
    """The query renamed to 'mouse' symbols; genes without a one-to-one ortholog are lost."""
    from click.testing import CliRunner

    from cellvec.cell_index.recipe import Recipe
    from cellvec.cli import cli
    from cellvec.evaluation.evaluate import evaluate
    from cellvec.evaluation.plan import EvaluationPlan, Scenarios, Transfer

    names = [g["symbol"] for g in tiny_genes()]
    pairs = [(_other_species(n), n) for n in names[:-3]]  # 3 genes have no ortholog
    pairs += [(_other_species(names[0]), names[-1])]  # a one-to-many pair: not one-to-one
    table = tmp_path / "orth.csv"
    table.write_text("mouse,human\n" + "".join(f"{q},{s}\n" for q, s in pairs))
    data = tiny_adata(n_cells=90, seed=4)
    res = evaluate(
        data,
        label_key="cell_type",
        store=fake_store,
        recipe=Recipe(top_genes=10, refine="none"),
        plan=EvaluationPlan(folds=3),
        scenarios=Scenarios(
            species_swap="mouse",
            orthologs=table,
            transfer=Transfer(tiny_adata(n_cells=30, seed=5, prefix="q")),
        ),
    )
    sw = res.to_dict()["species_swap"]
    assert sw["to"] == "mouse" and sw["orthologs"] == "orth.csv"
    assert tuple(sw["genes"]["folds"]) == (26, 30) and tuple(sw["genes"]["transfer"]) == (26, 30)
    assert set(sw["folds"]) == {"logreg_expr", "logreg_panel", "cellvec"}
    assert sw["folds"]["cellvec"]["accuracy"] >= 0.9 and sw["folds"]["cellvec"]["n_cells"] == 90
    assert sw["transfer"]["cellvec"]["accuracy"] >= 0.9
    assert "query as mouse" in res.to_markdown()
    path = tmp_path / "data.h5ad"
    data.write_h5ad(path)
    args = ["evaluate", str(path), "--label-key", "cell_type", "--store", str(fake_store)]
    args += ["--species-swap", "mouse", "--representations", "none"]
    out = CliRunner().invoke(
        cli,
        args
        + ["--folds", "3", "--refine", "none", "--top-genes", "10"]
        + ["--orthologs", str(table), "--json"],
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["species_swap"]["folds"]["cellvec"]["accuracy"] >= 0.9
    out = CliRunner().invoke(cli, args)
    assert out.exit_code != 0 and "needs an ortholog table" in out.output


def test_evaluate_species_swap_scores_what_map_orthologs_gives(fake_store, tmp_path, monkeypatch):
    """With refinement, each fold's renamed query is compared with that fold's atlas's
    cross-species view (fitted once per fold, as `atlas build` fits it), as `map --orthologs`
    compares it; a query of the atlas's own species never fits one."""
    from cellvec.evaluation import representations
    from cellvec.evaluation.evaluate import evaluate
    from cellvec.evaluation.plan import EvaluationPlan, Scenarios

    views = []
    real = representations.Predictors.with_view

    def spy(self, name, atlas, ref, y_ref):
        out = real(self, name, atlas, ref, y_ref)
        views.append(out.cross_species())
        return out

    monkeypatch.setattr(representations.Predictors, "with_view", spy)
    names = [g["symbol"] for g in tiny_genes()]
    table = tmp_path / "orth.csv"  # the species named: --species-swap renames into one
    table.write_text("mouse,human\n" + "".join(f"{_other_species(n)},{n}\n" for n in names))
    data = tiny_adata(n_cells=90, seed=4)
    plan = EvaluationPlan(folds=3, representations=("cellvec",), refine_options=FAST_REFINE)
    res = evaluate(
        data,
        label_key="cell_type",
        store=fake_store,
        recipe=Recipe(top_genes=10),
        plan=plan,
        scenarios=Scenarios(species_swap="mouse", orthologs=table),
    )
    assert len(views) == 3 and len({id(v) for v in views}) == 3  # one view per fold
    assert {v.recipe.weighting for v in views} == {"softmax"}
    assert all(v.meta["vote"] == "by_class_size" for v in views)
    assert res.to_dict()["species_swap"]["folds"]["cellvec"]["accuracy"] >= 0.9
    views.clear()
    evaluate(data, label_key="cell_type", store=fake_store, recipe=Recipe(top_genes=10), plan=plan)
    assert views == []


def test_one_to_one_translation_of_hcop_both_ways(tmp_path):
    path = tmp_path / "hcop.csv"
    path.write_text(
        HCOP_HEADER
        + "ENSMUSG1,Cd3e,ENSG1,CD3E,a\n"
        + "ENSMUSG2,Gm1,ENSG2,PARA1,a\nENSMUSG2,Gm1,ENSG3,PARA2,a\n"  # one-to-many: dropped
        + "ENSMUSG4,Ly6a,ENSG4,,a\n"  # no human symbol: dropped
        + "ENSMUSG5,Ensa,ENSG5,ENSA,a\n"  # a symbol that merely starts like an Ensembl id
        + "ENSMUSG6,Tmem6,ENSG6,ENSG00000141510.5,a\n"  # a versioned id for a symbol: dropped
    )
    t = read_orthologs(path)
    assert t.one_to_one("human") == {"CD3E": "CD3E", "ENSA": "ENSA"}
    assert t.one_to_one("mouse") == {"CD3E": "Cd3e", "ENSA": "Ensa"}
    with pytest.raises(InputFormatError, match="not into rat"):
        t.one_to_one("rat")


def test_many_to_one_orthologs_are_counted_once(atlas_store, tmp_path, caplog):
    """Two paralogs of the query reaching one atlas gene: their expression is summed (as
    counts) into that gene, which is counted once, so gene_coverage never exceeds 1 and a
    gene split in two paralogs gives the vectors of the gene whole."""
    import anndata as ad
    import scipy.sparse as sp

    query = tiny_adata(n_cells=30, seed=2, prefix="q")
    panel = query[:, 4:].copy()  # a panel: 26 of the atlas's 30 genes, so coverage is computed
    x = panel.X.toarray()
    half = np.floor(x[:, :6] / 2)
    split = np.hstack([x[:, :6] - half, half, x[:, 6:]])
    names = list(panel.var_names)
    renamed = [_other_species(n) for n in names[:6]]
    paralogs = [n + "b" for n in renamed]  # Zt4 and Zt4b both -> TGENE4
    query2 = ad.AnnData(
        sp.csr_matrix(split),
        obs=panel.obs,
        var=pd.DataFrame(index=renamed + paralogs + [_other_species(n) for n in names[6:]]),
    )
    pairs = [(_other_species(n), n) for n in names] + list(zip(paralogs, names[:6]))
    table = _pairs_csv(tmp_path / "orth.csv", pairs)
    whole = map_cells(panel, Atlas.open(atlas_store, "tiny__species"))  # what orthologs reach
    with caplog.at_level("INFO"):
        res = map_cells(query2, "tiny", store=atlas_store, orthologs=table)
    assert "6 store genes are reached by 2 or more of its genes (12 genes in all)" in caplog.text
    assert whole.gene_coverage < 1
    assert res.gene_coverage == pytest.approx(whole.gene_coverage)
    np.testing.assert_allclose(res.vectors, whole.vectors, atol=1e-5)
    # the basis map_cells takes coverage over places each atlas gene once
    enc = Atlas.open(atlas_store, "tiny").encoder()
    basis = enc.basis(list(query2.var_names), orthologs=read_orthologs(table))
    assert len(basis.positions) == len(np.unique(basis.positions)) == 26
    with pytest.raises(CellvecError, match="fold them first"):
        replace(basis, positions=np.r_[basis.positions[:-1], basis.positions[0]])


def test_an_atlas_listing_a_store_gene_twice_is_mapped_with_a_warning_to_rebuild(
    atlas_store, caplog
):
    """Atlases built before store genes were counted once list a gene twice in gene_rows
    (two reference columns reaching it, weighted apart) while queries are folded now: the
    recipe version stays (atlases without such genes are unaffected), mapping warns."""
    from cellvec.cell_index.encoder import CellEncoder

    enc = Atlas.open(atlas_store, "tiny").encoder()
    names = [g["symbol"] for g in tiny_genes()]
    with caplog.at_level("WARNING"):
        enc.basis(names)
    assert "twice" not in caplog.text
    rows = enc.refinement["gene_rows"].copy()
    rows[1] = rows[0]
    old = CellEncoder(enc.recipe, enc.genes, enc.background, {**enc.refinement, "gene_rows": rows})
    with caplog.at_level("WARNING"):
        old.basis(names, "query")
    assert "query: the atlas lists 1 store genes twice" in caplog.text
    assert "Rebuild the atlas with `cellvec atlas build`" in caplog.text


def _split_reference(n_cells=90, seed=1, n_split=3):
    """A reference whose first `n_split` genes are each measured in two columns (the gene
    and its synonym, e.g. TGENE0 and TALIAS0, both reaching store gene TGENE0) that share
    its counts, and the reference with each gene whole."""
    import anndata as ad
    import scipy.sparse as sp

    whole = tiny_adata(n_cells=n_cells, seed=seed)
    x = whole.X.toarray()
    half = np.floor(x[:, :n_split] / 2)
    names = list(whole.var_names)
    split = ad.AnnData(
        sp.csr_matrix(np.hstack([x[:, :n_split] - half, x[:, n_split:], half])),
        obs=whole.obs,
        var=pd.DataFrame(index=names + [n.replace("GENE", "ALIAS") for n in names[:n_split]]),
    )
    return split, whole


def test_an_atlas_of_a_reference_measuring_a_gene_twice_counts_it_once(fake_store, caplog):
    """Two reference columns reaching one store gene are summed (as counts) into it when
    the atlas is built (`fit_encoder`): the atlas lists the gene once and equals the atlas
    of the reference with the gene whole."""
    split, whole = _split_reference()
    # every gene kept (top_genes above 30): no tie at the N-th place to break differently
    options = dict(
        store=fake_store, label_key="cell_type", recipe=Recipe(refine="none", top_genes=40)
    )
    with caplog.at_level("INFO"):
        a = build_atlas(split, name="split", **options)
    assert "3 store genes are reached by 2 or more of its genes (6 genes in all)" in caplog.text
    b = build_atlas(whole, name="whole", **options)
    rows = a.encoder().refinement["gene_rows"]
    assert len(np.unique(rows)) == len(rows) == 30
    np.testing.assert_array_equal(rows, b.encoder().refinement["gene_rows"])
    np.testing.assert_allclose(a.weights().toarray(), b.weights().toarray(), atol=1e-6)
    np.testing.assert_allclose(a.vectors, b.vectors, atol=1e-5)


def test_ray_workers_fold_a_reference_gene_measured_twice_as_one_process_does(fake_store):
    """`parallel._weights_batch` (what each Ray worker runs, called here without a
    cluster) gives the top-gene weights `fit_encoder` computes in one process."""
    pytest.importorskip("ray", reason="Ray is the `ray` extra: pip install 'cellvec[ray]'")
    import pyarrow as pa

    from cellvec.cell_index.parallel import CHUNK, _weights_batch
    from cellvec.cell_index.readers import read_expression
    from cellvec.cell_index.recipe import Recipe
    from cellvec.cell_index.table import weight_matrix
    from cellvec.cell_index.vectors import (
        GeneBasis,
        fold_duplicates,
        match_dataset_genes,
        weights_matrix,
    )

    source = read_expression(_split_reference()[0])
    genes = GeneStore(fake_store).load("fake")
    cols, rows, fold = fold_duplicates(*match_dataset_genes(source.var_names, genes))
    assert fold is not None and fold.shape == (2, 3)
    basis = GeneBasis(cols, rows, genes.vectors[rows], len(source.var_names), fold=fold)
    recipe = Recipe(top_genes=10)
    reader = {"chunk": CHUNK, "blocks": [block for _, block in source.chunks(CHUNK)]}
    out = _weights_batch(
        pa.table({"start": [0], "stop": [source.n_obs]}),
        {"reader": reader, "basis": basis, "recipe": recipe},
    )
    assert out.column("row").to_pylist() == list(range(source.n_obs))
    np.testing.assert_array_equal(
        weight_matrix(out, len(cols)).toarray(),
        weights_matrix(source, basis, recipe)[:, cols].toarray(),
    )
