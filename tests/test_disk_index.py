"""Disk atlases: searched through a Lance IVF_PQ index on their table, checked against exact KNN."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import index_recall, indexed_atlas, tiny_adata, two_levels


def test_disk_atlas_searches_like_exact_knn(fake_store, fake_models):
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.disk_index import DiskIndex
    from cellvec.cell_index.knn import FlatIndex, vote
    from cellvec.cell_index.mapping import map_cells

    indexed_atlas(fake_store, "mem", "memory")
    built = indexed_atlas(fake_store, "disk", "disk")
    assert built.on_disk and built.meta["index"]["index_type"] == "IVF_PQ"
    mem, disk = Atlas.open(fake_store, "mem"), Atlas.open(fake_store, "disk")
    assert disk.on_disk and not mem.on_disk and disk.n_cells == 1200
    index = disk.index()
    assert isinstance(index, DiskIndex) and index.indexed
    # trained with a fixed seed, the index gives one figure on every run (0.9984); over
    # training seeds 0-39 it ranged 0.9984-1.0000 (range 0.0016): the floor is the lowest
    # less the range, rounded down to 3 decimals (0.9984 - 0.0016 -> 0.996; `python
    # benchmarks/disk_index_seed_spread.py --seeds 40`, the "every 7th" line)
    assert index_recall(index, mem.vectors, 7) >= 0.996
    q = mem.vectors[::7]
    ai, asim = index.search(q, 15)
    ei, esim = FlatIndex(mem.vectors).search(q, 15)
    # refine re-ranks on the stored vectors: similarities are exact, not PQ estimates
    np.testing.assert_allclose(asim, np.einsum("qd,qkd->qk", q, mem.vectors[ai]), atol=1e-5)
    # ... so against exact search, rank by rank: never more similar than the exact neighbour
    # at that rank (within float error), and each query, an atlas cell, found first (itself,
    # or a cell identical to it)
    assert (asim <= esim + 1e-5).all(), (asim - esim).max()
    np.testing.assert_allclose(asim[:, 0], esim[:, 0], atol=1e-5)
    classes, codes = mem.label_codes()
    n = len(classes)
    agree = vote(ai, asim, codes, n).argmax(1) == vote(ei, esim, codes, n).argmax(1)
    assert agree.mean() >= 0.99
    query = tiny_adata(n_cells=60, seed=5, prefix="q")
    a = map_cells(query, disk, truth_key="cell_type")
    b = map_cells(query, mem, truth_key="cell_type")
    assert (a.labels == b.labels).mean() >= 0.99 and a.metrics["accuracy"] == 1.0
    np.testing.assert_allclose(a.typicality, b.typicality, atol=1e-5)
    assert disk._vectors is None  # mapping never read the atlas whole
    # the exact search above ran on the memory atlas's vectors: the disk one stores the same
    # (one recipe, one seed: only where they are searched differs)
    np.testing.assert_allclose(disk.vectors, mem.vectors, atol=1e-6)


def test_disk_atlas_without_its_index_is_searched_exactly(fake_store, fake_models):
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.disk_index import INDEX_NAME, DiskIndex
    from cellvec.cell_index.knn import FlatIndex

    atlas = indexed_atlas(fake_store, "disk", "disk", n_cells=400)
    ds = atlas.dataset()
    ds.drop_index(INDEX_NAME)
    index = DiskIndex(ds, atlas.index().params)
    assert not index.indexed
    vecs = Atlas.open(fake_store, "disk").vectors
    ai, asim = index.search(vecs[:20], 10)
    ei, esim = FlatIndex(vecs).search(vecs[:20], 10)
    np.testing.assert_allclose(asim, esim, atol=1e-5)
    # the same neighbours, not only the same similarities: each id's own similarity is the
    # one reported, and ids agree wherever a similarity is not shared (a tie's order is free)
    np.testing.assert_allclose(asim, np.einsum("qd,qkd->qk", vecs[:20], vecs[ai]), atol=1e-5)
    tied = (np.abs(esim[:, :, None] - esim[:, None, :]) < 1e-6).sum(2) > 1
    np.testing.assert_array_equal(ai[~tied], ei[~tied])


def test_an_open_disk_atlas_reads_the_version_it_opened_after_a_rebuild(fake_store, fake_models):
    from cellvec.cell_index.atlas import Atlas

    indexed_atlas(fake_store, "disk", "disk", n_cells=400)
    old = Atlas.open(fake_store, "disk")
    indexed_atlas(fake_store, "disk", "disk", n_cells=600)
    assert Atlas.open(fake_store, "disk").n_cells == 600
    # read lazily after the rebuild: still the 400 rows its label codes belong to
    assert len(old.vectors) == len(old.cell_ids) == old.weights().shape[0] == 400
    assert old.index().ntotal == 400


def test_a_disk_atlas_reads_broad_labels_as_the_memory_one_does(fake_store, fake_models, tmp_path):
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.mapping import Reference, map_cells

    for index in ("memory", "disk"):
        indexed_atlas(
            fake_store, index, index, adata=two_levels(n=600), broad_label_key="cell_type_broad"
        )
    mem, disk = Atlas.open(fake_store, "memory"), Atlas.open(fake_store, "disk")
    assert disk.on_disk
    for a, b in zip(disk.broad_codes(), mem.broad_codes()):
        np.testing.assert_array_equal(a, b)
    assert mem.broad_codes()[2].tolist() == [0, 1, 2, 2]  # B, M, T_a and T_b under T
    for atlas in (mem, disk):  # what `atlas list` shows, from the metadata alone
        assert Atlas.describe(fake_store, atlas.name) == atlas.summary()
    q = two_levels(seed=7, n=60, prefix="q")
    a, b = map_cells(q, disk), map_cells(q, mem)
    assert (a.broad.labels == b.broad.labels).mean() >= 0.99
    # a blocklist naming a broad label (T covers T_a and T_b) works from the codes alone
    a, b = map_cells(q, disk, exclude_labels="T"), map_cells(q, mem, exclude_labels="T")
    assert a.excluded_labels == b.excluded_labels == ["T"]
    assert not set(a.labels) & {"T_a", "T_b"} and not set(b.labels) & {"T_a", "T_b"}
    assert disk._broad_labels is None  # mapping never built the per-cell broad labels
    assert (disk.broad_labels == mem.broad_labels).all()  # built on asking, the same
    # a query of "another species" (through orthologs): both levels' typicality is
    # calibrated on level-shifted views of the calibration cells, read from the table
    table = tmp_path / "orth.csv"
    table.write_text("".join(f"Z{n},{n}\n" for n in q.var_names))
    q.var_names = [f"Z{n}" for n in q.var_names]
    a, b = (map_cells(q, x, orthologs=table, min_typicality=0.01) for x in (disk, mem))
    assert (a.labels == b.labels).mean() >= 0.99 and (
        a.broad.labels == b.broad.labels
    ).mean() >= 0.99
    np.testing.assert_allclose(a.typicality, b.typicality, atol=1e-6)
    np.testing.assert_allclose(a.broad.typicality, b.broad.typicality, atol=1e-6)
    species = Reference.of(disk).target(None, other_species=True)
    assert species.calibration.draws > 1 and species.broad_calibration.draws > 1


def test_auto_puts_an_atlas_on_disk_above_the_memory_budget(monkeypatch):
    from cellvec.cell_index.disk_index import choose_kind, choose_params, memory_estimate
    from cellvec.errors import CellvecError

    assert choose_kind("auto", 1_000_000, 128) == "memory"  # ~1.2 GB < 4 GiB
    assert choose_kind("auto", 20_000_000, 128) == "disk"  # ~24 GB
    monkeypatch.setenv("CELLVEC_ATLAS_MEMORY_BUDGET", "1M")
    assert memory_estimate(2_000, 128) > 2**20
    assert choose_kind("auto", 2_000, 128) == "disk"
    with pytest.raises(CellvecError, match="too small for a disk index"):
        choose_kind("disk", 100, 128)
    monkeypatch.setenv("CELLVEC_ATLAS_MEMORY_BUDGET", "lots")
    with pytest.raises(CellvecError, match="CELLVEC_ATLAS_MEMORY_BUDGET"):
        choose_kind("auto", 2_000, 128)
    p = choose_params(20_000_000, 128)
    assert (p.num_partitions, p.num_sub_vectors) == (4096, 32) and p.nprobes <= p.num_partitions


def test_a_panel_query_is_reaggregated_or_refused_never_answered_from_the_full_index(
    fake_store, fake_models, monkeypatch
):
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.mapping import map_cells
    from cellvec.errors import CellvecError

    indexed_atlas(fake_store, "mem", "memory")
    indexed_atlas(fake_store, "disk", "disk")
    query = tiny_adata(n_cells=30, seed=6, prefix="q")
    panel = query[:, [g for g in query.var_names if not g.endswith(("1", "2", "3"))]].copy()
    disk = Atlas.open(fake_store, "disk")
    a = map_cells(panel, disk)  # small enough: re-aggregated over the panel in memory
    b = map_cells(panel, Atlas.open(fake_store, "mem"))
    assert a.gene_coverage < 0.999 and (a.labels == b.labels).all()
    monkeypatch.setenv("CELLVEC_ATLAS_MEMORY_BUDGET", "1K")
    with pytest.raises(CellvecError, match="searched on disk .* restricted to the query's genes"):
        map_cells(panel, Atlas.open(fake_store, "disk"))
    assert map_cells(query, Atlas.open(fake_store, "disk")).gene_coverage == 1.0


def test_service_follows_a_disk_atlas(fake_store, fake_models):
    import time

    import httpx

    from cellvec.cell_index.mapping import map_cells
    from cellvec.service import create_app
    from helpers import request_cells as _cells
    from servers import Server

    indexed_atlas(fake_store, "disk", "disk")
    body, truth = _cells(12, seed=7)
    with Server(create_app(fake_store)) as url, httpx.Client(base_url=url, timeout=60) as c:
        for _ in range(300):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        info = c.get("/v1/atlases").json()["atlases"][0]
        assert info["index"]["kind"] == "disk" and info["n_cells"] == 1200
        r = c.post("/v1/atlases/disk/map", json=body)
        assert r.status_code == 200, r.text
        served = [x["label"] for x in r.json()["cells"]]
    local = map_cells(tiny_adata(n_cells=12, seed=7, prefix="q"), "disk", store=fake_store)
    assert served == local.labels.tolist() == truth


def test_atlas_index_command_moves_an_atlas_to_disk_and_back(fake_store, fake_models):
    import json

    from click.testing import CliRunner

    from cellvec.cell_index.atlas import Atlas
    from cellvec.cli import cli

    indexed_atlas(fake_store, "tiny", "memory", n_cells=600)
    r = CliRunner().invoke(
        cli, ["atlas", "index", "tiny", "--store", str(fake_store), "--nprobes", "4", "--json"]
    )
    assert r.exit_code == 0, r.output
    entry = json.loads(r.output)["index"]
    assert entry["kind"] == "disk" and entry["nprobes"] == 4
    atlas = Atlas.open(fake_store, "tiny")
    assert atlas.on_disk and atlas.index().indexed
    r = CliRunner().invoke(
        cli, ["atlas", "index", "tiny", "--store", str(fake_store), "--index", "memory"]
    )
    assert r.exit_code == 0 and "memory index" in r.output
    assert not Atlas.open(fake_store, "tiny").on_disk


@pytest.mark.slow
def test_an_index_built_on_a_local_ray_cluster_searches_like_exact_knn(fake_store, fake_models):
    """Centroids and codebook trained once (seeded), Ray workers index the fragments with
    them: the same index as the one built in this process, and as good as exact KNN."""
    from pathlib import Path

    pytest.importorskip("ray", reason="Ray is the `ray` extra: pip install 'cellvec[ray]'")
    from cellvec._ray import start_local_cluster
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.build import index_atlas

    indexed_atlas(fake_store, "tiny", "memory", n_cells=1200)
    src = str(Path(__file__).resolve().parents[1] / "src")
    ray = start_local_cluster(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": src}})
    try:
        entry = index_atlas(fake_store, "tiny", index="disk", ray=True)
    finally:
        ray.shutdown()
    atlas = Atlas.open(fake_store, "tiny")
    assert entry["kind"] == "disk" and atlas.index().indexed
    vecs = atlas.vectors
    ai = atlas.index().search(vecs[::5], 15)[0]
    # unseeded (lance-ray's own training) this was 0.9950-1.0000 over 20 builds, and 0.9892
    # once in CI; seeded it is 0.9978 on every build (20 of 20) and the same index as a
    # build in this process (below), and over training seeds 0-39 it ranged 0.9978-1.0000
    # (range 0.0022): the floor is the lowest less the range, rounded down to 3 decimals
    # (0.9978 - 0.0022 -> 0.995; `python benchmarks/disk_index_seed_spread.py --seeds 40`, the
    # "every 5th" line)
    assert index_recall(atlas.index(), vecs, 5) >= 0.995
    index_atlas(fake_store, "tiny", index="disk")  # rebuilt in this process: the same index
    np.testing.assert_array_equal(
        Atlas.open(fake_store, "tiny").index().search(vecs[::5], 15)[0], ai
    )
