"""Stores in a bucket: every command on `s3://...` (moto's S3 server on 127.0.0.1) gives
what it gives on a local directory; concurrent writers lose nothing; bad URIs and
missing credentials are named with their fix."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import httpx
import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from cellvec.cli import cli
from cellvec.errors import StoreError
from cellvec.storage import OPTIONS_ENV, StoreLocation, store_location
from helpers import tiny_adata
from servers import s3_server

BUCKET = "cellvec-tests"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def s3_uri(s3):
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


def _opts(s3) -> list[str]:
    return [a for k, v in s3.storage_options().items() for a in ("--storage-option", f"{k}={v}")]


def _run(*args):
    res = CliRunner().invoke(cli, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def test_the_server_answers_conditional_puts_with_412(s3):
    assert s3.conditional_put_status(BUCKET) == 412


def test_store_locations_and_options(monkeypatch):
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    assert store_location("store/").is_local and store_location("store/").uri == "store/"
    assert store_location("file:///tmp/x").uri == "/tmp/x"
    loc = store_location("s3://bkt/a/b/", {"AWS_Region": "eu-west-1"})
    assert (loc.uri, loc.scheme, loc.options()) == (
        "s3://bkt/a/b",
        "s3",
        {"aws_region": "eu-west-1"},
    )
    assert loc.table_uri("genes_x") == "s3://bkt/a/b/genes_x.lance"
    monkeypatch.setenv(OPTIONS_ENV, json.dumps({"aws_region": "us-east-1", "allow_http": "true"}))
    loc = store_location(loc, {"allow_http": "false"})  # given options win over the environment
    assert loc.options() == {"aws_region": "eu-west-1", "allow_http": "false"}
    # a server worker gets the same location back from the environment
    monkeypatch.setenv(OPTIONS_ENV, loc.to_env()[OPTIONS_ENV])
    assert store_location(loc.uri) == loc
    with pytest.raises(StoreError, match="unknown scheme 'hdfs'"):
        store_location("hdfs://x/y")
    with pytest.raises(StoreError, match="names no bucket"):
        store_location("s3://")
    monkeypatch.setenv(OPTIONS_ENV, "region=1")
    with pytest.raises(StoreError, match="not JSON"):
        store_location("s3://b/p")


def _pipeline(tmp_path, store: str, extra: list[str], tag: str) -> dict:
    """genes build + import + search, atlas build, map --save-as and sql through the CLI."""
    from helpers import write_gene_files

    files = write_gene_files(tmp_path)
    genes, info, go = files["genes"], files["gene_info"], files["gene2go"]
    ref, q = tmp_path / "ref.h5ad", tmp_path / "q.h5ad"
    if not ref.exists():
        tiny_adata(n_cells=90, seed=1).write_h5ad(ref)
        tiny_adata(n_cells=30, seed=2, prefix="q").write_h5ad(q)
        rng = np.random.default_rng(0)
        np.savez(
            tmp_path / "vectors.npz",
            symbols=np.array([g["symbol"] for g in genes]),
            vectors=rng.standard_normal((len(genes), 16)).astype(np.float32),
        )
    s = ["--store", store, *extra]
    out = {}
    build = ["genes", "build", "--gene-info", info, "--gene2go", go, "--species", "human"]
    out["build"] = json.loads(_run(*build, "--model", "fake", *s, "--json").stdout)
    rebuild = json.loads(_run(*build, "--model", "fake", *s, "--json").stdout)
    assert rebuild["n_embedded"] == 0  # incremental on either store
    _run("genes", "import", tmp_path / "vectors.npz", "--model", "rand", *s)
    out["search"] = json.loads(
        _run(
            "genes", "search", "--gene", "BGENE1", "--model", "fake", "-k", "4", *s, "--json"
        ).stdout
    )["results"]
    atlas = ["atlas", "build", ref, *s, "--name", "tiny", "--label-key", "cell_type"]
    _run(*atlas, "--top-genes", "10", "--refine", "none", "--calibration-split", "0.2")
    mapped = tmp_path / f"mapped_{tag}.h5ad"
    out["map"] = json.loads(
        _run(
            "map",
            q,
            *s,
            "--atlas",
            "tiny",
            "--out",
            mapped,
            "--truth-key",
            "cell_type",
            "--min-typicality",
            "0.01",
            "--save-as",
            "q",
            "--json",
        ).stdout
    )
    import anndata as ad

    m = ad.read_h5ad(mapped)
    out["labels"] = m.obs["cellvec_label"].astype(str).tolist()
    out["vectors"] = np.asarray(m.obsm["X_cellvec"])
    out["sql"] = _run(
        "sql",
        "SELECT label, count(*) AS n, (SELECT count(*) FROM mapping_q) AS mapped "
        "FROM atlas_tiny GROUP BY 1 ORDER BY 1",
        *s,
        "--format",
        "csv",
    ).stdout
    out["sql_genes"] = _run(
        "sql", "SELECT symbol FROM nearest_genes('TGENE0', 3)", *s, "--format", "json"
    ).stdout
    out["views"] = _run("sql", "SELECT count(*) AS n FROM genes_precomputed_rand", *s).stdout
    listed = json.loads(_run("atlas", "list", *s, "--json").stdout)["atlases"]
    out["atlases"] = [(a["name"], a["n_cells"], a["classes"]) for a in listed]
    return out


def test_every_command_on_s3_gives_the_local_result(tmp_path, s3, s3_uri, monkeypatch):
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    local = _pipeline(tmp_path, str(tmp_path / "store"), [], "local")
    remote = _pipeline(tmp_path, s3_uri, _opts(s3), "s3")
    assert remote["build"]["n_genes"] == local["build"]["n_genes"] == 30
    assert remote["build"]["store"] == s3_uri
    assert [r["symbol"] for r in remote["search"]] == [r["symbol"] for r in local["search"]]
    assert remote["labels"] == local["labels"]
    np.testing.assert_allclose(remote["vectors"], local["vectors"], atol=1e-6)
    for key in ("accuracy", "macro_f1", "unassigned_fraction"):
        assert remote["map"][key] == local["map"][key]
    assert remote["sql"] == local["sql"] and "30" in remote["sql"]
    assert remote["sql_genes"] == local["sql_genes"]
    assert remote["views"] == local["views"]
    assert remote["atlases"] == local["atlases"] == [("tiny", 90, {"B": 30, "M": 30, "T": 30})]
    # everything lives in the bucket: tables and the atlas's artifacts, nothing on disk
    keys = {
        o["Key"].split("/")[1]
        for page in s3.client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=BUCKET, Prefix=s3_uri.split("/", 3)[3] + "/")
        for o in page.get("Contents", [])
    }
    assert {"genes_fake.lance", "atlas_tiny.lance", "mapping_q.lance"} <= keys
    assert len([k for k in keys if k.startswith("_artifact_")]) == 2  # whitening, head
    assert not any(p.name.startswith(("s3:", BUCKET)) for p in tmp_path.iterdir())
    assert not (tmp_path / "store" / "_artifacts").exists()  # artifacts are tables here too


def test_python_api_reads_credentials_from_the_environment(tmp_path, s3, s3_uri, monkeypatch):
    """No options given: Lance takes AWS_* from the environment, as with a real bucket."""
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.build import build_atlas
    from cellvec.cell_index.mapping import map_cells
    from cellvec.cell_index.recipe import Recipe
    from helpers import build_tiny, write_gene_files

    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv(OPTIONS_ENV, raising=False)
    build_tiny(write_gene_files(tmp_path), s3_uri)
    build_atlas(tiny_adata(90, seed=1), store=s3_uri, name="t", label_key="cell_type",
                recipe=Recipe(top_genes=10, refine="none"))  # fmt: skip
    atlas = Atlas.open(s3_uri, "t")
    assert isinstance(atlas.store, StoreLocation) and atlas.store.uri == s3_uri
    res = map_cells(tiny_adata(30, seed=2, prefix="q"), atlas, truth_key="cell_type")
    assert res.metrics["accuracy"] > 0.9


@pytest.fixture
def s3_atlas(tmp_path, s3, s3_uri, monkeypatch):
    """A tiny gene store and atlas in the bucket (and the same on local disk), options in
    $CELLVEC_STORAGE_OPTIONS as `cellvec serve --workers N` passes them on."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.recipe import Recipe
    from helpers import build_tiny, write_gene_files

    monkeypatch.setenv(OPTIONS_ENV, json.dumps(s3.storage_options()))
    files = write_gene_files(tmp_path)
    stores = {"s3": s3_uri, "local": str(tmp_path / "store")}
    for store in stores.values():
        build_tiny(files, store)
        build_atlas(tiny_adata(90, seed=1), store=store, name="tiny", label_key="cell_type",
                    recipe=Recipe(top_genes=10, refine="none"),
                    options=BuildOptions(calibration_split=0.2))  # fmt: skip
    return stores


def test_service_serves_a_bucket_without_copying_it(s3_atlas, tmp_path):
    from cellvec.service import create_app
    from helpers import request_cells as _cells
    from servers import Server

    answers = {}
    for kind, store in s3_atlas.items():
        app = create_app(store, enable_sql=True)
        with Server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(300):
                if c.get("/readyz").status_code == 200:
                    break
                time.sleep(0.05)
            assert c.get("/readyz").status_code == 200
            assert [a["name"] for a in c.get("/v1/atlases").json()["atlases"]] == ["tiny"]
            r = c.post("/v1/atlases/tiny/map", json=_cells(12)[0])
            assert r.status_code == 200, r.text
            sql = c.post("/v1/sql", json={"query": "SELECT count(*) AS n FROM atlas_tiny"})
            assert sql.status_code == 200, sql.text
            genes = c.get("/v1/genes/TGENE1/neighbors", params={"k": 3})
            answers[kind] = (r.json()["cells"], sql.json()["rows"], genes.json())
            served = app.state.atlases.get("tiny")
            if kind == "s3":  # held in memory: no memory-mapped copy anywhere
                assert served.folder is None and app.state.atlases.cache_dir is None
            else:
                assert served.folder is not None
    assert answers["s3"] == answers["local"]
    # --cache-dir: a bucket's atlas memory-mapped from a local folder, same answers
    app = create_app(s3_atlas["s3"], cache_dir=tmp_path / "cache", preload=False)
    with Server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        r = c.post("/v1/atlases/tiny/map", json=_cells(12)[0])
        assert r.status_code == 200 and r.json()["cells"] == answers["s3"][0]
    assert app.state.atlases.get("tiny").folder.parent == tmp_path / "cache" / "tiny"
    # the local store memory-maps its atlas in STORE/_serving; the bucket left nothing on disk
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("_serving")] == [
        "store/_serving"
    ]


def test_serve_workers_get_the_storage_options(s3_atlas):
    """`cellvec serve --store s3://... --storage-option ...  --workers 2`: the workers
    (new processes) open the bucket with the same options."""
    from helpers import request_cells as _cells
    from servers import serve_process

    env = {k: v for k, v in os.environ.items() if k != OPTIONS_ENV and not k.startswith("AWS_")}
    opts = json.loads(os.environ[OPTIONS_ENV])
    args = [a for k, v in opts.items() for a in ("--storage-option", f"{k}={v}")]
    body, truth = _cells(4)
    with serve_process("--store", s3_atlas["s3"], *args, "--workers", 2, env=env) as url:
        r = httpx.post(f"{url}/v1/atlases/tiny/map", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert [c["label"] for c in r.json()["cells"]] == truth


def _together(fn, writers) -> dict:
    """`fn(writer)` for each writer in its own thread, all released at the same moment;
    what each returned or raised."""
    start, out = threading.Barrier(len(writers)), {}

    def run(w):
        start.wait()
        try:
            out[w] = fn(w)
        except Exception as e:  # noqa: BLE001 (returned to the test)
            out[w] = e

    threads = [threading.Thread(target=run, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def test_two_writers_racing_lose_nothing(s3, s3_uri):
    """Appends from two writers at once both land (Lance retries a commit whose
    conditional PUT got 412); two replacements at once leave one whole table, and the
    writer whose replacement was not committed is told so."""
    from cellvec.cell_index.artifacts import load_artifact, save_artifact
    from cellvec.storage import Store, replace_table

    loc = store_location(s3_uri, s3.storage_options())
    Store(loc, create=True).db.create_table("log", pa.table({"writer": [0], "i": [0]}))

    def append(w):
        tbl = Store(loc).db.open_table("log")
        for i in range(10):
            tbl.add(pa.table({"writer": [w], "i": [i]}))

    assert _together(append, (1, 2)) == {1: None, 2: None}
    rows = Store(loc).db.open_table("log").to_arrow()
    assert sorted(zip(rows["writer"].to_pylist(), rows["i"].to_pylist())) == sorted(
        [(0, 0)] + [(w, i) for w in (1, 2) for i in range(10)]
    )

    # atlas builds saving artifacts at once (writers 1 and 3 the same one): all land
    arrays = {w: {"a": np.full(5, w % 2, np.float32)} for w in (1, 2, 3)}
    digests = _together(lambda w: save_artifact(loc, arrays[w]), (1, 2, 3))
    assert all(isinstance(d, str) for d in digests.values()), digests
    for w in (1, 2, 3):
        np.testing.assert_array_equal(load_artifact(loc, digests[w])["a"], arrays[w]["a"])

    # replacements at once: each round ends with exactly one writer's table, never a mix
    def replace(w):
        replace_table(Store(loc).db, "atlas_race", pa.table({"writer": [w] * 50}))
        return "ok"

    refused = 0
    for _ in range(5):
        results = _together(replace, (1, 2))
        tbl = Store(loc).db.open_table("atlas_race")
        committed = set(tbl.to_arrow()["writer"].to_pylist())
        assert len(committed) == 1 and results[committed.pop()] == "ok"
        for r in results.values():
            assert r == "ok" or (
                isinstance(r, StoreError) and "another writer at the same moment" in str(r)
            ), r
        refused += list(results.values()).count("ok") == 1
    assert refused  # the writers did collide (every round here, on moto) and one was told


def test_bad_uris_and_credentials_say_what_to_fix(s3, monkeypatch, tmp_path):
    for k in [k for k in os.environ if k.startswith(("AWS_", "CELLVEC_STORAGE"))]:
        monkeypatch.delenv(k)
    # nor credentials a machine keeps elsewhere: a profile in ~/.aws, an instance role
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    r = CliRunner()
    res = r.invoke(cli, ["genes", "search", "x", "--store", "s4://b/p"])
    assert (
        res.exit_code == 2 and "unknown scheme 's4'" in res.output and "s3://BUCKET" in res.output
    )
    res = r.invoke(cli, ["genes", "search", "x", "--store", "s3://b", "--storage-option", "region"])
    assert res.exit_code == 2 and "is not KEY=VALUE" in res.output
    cases = {
        "the bucket does not exist": ("s3://no-such-bucket/p", s3.storage_options()),
        "could not be reached": (
            f"s3://{BUCKET}/p",
            {**s3.storage_options(), "aws_endpoint": "http://127.0.0.1:9", "client_max_retries": "0"},
        ),
        "no AWS credentials": (
            f"s3://{BUCKET}/p",
            {k: v for k, v in s3.storage_options().items() if k not in ("aws_access_key_id", "aws_secret_access_key")},
        ),
    }  # fmt: skip
    for problem, (uri, opts) in cases.items():
        args = [a for k, v in opts.items() for a in ("--storage-option", f"{k}={v}")]
        t = time.monotonic()
        res = r.invoke(cli, ["genes", "search", "--gene", "A", "--store", uri, *args])
        assert res.exit_code == 1, res.output
        line = res.output.strip()
        assert problem in line and uri in line and "Fix:" in line and "Traceback" not in line, line
        assert time.monotonic() - t < 30
    # a bucket prefix with nothing in it is not a store
    res = r.invoke(
        cli, ["genes", "search", "--gene", "A", "--store", f"s3://{BUCKET}/empty", *_opts(s3)]
    )
    assert res.exit_code == 1 and "No gene store at s3://" in res.output


def test_artifacts_of_older_local_stores_are_still_read(tmp_path):
    """Stores written before artifacts became tables kept them in `_artifacts/<digest>.npz`."""
    import io

    from cellvec.cell_index.artifacts import array_hash, load_artifact

    arrays = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    digest = array_hash(arrays)
    with pytest.raises(StoreError, match=f"Artifact {digest} is missing.*cellvec atlas build"):
        load_artifact(tmp_path, digest)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (tmp_path / "_artifacts").mkdir()
    (tmp_path / "_artifacts" / f"{digest}.npz").write_bytes(buf.getvalue())
    np.testing.assert_array_equal(load_artifact(tmp_path, digest)["w"], arrays["w"])
    np.savez(tmp_path / "_artifacts" / f"{digest}.npz", w=arrays["w"] + 1)
    with pytest.raises(StoreError, match="does not match its hash"):
        load_artifact(tmp_path, digest)
