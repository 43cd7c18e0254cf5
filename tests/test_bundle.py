"""Atlas bundles: exported as one folder, fetched from a folder, a web server or a bucket
(servers on 127.0.0.1 that the tests start and stop), mapped with the same labels as the
original store, imported into other stores, described by a card, and refused when
tampered with."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

import cellvec.cell_index.build as build_module
from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.build import BuildOptions, build_atlas
from cellvec.cell_index.bundle import atlas_card, card_text, export_bundle, import_bundle
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.recipe import Recipe
from cellvec.cli import cli
from cellvec.errors import CellvecError, StoreError
from cellvec.fetch import MANIFEST, fetch_bundle, write_manifest
from cellvec.gene_store.resolve import match_genes
from cellvec.gene_store.store import GeneStore
from cellvec.storage import Store
from helpers import (
    FakeEmbedder,
    build_tiny_atlas,
    tiny_adata,
    tiny_genes,
    tiny_store,
)
from servers import static_server


def _extra_genes(n: int = 5) -> list[dict]:
    """Genes no reference cell measures (so no atlas uses them), one sharing a synonym."""
    return [
        {
            "id": 9000 + i,
            "symbol": f"XGENE{i}",
            "syn": f"XALIAS{i}" + ("|TALIAS0" if i == 0 else ""),
            "ens": f"ENSG{9000 + i:011d}",
            "name": f"unrelated gene {i}",
            "proc": "photosynthesis",
            "comp": "chloroplast",
            "func": "light harvesting",
        }
        for i in range(n)
    ]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("CELLVEC_CACHE", str(path))
    return path


@pytest.fixture
def atlas_store(tmp_path):
    """A store of the 30 tiny genes plus 5 no reference cell measures, with atlas `tiny`."""
    store = tiny_store(tmp_path / "store", tiny_genes() + _extra_genes())
    build_tiny_atlas(store)
    return store


@pytest.fixture
def bundle(atlas_store, tmp_path):
    card = {"tissue": "blood", "citation": "Test et al. 2026", "licence": "CC-BY-4.0"}
    export_bundle(atlas_store, "tiny", tmp_path / "tiny.cellvec", card=card)
    return tmp_path / "tiny.cellvec"


def _query():
    return tiny_adata(n_cells=30, seed=5, prefix="q")


def _run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_export_writes_a_small_store_with_a_checksum_for_every_file(bundle, atlas_store):
    manifest = json.loads((bundle / MANIFEST).read_text())
    on_disk = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {
        MANIFEST
    }
    assert set(manifest["files"]) == on_disk
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert manifest["atlas"] == "tiny" and "card.json" in manifest["files"]
    # the bundle is a store: its atlas opens and lists like any other
    assert [a["name"] for a in json.loads(_run("atlas", "list", "--store", bundle, "--json").stdout)["atlases"]] == ["tiny"]  # fmt: skip
    # every gene's names, the atlas's genes' vectors only, the original content hash
    full, part = GeneStore(atlas_store).load("fake"), GeneStore(bundle).load("fake")
    assert part.genes["symbol"].to_list() == full.genes["symbol"].to_list()
    used = np.abs(part.vectors).sum(1) > 0
    assert used.sum() == 30 and part.meta["restricted"]["genes_with_vectors"] == 30
    np.testing.assert_array_equal(part.vectors[used], full.vectors[used])
    assert part.meta["content_hash"] == full.meta["content_hash"]
    # a query gene matches the same gene by any name in both (XALIAS0 / TALIAS0 included)
    names = [n for g in tiny_genes() + _extra_genes() for n in (g["symbol"], g["ens"], *g["syn"].split("|"))]  # fmt: skip
    names += [n.lower() for n in names]
    np.testing.assert_array_equal(
        match_genes(names, part.genes).rows, match_genes(names, full.genes).rows
    )


def test_a_bundle_exports_again(bundle, atlas_store, tmp_path, cache):
    """A store whose gene table came from a bundle (restricted: empty vectors for the
    genes the atlas does not use) exports as the original store does."""
    again = export_bundle(bundle, "tiny", tmp_path / "again.cellvec")
    assert again.manifest_sha256 == fetch_bundle(again.path).path.name  # what names the copy
    first, second = GeneStore(bundle).load("fake"), GeneStore(again.path).load("fake")
    np.testing.assert_array_equal(second.vectors, first.vectors)
    assert second.genes.equals(first.genes) and second.meta["content_hash"] == first.meta["content_hash"]  # fmt: skip
    want = map_cells(_query(), "tiny", store=atlas_store).labels
    np.testing.assert_array_equal(map_cells(_query(), Atlas.open(again.path)).labels, want)


def test_a_disk_indexed_atlas_travels_with_its_index(atlas_store, tmp_path, cache, monkeypatch):
    build_atlas(tiny_adata(n_cells=300, seed=3), store=atlas_store, name="disk", label_key="cell_type", recipe=Recipe(top_genes=10), options=BuildOptions(index="disk"))  # fmt: skip
    want = Atlas.open(atlas_store, "disk").meta["index"]
    built = []  # each copied table is indexed once: the atlas and its view, not the view twice
    real = build_module.build_disk_index
    monkeypatch.setattr(build_module, "build_disk_index", lambda ds, *a, **k: built.append(ds.uri) or real(ds, *a, **k))  # fmt: skip
    export_bundle(atlas_store, "disk", tmp_path / "disk.cellvec")
    import_bundle(tmp_path / "disk.cellvec", tmp_path / "s2")
    assert sorted(Path(u).name for u in built) == ["atlas_disk.lance", "atlas_disk.lance", "atlas_disk__species.lance", "atlas_disk__species.lance"]  # fmt: skip
    for atlas in (Atlas.open(str(tmp_path / "disk.cellvec")), Atlas.open(tmp_path / "s2", "disk")):
        assert atlas.on_disk and atlas.meta["index"] == want
        assert atlas.dataset().describe_indices()  # the index itself, not only its name
        assert atlas.cross_species().dataset().describe_indices()  # and its view's
        labels = map_cells(_query(), atlas).labels
        np.testing.assert_array_equal(labels, map_cells(_query(), "disk", store=atlas_store).labels)


def test_overwrite_replaces_a_bundle_and_nothing_else(bundle, atlas_store, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for out in (".", work, tmp_path / "tiny.cellvec" / "atlas_tiny.lance"):
        res = CliRunner().invoke(cli, ["atlas", "export", "tiny", "--store", str(atlas_store), "--out", str(out), "--overwrite"])  # fmt: skip
        assert (
            res.exit_code != 0 and "is not a bundle" in res.output and "--overwrite" in res.output
        )
    assert os.listdir(work) == ["notes.txt"] and (work / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".*.tmp")) and (bundle / "atlas_tiny.lance").is_dir()
    (bundle / "stray.txt").write_text("x")  # a bundle is replaced whole
    _run("atlas", "export", "tiny", "--store", atlas_store, "--out", bundle, "--overwrite")
    assert not (bundle / "stray.txt").exists() and (bundle / MANIFEST).is_file()


def test_mapping_onto_a_bundle_equals_mapping_onto_the_store(bundle, atlas_store, cache):
    want = map_cells(_query(), "tiny", store=atlas_store)
    atlas = Atlas.open(str(bundle))
    got = map_cells(_query(), atlas, recipe=Atlas.open(atlas_store, "tiny").recipe)
    np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_allclose(got.vectors, want.vectors, atol=1e-6)
    assert str(atlas.store).startswith(str(cache / "bundles"))


def test_map_from_a_web_server_with_no_gene_store(bundle, atlas_store, tmp_path, cache, caplog):
    """The issue's test: `cellvec map query.h5ad --atlas URL --out m.h5ad` with no store
    anywhere gives the labels of the original store, builds nothing, and works offline
    from the cache once fetched."""
    import anndata as ad

    q = tmp_path / "query.h5ad"
    _query().write_h5ad(q)
    want = map_cells(str(q), "tiny", store=atlas_store).labels
    served = tmp_path / "www"
    shutil.copytree(bundle, served / "atlases" / "tiny.cellvec")
    shutil.rmtree(atlas_store)  # no gene store on this machine
    caplog.set_level(logging.INFO)
    with static_server(served) as (url, requested):
        ref = f"{url}/atlases/tiny.cellvec"
        _run("map", q, "--atlas", ref, "--out", tmp_path / "m.h5ad")
        n_files = len(requested)
        _run("map", q, "--atlas", ref, "--out", tmp_path / "m2.h5ad")
        assert requested[n_files:] == ["/atlases/tiny.cellvec/manifest.json"]  # fetched once
    got = ad.read_h5ad(tmp_path / "m.h5ad").obs["cellvec_label"].astype(str).to_numpy()
    np.testing.assert_array_equal(got, want)
    log = caplog.text
    assert "Fetching bundle" in log and "verified (sha256)" in log
    assert "genes to embed" not in log and "Table genes_" not in log  # no store build
    # the server is gone: the cached copy serves, with a warning
    caplog.clear()
    _run("map", q, "--atlas", ref, "--out", tmp_path / "m3.h5ad")
    assert "could not be reached" in caplog.text
    got = ad.read_h5ad(tmp_path / "m3.h5ad").obs["cellvec_label"].astype(str).to_numpy()
    np.testing.assert_array_equal(got, want)


def test_only_a_url_that_does_not_answer_falls_back_to_the_cache(bundle, tmp_path, cache, monkeypatch):  # fmt: skip
    """A 404 is an answer, not a network failure: no stale copy. A local folder is named
    by its absolute path, so a relative path means what it means from here."""
    served = tmp_path / "www"
    shutil.copytree(bundle, served / "tiny.cellvec")
    with static_server(served) as (url, _):
        fetch_bundle(f"{url}/tiny.cellvec")
        shutil.rmtree(served / "tiny.cellvec")
        with pytest.raises(StoreError, match="manifest.json could not be read .*404"):
            fetch_bundle(f"{url}/tiny.cellvec")
    monkeypatch.chdir(tmp_path)
    assert fetch_bundle("tiny.cellvec").source == str(bundle)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(StoreError, match=f"Bundle {tmp_path / 'elsewhere' / 'tiny.cellvec'}: its manifest.json could not be read"):  # fmt: skip
        fetch_bundle("tiny.cellvec")


def test_map_from_a_bucket(bundle, atlas_store, cache, monkeypatch):
    from servers import s3_server

    want = map_cells(_query(), "tiny", store=atlas_store).labels
    with s3_server(lifetime_s=300) as s3:
        s3.create_bucket("atlases")
        client = s3.client()
        for p in bundle.rglob("*"):
            if p.is_file():
                client.upload_file(str(p), "atlases", f"lab/tiny.cellvec/{p.relative_to(bundle).as_posix()}")  # fmt: skip
        monkeypatch.setenv("CELLVEC_STORAGE_OPTIONS", json.dumps(s3.storage_options()))
        got = map_cells(_query(), Atlas.open("s3://atlases/lab/tiny.cellvec"))
    np.testing.assert_array_equal(got.labels, want)


def _through_orthologs(atlas, tmp_path, **kw):
    """`_query()` under other names, mapped onto `atlas` through an ortholog table: what
    the atlas's cross-species view answers."""
    query = _query()
    table = tmp_path / "orth.csv"
    table.write_text("".join(f"Z{n},{n}\n" for n in query.var_names))
    query.var_names = [f"Z{n}" for n in query.var_names]
    return map_cells(query, atlas, orthologs=table, **kw)


def test_import_into_stores(bundle, atlas_store, tmp_path, cache):
    """The atlas and its cross-species view travel together, re-pointed alike."""
    want = map_cells(_query(), "tiny", store=atlas_store).labels
    crossed = _through_orthologs("tiny", tmp_path, store=atlas_store)
    assert crossed.recipe["weighting"] == "softmax"  # the view answered

    def same_calls(store):
        np.testing.assert_array_equal(map_cells(_query(), "tiny", store=store).labels, want)
        res = _through_orthologs("tiny", tmp_path, store=store)
        assert res.recipe == {**crossed.recipe, "gene_table_hash": res.recipe["gene_table_hash"], "head_hash": res.recipe["head_hash"]}  # fmt: skip
        np.testing.assert_allclose(res.vectors, crossed.vectors, atol=1e-6)
        assert Atlas.open(store, "tiny").cross_species().meta["species_view_of"] == "tiny"

    same_calls(bundle)
    # a store with no gene table gets the bundle's
    _run("atlas", "import", bundle, "--store", tmp_path / "empty")
    same_calls(tmp_path / "empty")
    # the same gene table: used as it is
    same = tiny_store(tmp_path / "same", tiny_genes() + _extra_genes())
    import_bundle(bundle, same)
    same_calls(same)
    # a table that differs only in genes the atlas does not use: rows re-pointed
    other = tiny_store(tmp_path / "other", _extra_genes(2)[::-1] + tiny_genes()[::-1])
    res = import_bundle(bundle, other)
    assert "re-pointed" in res["gene_table"]
    same_calls(other)
    # under another name, the view goes with it
    import_bundle(bundle, other, name="renamed")
    view = Atlas.open(other, "renamed").cross_species()
    assert view.name == "renamed__species" and view.meta["species_view_of"] == "renamed"
    with pytest.raises(CellvecError, match="already has an atlas 'tiny'.*--replace"):
        import_bundle(bundle, other)
    # a table with other vectors for the atlas's genes: refused, naming the fix
    retold = [dict(g, name=f"{g['name']} retold") for g in tiny_genes()]  # other texts
    changed = tiny_store(tmp_path / "changed", retold)
    with pytest.raises(StoreError, match=r"differs from the bundle's in 30 of the atlas's 30 genes.*--store NEW_DIR.*cellvec map QUERY --atlas"):  # fmt: skip
        import_bundle(bundle, changed)
    assert not any(t.startswith("atlas_tiny") for t in Store(changed).table_names())


def test_a_bundles_gene_table_is_for_mapping_only(bundle, atlas_store, tmp_path, cache):
    """A store that got a bundle's partial gene table maps onto its atlas, but building an
    atlas on it, or importing an atlas whose genes it lacks, is refused, naming the fix,
    and the refused import writes nothing."""
    ref = tiny_adata(n_cells=60, seed=2)
    ref = ref[ref.obs["cell_type"] != "M", :20].copy()  # T and B genes only
    build_atlas(
        ref, store=atlas_store, name="tb", label_key="cell_type", recipe=Recipe(top_genes=10)
    )
    export_bundle(atlas_store, "tb", tmp_path / "tb.cellvec")
    part = tmp_path / "part"
    import_bundle(tmp_path / "tb.cellvec", part)
    assert set(map_cells(_query(), "tb", store=part).labels) <= {"T", "B"}
    with pytest.raises(StoreError, match=r"came with an atlas bundle: it has vectors for 20 of its 35 genes.*cellvec genes build --model fake"):  # fmt: skip
        build_atlas(tiny_adata(n_cells=30), store=part, name="new", label_key="cell_type", recipe=Recipe(top_genes=10))  # fmt: skip
    before = {p.relative_to(part) for p in part.rglob("*")}
    with pytest.raises(StoreError, match=r"no vectors for 10 of this atlas's 30 genes \(e.g. MGENE0.*cellvec genes build"):  # fmt: skip
        import_bundle(bundle, part)
    assert {p.relative_to(part) for p in part.rglob("*")} == before


def test_one_rule_for_store_and_atlas_in_every_command(bundle, atlas_store, tmp_path, cache):
    """--atlas NAME needs --store; --atlas BUNDLE (a folder or URL) goes without one."""
    q = tmp_path / "q.h5ad"
    mapped = _query()
    mapped.obs["cellvec_label"], mapped.obs["cellvec_confidence"] = "T", 1.0
    mapped.write_h5ad(q)
    url = "https://example.org/tiny.cellvec"
    for args in (
        ["map", q, "--atlas", "tiny"],
        ["atlas", "card", "tiny"],
        ["map", q, "--store", atlas_store, "--atlas", url],
        ["atlas", "card", url, "--store", atlas_store],
        ["report", q, "--store", atlas_store, "--atlas", bundle, "--out", tmp_path / "r"],
    ):
        res = CliRunner().invoke(cli, [str(a) for a in args])
        want = "leave out --store" if "--store" in args else "is a name, not a bundle"
        assert res.exit_code == 1 and want in res.output, (args, res.output)
    with pytest.raises(CellvecError, match="'tiny' is a name, not a bundle"):
        Atlas.open("tiny")


def test_card(bundle, atlas_store, tmp_path, cache):
    card = json.loads(_run("atlas", "card", bundle, "--json").stdout)
    assert card["tissue"] == "blood" and card["licence"] == "CC-BY-4.0"
    assert card["species"] == "human" and card["n_cells"] == 90 and card["n_genes"] == 30
    assert card["classes"] == {"B": 30, "M": 30, "T": 30} and card["model"] == "fake"
    assert card["recipe"]["top_genes"] == 10 and card["cellvec_version"]
    text = _run("atlas", "card", "tiny", "--store", atlas_store).stdout
    assert "classes (3)" in text and "tissue:" in text
    # the card travels: after an import the store's atlas has it too
    import_bundle(bundle, tmp_path / "s2")
    assert atlas_card(tmp_path / "s2", "tiny")["citation"] == "Test et al. 2026"


@pytest.mark.slow
def test_export_with_cross_validated_scores(atlas_store, tmp_path, cache):
    ref = tmp_path / "ref.h5ad"
    tiny_adata(n_cells=90, seed=1).write_h5ad(ref)
    build_atlas(
        ref, store=atlas_store, name="scored", label_key="cell_type", recipe=Recipe(top_genes=10)
    )
    out = json.loads(
        _run(
            "atlas",
            "export",
            "scored",
            "--store",
            atlas_store,
            "--out",
            tmp_path / "s.cellvec",
            "--evaluate",
            "--folds",
            "2",
            "--json",
        ).stdout  # fmt: skip
    )
    ev = out["card"]["evaluation"]
    assert ev["folds"] == 2 and 0 <= ev["macro_f1"] <= 1 and set(ev["per_class_f1"]) == {"B", "M", "T"}  # fmt: skip
    assert "F1" in card_text(out["card"])


def test_serve_a_bundle(bundle, atlas_store, cache):
    """`cellvec serve --atlas BUNDLE` (a process on 127.0.0.1) answers as a server on the
    original store does, and writes its serving files beside the verified copy."""
    import httpx

    from cellvec.service import create_app
    from helpers import request_cells
    from servers import Server, serve_process

    body, _ = request_cells(8)
    with serve_process("--atlas", bundle) as url:
        r = httpx.post(f"{url}/v1/atlases/tiny/map", json=body, timeout=30)
        assert r.status_code == 200, r.text
        from_bundle = [cell["label"] for cell in r.json()["cells"]]
    with Server(create_app(atlas_store)) as url, httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(300):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        from_store = [cell["label"] for cell in c.post("/v1/atlases/tiny/map", json=body).json()["cells"]]  # fmt: skip
    assert from_bundle == from_store
    (copy,) = (cache / "bundles").iterdir()
    assert not (copy / "_serving").exists() and (cache / "serving").exists()


# -- untrusted bundles ---------------------------------------------------------
def _tamper_manifest(bundle, change):
    m = json.loads((bundle / MANIFEST).read_text())
    change(m)
    (bundle / MANIFEST).write_text(json.dumps(m))


def _relist(bundle):
    """A fresh manifest over what the bundle folder now holds (as a hostile exporter would)."""
    (bundle / MANIFEST).unlink()
    m = json.loads((bundle / "card.json").read_text())
    write_manifest(bundle, atlas="tiny", model=m["model"])


def test_a_shallow_clone_reading_another_folder_is_refused(bundle, tmp_path):
    """A Lance shallow clone keeps relative data file paths with a base path that points
    anywhere: its rows would come from files no checksum covered."""
    import lance

    table = bundle / "atlas_tiny.lance"
    elsewhere = tmp_path / "elsewhere" / "atlas_tiny.lance"
    shutil.copytree(table, elsewhere)
    shutil.rmtree(table)
    ds = lance.dataset(str(elsewhere))
    ds.shallow_clone(str(table), ds.version)
    _relist(bundle)
    with pytest.raises(StoreError, match="table atlas_tiny.lance reads files from other folders"):
        fetch_bundle(bundle, cache=tmp_path / "c")


def test_a_bundle_too_large_or_without_room_is_refused_before_fetching(bundle, tmp_path, monkeypatch):  # fmt: skip
    import cellvec.fetch as fetch

    _tamper_manifest(bundle, lambda m: m["files"]["card.json"].update(bytes=50 * 2**30))
    with static_server(tmp_path) as (url, requested):
        with pytest.raises(
            StoreError,
            match=r"lists 50\.0 GiB of files, more than the 20\.0 GiB.*CELLVEC_MAX_BUNDLE_BYTES=51G",
        ):
            fetch_bundle(f"{url}/{bundle.name}", cache=tmp_path / "c")
        _tamper_manifest(bundle, lambda m: m["files"]["card.json"].update(bytes=2**10))
        monkeypatch.setenv("CELLVEC_MAX_BUNDLE_BYTES", "64K")
        with pytest.raises(
            StoreError,
            match=r"lists [\d.]+ [KM]iB of files, more than the 64\.0 KiB.*BUNDLE_BYTES=1G",
        ):
            fetch_bundle(f"{url}/{bundle.name}", cache=tmp_path / "c")
        monkeypatch.delenv("CELLVEC_MAX_BUNDLE_BYTES")
        monkeypatch.setattr(fetch.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1))
        with pytest.raises(StoreError, match="has 1 bytes free; nothing was fetched"):
            fetch_bundle(f"{url}/{bundle.name}", cache=tmp_path / "c")
    assert requested == [f"/{bundle.name}/{MANIFEST}"] * 3  # no part was fetched


def test_a_cached_copy_that_changed_is_not_used(bundle, tmp_path):
    copy = fetch_bundle(bundle, cache=tmp_path / "c").path
    versions = copy / "atlas_tiny.lance" / "_versions"
    stray = versions / "1.manifest"
    stray.write_bytes(next(versions.glob("*.manifest")).read_bytes())
    with pytest.raises(StoreError, match="holds atlas_tiny.lance/_versions/1.manifest, which manifest.json does not list"):  # fmt: skip
        fetch_bundle(bundle, cache=tmp_path / "c")
    stray.unlink()
    card = copy / "card.json"
    card.write_text(card.read_text()[:-10])
    with pytest.raises(StoreError, match="card.json is not the size manifest.json says.*Remove that folder"):  # fmt: skip
        fetch_bundle(bundle, cache=tmp_path / "c")
    card.unlink()
    with pytest.raises(StoreError, match="card.json is missing"):
        fetch_bundle(bundle, cache=tmp_path / "c")
    shutil.rmtree(copy)
    assert fetch_bundle(bundle, cache=tmp_path / "c").path == copy  # fetched again


def test_an_altered_part_is_refused_by_name(bundle, tmp_path):
    part = next(p for p in sorted(bundle.rglob("*.lance")) if p.is_file())
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    rel = part.relative_to(bundle).as_posix()
    with pytest.raises(StoreError, match=f"part {rel} does not match its checksum"):
        fetch_bundle(bundle, cache=tmp_path / "c")
    assert not list((tmp_path / "c" / "bundles").iterdir())  # nothing half-fetched is kept


@pytest.mark.parametrize("path", ["../evil", "/etc/passwd", "a/../../b", "a\\b", "C:/x", ""])
def test_paths_that_leave_the_bundle_are_refused(bundle, tmp_path, path):
    _tamper_manifest(bundle, lambda m: m["files"].update({path: {"bytes": 1, "sha256": "0" * 64}}))  # fmt: skip
    with pytest.raises(StoreError, match="would leave the bundle's folder"):
        fetch_bundle(bundle, cache=tmp_path / "c")


def test_a_part_listed_as_file_and_folder_is_refused(bundle, tmp_path):
    _tamper_manifest(bundle, lambda m: m["files"].update({"card.json/x": m["files"]["card.json"]}))  # fmt: skip
    with pytest.raises(StoreError, match="lists part card.json both as a file and as a folder"):
        fetch_bundle(bundle, cache=tmp_path / "c")
    assert not (tmp_path / "c" / "bundles").exists() or not list((tmp_path / "c" / "bundles").iterdir())  # fmt: skip


def test_symlinks_and_unlisted_files_do_not_travel(bundle, tmp_path):
    (bundle / "extra.txt").write_text("not listed")
    copy = fetch_bundle(bundle, cache=tmp_path / "c").path
    assert not (copy / "extra.txt").exists()
    target = bundle / "card.json"
    secret = tmp_path / "secret.json"
    secret.write_bytes(target.read_bytes())
    target.unlink()
    os.symlink(secret, target)
    with pytest.raises(StoreError, match="card.json is \\(or sits under\\) a symlink"):
        fetch_bundle(bundle, cache=tmp_path / "c2")


def _hostile_artifact(bundle, digest: str, data: bytes) -> None:
    """Put npz bytes `data` in the bundle as artifact `digest`, listed in its manifest."""
    import lance

    art = bundle / f"_artifact_{digest}.lance"
    shutil.rmtree(art, ignore_errors=True)
    lance.write_dataset(pa.table({"digest": [digest], "data": pa.array([data], pa.large_binary())}), str(art))  # fmt: skip
    _relist(bundle)


def test_a_pickled_artifact_is_refused(bundle, tmp_path, cache):
    """Every artifact is replaced: the atlas and its cross-species view have theirs, and
    which one a directory listing gives first differs between machines."""
    buf = io.BytesIO()
    np.savez(buf, x=np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for art in sorted(bundle.glob("_artifact_*.lance")):
        digest = art.name.removeprefix("_artifact_").removesuffix(".lance")
        _hostile_artifact(bundle, digest, buf.getvalue())
    with pytest.raises(StoreError, match="Artifact table _artifact_[0-9a-f]{24} .* holds x.npy of dtype object"):  # fmt: skip
        map_cells(_query(), Atlas.open(str(bundle)))


def test_a_zip_bomb_artifact_is_refused_before_decoding(bundle, tmp_path):
    """Artifacts whose hash holds (so only the size budget stops them): a deflated run of
    zeros (1,000 times its stored size), and an npy header claiming more than it holds."""
    from cellvec.cell_index.artifacts import array_hash, load_artifact

    bomb = {"x": np.zeros(20_000_000, np.uint8)}
    buf = io.BytesIO()
    np.savez_compressed(buf, **bomb)
    _hostile_artifact(bundle, array_hash(bomb), buf.getvalue())
    liar = io.BytesIO()
    with zipfile.ZipFile(liar, "w") as zf, zf.open("x.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10**12,)})  # fmt: skip
        f.write(b"\0" * 64)
    _hostile_artifact(bundle, "0" * 24, liar.getvalue())
    copy = fetch_bundle(bundle, cache=tmp_path / "c").path
    with pytest.raises(StoreError, match=r"decodes to 20,000,\d+ bytes from [\d,]+ stored \(a zip bomb\?\)"):  # fmt: skip
        load_artifact(copy, array_hash(bomb))
    with pytest.raises(StoreError, match=r"says x.npy is \(1000000000000,\) but holds \d+ bytes"):
        load_artifact(copy, "0" * 24)


def test_not_a_bundle(tmp_path, cache):
    with pytest.raises(StoreError, match="manifest.json could not be read"):
        fetch_bundle(tmp_path / "nothing.cellvec")
    (tmp_path / "x.cellvec").mkdir()
    (tmp_path / "x.cellvec" / MANIFEST).write_text('{"format": "other"}')
    with pytest.raises(StoreError, match="not a cellvec atlas bundle"):
        fetch_bundle(tmp_path / "x.cellvec")
    res = CliRunner().invoke(cli, ["map", str(tmp_path / "q.h5ad"), "--atlas", "tiny"])
    assert res.exit_code != 0


@pytest.mark.slow
def test_the_report_shows_the_card(bundle, tmp_path, cache):
    q = tmp_path / "query.h5ad"
    _query().write_h5ad(q)
    _run("map", q, "--atlas", bundle, "--out", tmp_path / "m.h5ad")
    path = _run("report", tmp_path / "m.h5ad", "--atlas", bundle, "--out", tmp_path / "rep")
    page = (tmp_path / "rep" / "report.html").read_text()
    assert path.stdout.strip().endswith("report.html")
    assert "<h2>Atlas</h2>" in page and "CC-BY-4.0" in page and "Test et al. 2026" in page


# -- Cell Ontology ids -------------------------------------------------------------
def _fake_ontology():
    from cellvec.cell_index.ontology import CellOntology

    terms = [
        ("CL:0000236", "B cell", ["B lymphocyte"], "A lymphocyte of B lineage."),
        ("CL:0000084", "T cell", ["T lymphocyte"], "A lymphocyte with a T cell receptor."),
        ("CL:0000576", "monocyte", [], "A myeloid phagocyte."),
        ("CL:0000169", "type B pancreatic cell", ["pancreatic beta cell"], "Secretes insulin."),
        ("CL:0000171", "pancreatic A cell", ["pancreatic alpha cell"], "Secretes glucagon."),
        ("CL:0004117", "alpha retinal ganglion cell", ["alpha"], "A retinal neuron."),
    ]
    return CellOntology(
        version="test",
        ids=[t[0] for t in terms],
        labels=[t[1] for t in terms],
        synonyms=[t[2] for t in terms],
        definitions=[t[3] for t in terms],
    )


def test_ontology_proposals(cache):
    from cellvec.cell_index.ontology import propose_ontology_ids

    onto = _fake_ontology()
    got = propose_ontology_ids(
        ["alpha", "beta", "t_cell", "B", "qqq zzz"], embedder=FakeEmbedder(), ontology=onto
    )
    assert got["t_cell"].id == "CL:0000084" and got["B"].id == "CL:0000236"
    assert got["alpha"].id == "CL:0004117"  # the bare name is another tissue's cell...
    assert got["qqq zzz"].id is None and got["qqq zzz"].how == "abstained"
    got = propose_ontology_ids(["alpha", "beta"], embedder=FakeEmbedder(), ontology=onto, tissue="pancreas")  # fmt: skip
    assert {k: p.id for k, p in got.items()} == {"alpha": "CL:0000171", "beta": "CL:0000169"}
    assert got["beta"].how == "exact"  # ...and the tissue hint finds the pancreatic one
    got = propose_ontology_ids(["beta"], embedder=FakeEmbedder(), ontology=onto, overrides={"beta": "CL:0000171"})  # fmt: skip
    assert (got["beta"].id, got["beta"].how) == ("CL:0000171", "override")


def test_ontology_ids_travel_to_the_mapped_h5ad_and_the_card(atlas_store, tmp_path, cache, monkeypatch):  # fmt: skip
    import cellvec.cell_index.ontology as ontology

    monkeypatch.setattr(ontology, "load_cell_ontology", _fake_ontology)
    marked = json.loads(_run("atlas", "ontology", "tiny", "--store", atlas_store, "--markers", "--json").stdout)  # fmt: skip
    assert set(marked["labels"]) == {"B", "M", "T"}  # re-ranked by the classes' marker genes
    over = tmp_path / "over.csv"
    over.write_text("label,cell_type_ontology_term_id\nM,CL:0000576\n")
    out = json.loads(_run("atlas", "ontology", "tiny", "--store", atlas_store, "--overrides", over, "--json").stdout)  # fmt: skip
    assert {k: v["id"] for k, v in out["labels"].items()} == {
        "B": "CL:0000236",
        "M": "CL:0000576",
        "T": "CL:0000084",
    }
    adata = map_cells(_query(), "tiny", store=atlas_store).to_anndata()
    want = {"B": "CL:0000236", "M": "CL:0000576", "T": "CL:0000084"}
    assert [want[x] for x in adata.obs["cellvec_label"]] == list(adata.obs["cell_type_ontology_term_id"])  # fmt: skip
    export_bundle(atlas_store, "tiny", tmp_path / "o.cellvec")
    assert atlas_card(tmp_path / "o.cellvec", "tiny")["ontology"] == want
    assert "CL:0000576" in card_text(atlas_card(tmp_path / "o.cellvec", "tiny"))
    tsv = tmp_path / "over.tsv"
    tsv.write_text("label\tontology id\n M \tCL:0000576\n")
    assert ontology.read_overrides(tsv) == {"M": "CL:0000576"}
    bad = tmp_path / "bad.csv"
    bad.write_text("M,monocyte\n")
    res = CliRunner().invoke(cli, ["atlas", "ontology", "tiny", "--store", str(atlas_store), "--overrides", str(bad)])  # fmt: skip
    assert res.exit_code != 0 and "not a Cell Ontology id" in res.output


def test_the_cell_ontology_ships_offline():
    pytest.importorskip("cellxgene_ontology_guide")
    from cellvec.cell_index.ontology import load_cell_ontology

    onto = load_cell_ontology()
    assert onto.label_of("CL:0000236") == "B cell" and len(onto.ids) > 1000


def test_a_bundle_whose_view_lacks_its_head_is_refused_before_any_write(bundle, tmp_path):
    """A hostile exporter ships the atlas and its cross-species view but drops the view's
    head (the manifest rewritten to match): the import is refused, naming the artifact,
    and the target store holds neither table."""
    view = Atlas.open(bundle, "tiny__species")
    shutil.rmtree(bundle / f"_artifact_{view.recipe.head_hash}.lance")
    _relist(bundle)
    target = tiny_store(tmp_path / "target", tiny_genes())
    with pytest.raises(StoreError, match=f"Artifact {view.recipe.head_hash} is missing"):
        import_bundle(bundle, target)
    assert not any(t.startswith("atlas_tiny") for t in Store(target).table_names())


def _edit_atlas_meta(bundle, change) -> None:
    """Change the metadata of the bundle's atlas table as a hostile exporter would, and
    list the result in a fresh manifest."""
    import lance

    from cellvec.storage import META_KEY

    ds = lance.dataset(str(bundle / "atlas_tiny.lance"))
    meta = json.loads(ds.schema.metadata[META_KEY])
    change(meta)
    ds.update_schema_metadata({META_KEY.decode(): json.dumps(meta)})
    _relist(bundle)


def test_a_recipe_hash_that_is_a_path_is_not_opened(bundle, tmp_path, cache):
    """An artifact's hash named a file of old stores (`_artifacts/<hash>.npz`): a bundle's
    recipe could name any .npz of the machine, read whole before its hash was checked."""
    outside = tmp_path / "outside"
    outside.mkdir()
    np.savez(outside / "secret.npz", x=np.zeros(3))
    hostile = os.path.relpath(outside / "secret", tmp_path / "target" / "_artifacts")
    _edit_atlas_meta(bundle, lambda m: m["recipe"].update(head_hash=hostile))
    (tmp_path / "target" / "_artifacts").mkdir(parents=True)
    with pytest.raises(StoreError, match="is not a digest"):
        import_bundle(bundle, tmp_path / "target")


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"k": 10**9}, "not a number of neighbours"),
        ({"k": "15"}, "not a number of neighbours"),
        ({"index": {"kind": "disk", "num_partitions": 10**6}}, "names a disk index for 90 cells"),
        ({"index": {"kind": "elsewhere"}}, "not one cellvec writes"),
    ],
)
def test_settings_a_bundle_names_are_checked_before_any_write(bundle, tmp_path, cache, setting, message):  # fmt: skip
    """The bundle's index parameters were used as they came, after the gene table, the view
    and the atlas were written: a refused import left a usable atlas (or replaced one),
    and a million partitions ran k-means for hours."""
    _edit_atlas_meta(bundle, lambda m: m.update(setting))
    with pytest.raises(CellvecError, match=message):
        import_bundle(bundle, tmp_path / "target")
    assert not Store(tmp_path / "target").table_names()


def test_an_import_that_fails_midway_leaves_nothing_behind(bundle, tmp_path, cache, monkeypatch):
    """It fails after the gene table, the view and the atlas are written (indexing the
    atlas): none of them stays."""
    import cellvec.cell_index.bundle as bundle_module

    reindex, seen = bundle_module._reindex, []

    def fail(store, name, written):
        seen.append(name)
        if name == "tiny":
            raise OSError("No space left on device")
        return reindex(store, name, written)

    monkeypatch.setattr(bundle_module, "_reindex", fail)
    with pytest.raises(OSError, match="No space left"):
        import_bundle(bundle, tmp_path / "target")
    assert seen == ["tiny__species", "tiny"]
    left = Store(tmp_path / "target").table_names()
    assert not [t for t in left if not t.startswith("_artifact_")], left


def test_a_table_that_decodes_far_past_its_size_is_refused(bundle, tmp_path, monkeypatch):
    """Lance compresses a column that repeats one value to almost nothing: 90 cell ids of
    1 MiB each (90 MiB) took a few KB, and were read whole when the atlas opened."""
    import lance

    import cellvec.fetch as fetch

    table = bundle / "atlas_tiny.lance"
    ds = lance.dataset(str(table))
    rows = ds.to_table()
    rows = rows.set_column(0, "cell_id", pa.array(["c" * 2**20] * rows.num_rows))
    shutil.rmtree(table)
    lance.write_dataset(rows, str(table))
    _relist(bundle)
    assert sum(f.stat().st_size for f in table.rglob("*") if f.is_file()) < 2 * 2**20
    monkeypatch.setattr(fetch, "TABLE_SLACK_BYTES", 0)  # 16x the bundle's few MB, no more
    with pytest.raises(
        StoreError, match="tables decode to more than 16 times the bytes.*Export it again"
    ):
        fetch_bundle(bundle, cache=tmp_path / "c")


def test_a_column_with_an_encoding_named_in_the_file_is_refused(bundle, tmp_path):
    import lance

    table = bundle / "atlas_tiny.lance"
    rows = lance.dataset(str(table)).to_table()
    field = rows.schema.field("cell_id").with_metadata({"lance-encoding:compression": "zstd"})
    rows = rows.cast(rows.schema.set(0, field))
    shutil.rmtree(table)
    lance.write_dataset(rows, str(table), data_storage_version="2.0")
    _relist(bundle)
    with pytest.raises(StoreError, match="column 'cell_id' of encoding lance-encoding:compression"):
        fetch_bundle(bundle, cache=tmp_path / "c")


def test_a_column_of_a_type_cellvec_never_writes_is_refused(bundle, tmp_path):
    """A struct column (its values decoded by Lance) where cellvec writes plain ones."""
    import lance

    table = bundle / "atlas_tiny.lance"
    rows = lance.dataset(str(table)).to_table()
    rows = rows.append_column("extra", pa.array([{"a": 1}] * rows.num_rows))
    shutil.rmtree(table)
    lance.write_dataset(rows, str(table))
    _relist(bundle)
    with pytest.raises(StoreError, match="column 'extra' of struct<a: int64>.*Export it again"):
        fetch_bundle(bundle, cache=tmp_path / "c")


@pytest.mark.parametrize("text", ["[" * 100_000, '{"format": ' + "9" * 5000 + "}"])
def test_a_manifest_python_cannot_parse_is_a_clear_refusal(tmp_path, cache, text):
    (tmp_path / "b.cellvec").mkdir()
    (tmp_path / "b.cellvec" / MANIFEST).write_text(text)
    with pytest.raises(StoreError, match="is not readable JSON.*Export it again"):
        fetch_bundle(tmp_path / "b.cellvec")


def test_redirects_are_followed_to_http_only(bundle, tmp_path, cache):
    """urllib follows a redirect to ftp:// (and from https down to http): a bundle's server
    could send the fetch anywhere urllib reaches."""
    served = tmp_path / "www"
    shutil.copytree(bundle, served / "tiny.cellvec")
    with (
        static_server(served) as (real, _),
        static_server(tmp_path, redirect=real) as (moved, requested),
    ):
        copy = fetch_bundle(f"{moved}/tiny.cellvec", cache=tmp_path / "c1")
        assert requested and (copy.path / MANIFEST).exists()  # http to http: followed
    with (
        static_server(tmp_path, redirect="ftp://127.0.0.1:9") as (url, requested),
        pytest.raises(StoreError, match="redirected to ftp://127.0.0.1:9/tiny.cellvec"),
    ):
        fetch_bundle(f"{url}/tiny.cellvec", cache=tmp_path / "c2")
    assert requested == ["/tiny.cellvec/manifest.json"]


def test_a_redirect_from_https_down_to_http_is_refused():
    """No TLS server here: the fetch's redirect handler is asked directly."""
    import urllib.request

    from cellvec.fetch import _opener

    handler = next(h for h in _opener().handlers if isinstance(h, urllib.request.HTTPRedirectHandler))  # fmt: skip
    req = urllib.request.Request("https://example.org/b.cellvec/manifest.json")
    with pytest.raises(StoreError, match="never from https to http"):
        handler.redirect_request(req, None, 302, "Found", {}, "http://example.org/manifest.json")
    moved = handler.redirect_request(req, None, 302, "Found", {}, "https://mirror.example.org/m")
    assert moved.full_url == "https://mirror.example.org/m"  # https to https: followed


def test_a_copy_is_built_as_this_store_chooses_and_searched_as_tuned(atlas_store, tmp_path, cache):  # fmt: skip
    """The build parameters a bundle names are never used (a million partitions ran
    k-means for hours); the search settings tuned with `atlas index` travel."""
    from cellvec.cell_index.build import index_atlas
    from cellvec.cell_index.disk_index import choose_params

    build_atlas(tiny_adata(n_cells=300, seed=3), store=atlas_store, name="disk", label_key="cell_type", recipe=Recipe(top_genes=10), options=BuildOptions(index="disk"))  # fmt: skip
    index_atlas(atlas_store, "disk", params={"nprobes": 3, "refine_factor": 7})
    export_bundle(atlas_store, "disk", tmp_path / "disk.cellvec")
    import lance

    from cellvec.storage import META_KEY

    bundle = tmp_path / "disk.cellvec"
    ds = lance.dataset(str(bundle / "atlas_disk.lance"))
    meta = json.loads(ds.schema.metadata[META_KEY])
    assert (meta["index"]["nprobes"], meta["index"]["refine_factor"]) == (3, 7)  # exported
    meta["index"].update(num_partitions=290, num_sub_vectors=1)
    ds.update_schema_metadata({META_KEY.decode(): json.dumps(meta)})
    (bundle / MANIFEST).unlink()
    write_manifest(bundle, atlas="disk", model=json.loads((bundle / "card.json").read_text())["model"])  # fmt: skip
    import_bundle(bundle, tmp_path / "s2")
    copy = Atlas.open(tmp_path / "s2", "disk").meta["index"]
    chosen = choose_params(300, ds.schema.field("vector").type.list_size)
    assert (copy["num_partitions"], copy["num_sub_vectors"]) == (chosen.num_partitions, chosen.num_sub_vectors)  # fmt: skip
    assert (copy["nprobes"], copy["refine_factor"]) == (3, 7)
