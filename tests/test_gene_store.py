import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cellvec.errors import StoreError
from cellvec.gene_store import GeneStore, build_gene_store, import_vectors
from cellvec.storage import Store, read_meta
from helpers import FakeEmbedder, build_tiny, tiny_genes, write_gene2go, write_gene_info


def test_build_writes_table_with_metadata(fake_store, gene_files):
    gs = GeneStore(fake_store)
    assert gs.models() == ["fake"]
    gt = gs.load("fake")
    assert gt.genes.height == 30 and gt.dimension == 64
    assert set(gt.genes.columns) >= {
        "gene_id",
        "symbol",
        "synonyms",
        "ensembl_id",
        "tax_id",
        "text",
        "text_hash",
        "go_terms",
    }
    np.testing.assert_allclose(np.linalg.norm(gt.vectors, axis=1), 1, atol=1e-5)
    meta = gt.meta
    assert meta["model"] == "fake" and meta["dimension"] == 64 and meta["species"] == "human"
    assert meta["template_version"] == "ncbi-v1" and meta["complete"] is True
    assert meta["sources"]["gene_info"]["path"].endswith("tiny.gene_info.gz") and "built_at" in meta


def test_go_count_is_over_the_genes_read(tmp_path, caplog):
    """gene2go covers every gene of a species; the log counts only the genes built."""
    genes = tiny_genes()
    info = write_gene_info(tmp_path / "g.gene_info.gz", genes[:20])
    # two of the genes read have no GO terms; ten genes not read have some
    go = write_gene2go(tmp_path / "g.gene2go.gz", genes[2:])
    with caplog.at_level("INFO", logger="cellvec.gene_store.store"):
        build_gene_store(
            info, gene2go=go, store=tmp_path / "s", species="human", embedder=FakeEmbedder()
        )
    assert "20 genes of human read from g.gene_info.gz; 18 of them with GO terms" in caplog.text


def test_rebuild_embeds_only_changed_genes(tmp_path, fake_store, gene_files):
    emb = FakeEmbedder()
    res = build_tiny(gene_files, fake_store, emb)
    assert (res.n_embedded, res.n_reused, emb.n_embedded) == (0, 30, 0)
    genes = tiny_genes()
    genes[0]["name"] = "T lineage gene 0, renamed"
    genes.append({**genes[1], "id": 9999, "symbol": "NEWGENE", "syn": "-"})
    info = write_gene_info(tmp_path / "v2.gene_info.gz", genes)
    go = write_gene2go(tmp_path / "v2.gene2go.gz", genes)
    emb = FakeEmbedder()
    res = build_gene_store(info, gene2go=go, store=fake_store, species="human", embedder=emb)
    assert (res.n_embedded, res.n_reused, emb.n_embedded) == (2, 29, 2)
    assert GeneStore(fake_store).load("fake").genes.height == 31


def test_failed_build_never_looks_complete_then_resumes(tmp_path, gene_files):
    class Failing(FakeEmbedder):
        def embed_batch(self, texts):
            if self.calls >= 2:
                raise RuntimeError("model crashed")
            return super().embed_batch(texts)

    store = tmp_path / "store"
    with pytest.raises(RuntimeError):
        build_tiny(gene_files, store, Failing(), batch_size=5)
    gs = GeneStore(store)
    assert gs.models() == []
    with pytest.raises(StoreError, match="no complete table for model 'fake'"):
        gs.load("fake")
    emb = FakeEmbedder()
    res = build_tiny(gene_files, store, emb, batch_size=5)
    assert res.n_embedded == 20 and emb.n_embedded == 20  # the two committed batches were kept
    assert "_building_fake" not in Store(store).table_names()


KILL_SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
from helpers import FakeEmbedder
from cellvec.gene_store import build_gene_store

class Slow(FakeEmbedder):
    def embed_batch(self, texts):
        out = super().embed_batch(texts)
        Path({marker!r}).open("a").write("x")
        time.sleep(0.4)
        return out

build_gene_store({info!r}, gene2go={go!r}, store={store!r}, species="human", embedder=Slow(), batch_size=3)
"""


@pytest.mark.slow
def test_kill_minus_nine_then_resume(tmp_path, gene_files):
    store, marker = tmp_path / "store", tmp_path / "marker"
    script = KILL_SCRIPT.format(
        tests=str(Path(__file__).parent),
        marker=str(marker),
        info=str(gene_files["gene_info"]),
        go=str(gene_files["gene2go"]),
        store=str(store),
    )
    proc = subprocess.Popen([sys.executable, "-c", script], env=dict(os.environ))
    deadline = time.time() + 120
    while time.time() < deadline and (not marker.exists() or len(marker.read_text()) < 4):
        time.sleep(0.05)
        assert proc.poll() is None, "the build ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    gs = GeneStore(store)
    assert gs.models() == []  # nothing looks complete
    staged = gs.store.open_table("_building_fake").count_rows()
    assert 6 <= staged < 30
    emb = FakeEmbedder()
    res = build_tiny(gene_files, store, emb, batch_size=3)
    assert res.n_embedded == 30 - staged == emb.n_embedded
    gt = GeneStore(store).load("fake")
    assert gt.genes["gene_id"].n_unique() == gt.genes.height == 30
    clean = tmp_path / "clean"
    build_tiny(gene_files, clean, FakeEmbedder())
    ref = GeneStore(clean).load("fake")
    order = {g: i for i, g in enumerate(ref.genes["gene_id"].to_list())}
    idx = [order[g] for g in gt.genes["gene_id"].to_list()]
    np.testing.assert_allclose(gt.vectors, ref.vectors[idx], atol=1e-6)


def test_other_species_into_same_table_is_refused(tmp_path, fake_store):
    info = write_gene_info(tmp_path / "m.gz", tiny_genes(2), tax=10090)
    with pytest.raises(StoreError, match="tax_id=9606.*10090.*another --store"):
        build_gene_store(info, store=fake_store, species="mouse", embedder=FakeEmbedder())


def test_store_built_with_another_model(fake_store):
    with pytest.raises(
        StoreError, match=r"no complete table for model 'minilm' \(models here: fake\)"
    ):
        GeneStore(fake_store).load("minilm")


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="cellvec genes build"):
        GeneStore(tmp_path / "nope")


def test_one_store_holds_every_table_and_gene_store_reads_the_gene_tables(fake_store):
    """`Store` is the whole store, through one connection: gene tables, atlases, mappings
    and artifacts are its tables; `GeneStore` reads only the gene tables, over the `Store`
    it is given (not a second connection)."""
    from cellvec.cell_index.build import build_atlas
    from cellvec.cell_index.mapping import map_cells
    from cellvec.cell_index.recipe import Recipe
    from cellvec.cell_index.table import list_atlases
    from helpers import tiny_adata

    store = Store(fake_store)
    genes = GeneStore(store)
    assert genes.store is store and Store.of(store) is store and str(store) == str(fake_store)
    assert genes.models() == ["fake"]
    assert not any(hasattr(genes, a) for a in ("db", "open_table", "table_names"))
    atlas = build_atlas(
        tiny_adata(60), store=store, name="one", label_key="cell_type", recipe=Recipe(refine="none")
    )
    map_cells(tiny_adata(30, seed=1), atlas).save(store, "q")
    names = store.table_names()
    assert {"genes_fake", "atlas_one", "mapping_q"} <= set(names)
    assert any(n.startswith("_artifact_") for n in names)
    assert list_atlases(store) == ["one"] and store.db is genes.store.db


def test_search_by_gene_and_text(fake_store):
    gs = GeneStore(fake_store)
    res = gs.search(gene="TGENE0", model="fake", k=5)
    assert res.height == 5 and "TGENE0" not in res["symbol"].to_list()
    assert all(s.startswith("T") for s in res["symbol"].to_list())
    assert res["similarity"].is_sorted(descending=True)
    by_alias = gs.search(gene="TALIAS3", model="fake", k=3)  # synonyms resolve
    assert by_alias.height == 3
    text = gs.search(
        "B cell receptor signaling immunoglobulin", model="fake", k=5, embedder=FakeEmbedder()
    )
    assert all(s.startswith("B") for s in text["symbol"].to_list())
    with pytest.raises(StoreError, match="not in the fake table"):
        gs.search(gene="NOPE", model="fake")


def test_import_precomputed_vectors(tmp_path, gene_files):
    import pickle

    rng = np.random.default_rng(0)
    vecs = {g["symbol"]: rng.normal(size=8).tolist() for g in tiny_genes()}
    path = tmp_path / "GenePT.pickle"
    path.write_bytes(pickle.dumps(vecs))
    store = tmp_path / "store"
    res = import_vectors(
        path, store=store, model="genept", gene_info=gene_files["gene_info"], species="human"
    )
    assert res.n_genes == 30 and res.model == "precomputed:genept"
    gs = GeneStore(store)
    gt = gs.load("genept")
    assert (
        gt.dimension == 8
        and read_meta(gs.store.open_table("genes_precomputed_genept"))["provider"] == "precomputed"
    )
    assert gt.genes.filter(pl.col("symbol") == "TGENE1")["synonyms"].to_list() == [
        ["TALIAS1", "TOLD1"]
    ]
    with pytest.raises(StoreError, match="Search by --gene"):
        gs.search("T cells", model="genept")


def test_the_ribosomal_program_is_found_by_ncbi_names_not_symbols():
    """Cytosolic ribosomal proteins in either species' NCBI wording (and their fusions,
    paralogs, pseudogenes) are in; mitochondrial ribosomal proteins (NCBI's own "mitchondrial"
    too), S6 kinases, binding proteins and laminin receptors are out."""
    from cellvec.cell_index.recipe import SKIP_GENES
    from cellvec.errors import CellvecError
    from cellvec.gene_store.programs import PROGRAMS, program_mask

    names = {
        "RPL3": ("ribosomal protein L3", True),
        "Rplp0": ("ribosomal protein, large, P0", True),
        "RPSA": ("ribosomal protein SA", True),
        "RPL13AP17": ("ribosomal protein L13a pseudogene 17", True),
        "FAU": ("FAU ubiquitin like and ribosomal protein S30 fusion", True),
        "UBA52": ("ubiquitin A-52 residue ribosomal protein fusion product 1", True),
        "RPL22L1": ("ribosomal protein L22 like 1", True),
        "MRPL1": ("mitochondrial ribosomal protein L1", False),
        "Mrps7": ("mitchondrial ribosomal protein S7", False),
        "RPS6KA1": ("ribosomal protein S6 kinase A1", False),
        "RPS19BP1": ("ribosomal protein S19 binding protein 1", False),
        "Lamr1-rs2": ("laminin receptor 1 (ribosomal protein SA), related sequence 2", False),
        "INS": ("insulin", False),
        "NONAME": (None, False),
    }
    genes = pl.DataFrame(
        {"symbol": list(names), "full_name": [n for n, _ in names.values()]},
        schema={"symbol": pl.String, "full_name": pl.String},
    )
    hit = program_mask(genes, "ribosomal")
    assert dict(zip(names, hit.tolist())) == {s: want for s, (_, want) in names.items()}
    assert not program_mask(genes, "none").any()
    with pytest.raises(CellvecError, match="Unknown gene program"):
        program_mask(genes, "proteasome")
    assert set(SKIP_GENES) == set(PROGRAMS)  # the recipe offers what the store can find
