"""Ray for the parallel stages: results equal the single-process run.

One local Ray cluster for the module (2 CPUs, 127.0.0.1 only, no dashboard, no usage
statistics), started by the fixture and shut down by it. Marked slow: starting the
cluster and its workers takes 10-30 s on a shared 2-core machine, the module ~70 s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
from click.testing import CliRunner

from helpers import build_tiny, tiny_adata

TESTS = str(Path(__file__).resolve().parent)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU Ray cluster on 127.0.0.1 for this module's tests."""
    from cellvec._ray import start_local_cluster

    # workers unpickle the tests' fake embedder: they need this folder on their path
    path = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    ray = start_local_cluster(num_cpus=2, runtime_env={"env_vars": {"PYTHONPATH": path}})
    try:
        yield ray
    finally:
        ray.shutdown()


def _process_tree(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo.extend(children.get(p, []))
    return out


def _listening(pids: set[int]) -> list[str]:
    """Local addresses (hex, as /proc/net shows them) of the TCP sockets `pids` listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and f[9] in inodes:  # 0A: LISTEN
                out.append(f[1])
    return out


LOOPBACK = (
    "0100007F",  # 127.0.0.1
    "00000000000000000000000001000000",  # ::1
    "0000000000000000FFFF00000100007F",  # ::ffff:127.0.0.1
)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads Linux's /proc/net")
def test_local_cluster_listens_on_loopback_only(ray_cluster):
    addresses = _listening(_process_tree(os.getpid()))
    assert addresses, "the Ray cluster should be listening somewhere"
    assert all(a.split(":")[0] in LOOPBACK for a in addresses), addresses
    assert ray_cluster.cluster_resources()["CPU"] == 2


@pytest.fixture(scope="module")
def data(tmp_path_factory, ray_cluster, copy_of_tiny_store):
    """The tiny gene files and a store of them, a 300-cell reference h5ad (with 10 empty
    cells) and a 90-cell query h5ad."""
    from helpers import write_gene_files

    tmp = tmp_path_factory.mktemp("ray")
    files = write_gene_files(tmp)
    copy_of_tiny_store(tmp)
    ref = tiny_adata(300, seed=1)
    x = ref.X.toarray()
    x[5:15] = 0  # empty cells are dropped: workers must read the same rows
    ref.X = sp.csr_matrix(x)
    ref.write_h5ad(tmp / "ref.h5ad")
    tiny_adata(90, seed=2, prefix="q").write_h5ad(tmp / "query.h5ad")
    return {**files, "tmp": tmp, "store": tmp / "store"}


@pytest.fixture
def small_chunks(monkeypatch):
    """40-cell chunks, so that 300 cells make several shards and fragments."""
    import cellvec.cell_index.parallel as parallel

    monkeypatch.setattr(parallel, "CHUNK", 40)


def _atlas_table(data, atlas):
    """The LanceDB table of an atlas (its metadata is the atlas's)."""
    from cellvec.storage import Store

    return Store(data["store"]).open_table(f"atlas_{atlas}")


def _table(store, name):
    from cellvec.storage import Store

    return Store(store).open_table(name).to_lance()


def _assert_same_atlas(store, a, b):
    ta, tb = _table(store, f"atlas_{a}").to_table(), _table(store, f"atlas_{b}").to_table()
    assert ta.num_rows == tb.num_rows
    assert ta.schema.names == tb.schema.names
    for col in ("cell_id", "label", "batch", "dataset", "top_genes", "top_weights"):
        assert ta.column(col).to_pylist() == tb.column(col).to_pylist(), col
    if "label_broad" in ta.schema.names:
        assert ta.column("label_broad").to_pylist() == tb.column("label_broad").to_pylist()
    va = np.asarray(ta.column("vector").to_pylist())
    vb = np.asarray(tb.column("vector").to_pylist())
    np.testing.assert_allclose(va, vb, atol=1e-6, rtol=0)
    np.testing.assert_allclose(
        ta.column("self_similarity").to_numpy(zero_copy_only=False),
        tb.column("self_similarity").to_numpy(zero_copy_only=False),
        atol=1e-6,
        equal_nan=True,
    )


@pytest.mark.slow
def test_atlas_build_on_ray_equals_single_process(data, small_chunks, ray_cluster):
    from cellvec import BuildOptions, Recipe, build_atlas
    from cellvec.storage import read_meta

    options = dict(
        store=data["store"],
        label_key="cell_type",
        batch_key="batch",
        broad_label_key="batch",  # a second label column, whatever it means
        recipe=Recipe(top_genes=12),
    )
    fit = dict(calibration_split=0.2, refine_options={"steps": 30})
    single = build_atlas(
        data["tmp"] / "ref.h5ad", name="single", options=BuildOptions(**fit), **options
    )
    dist = build_atlas(
        data["tmp"] / "ref.h5ad", name="dist", options=BuildOptions(ray=True, **fit), **options
    )
    assert len(dist.vectors) == 290  # the 10 empty cells are left out on both paths
    assert (dist.broad_labels == single.broad_labels).all()
    _assert_same_atlas(data["store"], "single", "dist")
    lance_ds = _table(data["store"], "atlas_dist")
    assert len(lance_ds.get_fragments()) > 1  # written by workers, committed once
    assert lance_ds.version == 1
    assert np.isfinite(dist.calibration()).sum() == np.isfinite(single.calibration()).sum() > 0
    meta_single, meta_dist = (
        read_meta(_atlas_table(data, "single")),
        read_meta(_atlas_table(data, "dist")),
    )
    assert meta_dist["recipe"] == meta_single["recipe"]
    assert meta_dist["classes"] == meta_single["classes"]


@pytest.mark.slow
def test_atlas_rebuilt_on_ray_replaces_the_old_one(data, ray_cluster):
    """An in-memory AnnData (no file for workers to open) and no refinement; built twice."""
    from cellvec import BuildOptions, Recipe, build_atlas

    ref = tiny_adata(120, seed=3)
    options = dict(
        store=data["store"], label_key="cell_type", recipe=Recipe(refine="none", top_genes=8)
    )
    on_ray = BuildOptions(ray=True)
    build_atlas(ref, name="mem_single", **options)
    build_atlas(ref[:60].copy(), name="mem_dist", options=on_ray, **options)
    dist = build_atlas(ref, name="mem_dist", options=on_ray, **options)
    assert len(dist.vectors) == 120
    _assert_same_atlas(data["store"], "mem_single", "mem_dist")
    assert _table(data["store"], "atlas_mem_dist").version == 2


@pytest.mark.slow
def test_atlas_on_ray_in_a_bucket(data, small_chunks, ray_cluster):
    """Workers write the fragments into a store on the local S3 server, with its options."""
    from cellvec import BuildOptions, Recipe, build_atlas
    from cellvec.storage import store_location
    from servers import s3_server

    options = dict(label_key="cell_type", recipe=Recipe(top_genes=12, refine="none"))
    build_atlas(data["tmp"] / "ref.h5ad", store=data["store"], name="local", **options)
    with s3_server() as s3:
        s3.create_bucket("ray")
        store = store_location("s3://ray/store", s3.storage_options())
        build_tiny(data, store)
        dist = build_atlas(
            data["tmp"] / "ref.h5ad",
            store=store,
            name="bucket",
            options=BuildOptions(ray=True),
            **options,
        )
        bucket = _table(store, "atlas_bucket")
        assert len(bucket.get_fragments()) > 1
        a, b = _table(data["store"], "atlas_local").to_table(), bucket.to_table()
    assert len(dist.vectors) == 290
    assert a.column("cell_id").to_pylist() == b.column("cell_id").to_pylist()
    np.testing.assert_allclose(
        np.asarray(a.column("vector").to_pylist()),
        np.asarray(b.column("vector").to_pylist()),
        atol=1e-6,
        rtol=0,
    )


@pytest.mark.slow
def test_bad_rows_met_by_a_worker_fail_cleanly(data, small_chunks, ray_cluster):
    """A backed file is checked as it streams: a worker meets the NaN values; the build
    stops with cellvec's message and leaves no table behind."""
    from cellvec import BuildOptions, build_atlas, read_expression
    from cellvec.cell_index.table import list_atlases
    from cellvec.errors import InputFormatError

    bad = tiny_adata(2100, seed=4)  # the reader checks the first 2,000 cells itself
    x = bad.X.toarray()
    x[2050, :3] = np.nan
    bad.X = sp.csr_matrix(x)
    bad.write_h5ad(data["tmp"] / "bad.h5ad")
    src = read_expression(data["tmp"] / "bad.h5ad", backed=True)
    with pytest.raises(InputFormatError, match="NaN/inf values in cells 2040-2080") as err:
        build_atlas(
            src,
            store=data["store"],
            name="bad",
            label_key="cell_type",
            options=BuildOptions(ray=True),
        )
    assert type(err.value) is InputFormatError  # not Ray's wrapper, with its traceback
    assert "bad" not in list_atlases(data["store"])


@pytest.mark.slow
def test_a_failed_commit_on_ray_leaves_no_table_directory(
    data, small_chunks, ray_cluster, monkeypatch
):
    """The workers have written their fragments; the driver's commit fails: the new
    table's directory, fragments and all, is removed."""
    import lance

    from cellvec import BuildOptions, Recipe, build_atlas
    from cellvec.cell_index.table import list_atlases

    seen = []

    def fail(uri, *args, **kwargs):
        seen.append(any(Path(uri).rglob("*.lance")))
        raise OSError("commit failed")

    monkeypatch.setattr(lance.LanceDataset, "commit", staticmethod(fail))
    with pytest.raises(OSError, match="commit failed"):
        build_atlas(
            data["tmp"] / "ref.h5ad",
            store=data["store"],
            name="uncommitted",
            label_key="cell_type",
            recipe=Recipe(top_genes=12, refine="none"),
            options=BuildOptions(ray=True),
        )
    assert seen == [True]  # fragments were on disk when the commit was tried
    assert not (data["store"] / "atlas_uncommitted.lance").exists()
    assert "uncommitted" not in list_atlases(data["store"])


@pytest.mark.slow
def test_map_on_ray_equals_single_process(data, small_chunks, ray_cluster):
    from cellvec import BuildOptions, Recipe, build_atlas, map_cells

    build_atlas(
        data["tmp"] / "ref.h5ad",
        store=data["store"],
        name="for_map",
        label_key="cell_type",
        recipe=Recipe(top_genes=12),
        options=BuildOptions(refine_options={"steps": 30}),
    )
    query = data["tmp"] / "query.h5ad"
    single = map_cells(query, "for_map", store=data["store"], truth_key="cell_type")
    dist = map_cells(query, "for_map", store=data["store"], truth_key="cell_type", ray=True)
    assert dist.cell_ids == single.cell_ids
    assert (dist.labels == single.labels).all()
    np.testing.assert_allclose(dist.vectors, single.vectors, atol=1e-6, rtol=0)
    np.testing.assert_allclose(dist.confidence, single.confidence, atol=1e-6)
    assert dist.metrics["accuracy"] == single.metrics["accuracy"] > 0.9


@pytest.mark.slow
def test_gene_store_on_ray_equals_single_process(data, tmp_path, ray_cluster):
    from cellvec.gene_store.store import GeneStore
    from helpers import FakeEmbedder

    single = build_tiny(data, tmp_path / "single", batch_size=7)
    dist = build_tiny(data, tmp_path / "dist", embedder=FakeEmbedder(), batch_size=7, ray=True)
    assert dist.n_embedded == single.n_embedded == 30
    a, b = GeneStore(tmp_path / "single").load("fake"), GeneStore(tmp_path / "dist").load("fake")
    assert a.genes["symbol"].to_list() == b.genes["symbol"].to_list()
    np.testing.assert_array_equal(a.vectors, b.vectors)
    assert a.meta["content_hash"] == b.meta["content_hash"]
    again = build_tiny(data, tmp_path / "dist", batch_size=7, ray=True)
    assert again.n_embedded == 0  # incremental as before


@pytest.mark.slow
def test_cli_ray_flag_and_environment(data, tmp_path, ray_cluster):
    from cellvec.cli import cli

    runner = CliRunner()
    store, ref = str(data["store"]), str(data["tmp"] / "ref.h5ad")
    common = ["--store", store, "--label-key", "cell_type", "--refine", "none", "--json"]
    res = runner.invoke(cli, ["atlas", "build", ref, "--name", "cli_ray", *common, "--ray"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["n_cells"] == 290
    out = tmp_path / "mapped.parquet"
    res = runner.invoke(
        cli,
        ["map", str(data["tmp"] / "query.h5ad"), "--store", store, "--atlas", "cli_ray"]
        + ["--out", str(out), "--truth-key", "cell_type", "--json"],
        env={"CELLVEC_RAY_ADDRESS": "default"},
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["accuracy"] > 0.9
    assert out.exists()
    res = runner.invoke(
        cli,
        ["map", str(data["tmp"] / "query.h5ad"), "--server", "http://127.0.0.1:9", "--ray"]
        + ["--atlas", "cli_ray"],
    )
    assert res.exit_code == 2 and "give one of them" in res.output


def test_ray_output_stays_off_stdout(ray_cluster, capsys):
    """A command's stdout is its --json document: what Ray prints while cellvec runs Ray
    Data goes to stderr, and a cluster cellvec starts does not forward its workers'
    output to this process (a fresh-clone run once found Ray Data's DEBUG dumps on stdout)."""
    from ray._private.ray_logging import global_worker_stdstream_dispatcher

    from cellvec._ray import ordered_data

    with ordered_data(ray_cluster):
        print("noise from inside a Ray Data run")
    out = capsys.readouterr()
    assert "noise" in out.err and "noise" not in out.out
    print("after the run")
    assert "after the run" in capsys.readouterr().out  # stdout is back
    names = [name for name, _ in global_worker_stdstream_dispatcher.handlers]
    assert "ray_print_logs" not in names


def test_ray_addresses():
    from cellvec._ray import DEFAULT, ray_address

    assert ray_address(None) is None and ray_address(False) is None
    assert ray_address(True) == ray_address("") == ray_address("default") == DEFAULT
    assert ray_address(" ray://head:10001 ") == "ray://head:10001"


def test_an_address_nothing_answers_at_fails_fast():
    import socket
    import time

    from cellvec._ray import _check_reachable
    from cellvec.errors import CellvecError

    with socket.socket() as s:  # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = time.perf_counter()
    with pytest.raises(CellvecError, match="Nothing answers at Ray address"):
        _check_reachable(f"127.0.0.1:{port}", "hint")
    with pytest.raises(CellvecError, match="has no port"):
        _check_reachable("ray://head", "hint")
    assert time.perf_counter() - t < 5
