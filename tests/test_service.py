import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from cellvec.cell_index.build import build_atlas
from cellvec.cell_index.recipe import Recipe
from helpers import build_centroid_atlas, centroid_scores, tiny_adata
from helpers import request_cells as _cells
from servers import Server, serve_process


def test_endpoints(served, tmp_path):
    from cellvec.service import create_app

    with (
        Server(create_app(served, enable_sql=True)) as url,
        httpx.Client(base_url=url, timeout=30) as c,
    ):
        assert c.get("/healthz").json()["status"] == "ok"
        for _ in range(300):  # ready once the atlases are loaded (in the background)
            ready = c.get("/readyz")
            if ready.status_code == 200:
                break
            assert ready.status_code == 503 and "Loading" in ready.json()["error"]
            time.sleep(0.05)
        assert ready.json()["models"] == ["fake"]
        atl = c.get("/v1/atlases").json()["atlases"]
        assert atl[0]["name"] == "tiny" and atl[0]["recipe"]["top_genes"] == 10
        body, truth = _cells(6)
        r = c.post("/v1/atlases/tiny/map", json={**body, "scores": True})
        assert r.status_code == 200, r.text
        out = r.json()
        assert [x["label"] for x in out["cells"]] == truth
        assert all(0 < x["confidence"] <= 1 and x["scores"] for x in out["cells"])
        path = tmp_path / "q.h5ad"
        tiny_adata(n_cells=9, seed=4, prefix="u").write_h5ad(path)
        r = c.post("/v1/atlases/tiny/map_h5ad", files={"file": ("q.h5ad", path.read_bytes())})
        assert r.status_code == 200 and r.json()["n_cells"] == 9
        r = c.post(
            "/v1/atlases/tiny/map", files={"file": ("q.h5ad", path.read_bytes())}
        )  # same URL as JSON
        assert r.status_code == 200 and r.json()["n_cells"] == 9
        s = c.get("/v1/genes/search", params={"q": "B cell receptor immunoglobulin", "k": 3}).json()
        assert all(g["symbol"].startswith("B") for g in s["results"])
        nb = c.get("/v1/genes/TGENE0/neighbors", params={"k": 4}).json()
        assert len(nb["results"]) == 4
        q = c.post(
            "/v1/sql",
            json={"query": "SELECT label, count(*) AS n FROM atlas_tiny GROUP BY 1 ORDER BY 1"},
        ).json()
        assert q["rows"] == [
            {"label": "B", "n": 30},
            {"label": "M", "n": 30},
            {"label": "T", "n": 30},
        ]
        assert "/v1/atlases/{atlas}/map" in c.get("/openapi.json").json()["paths"]


def test_errors_are_json_and_actionable(served):
    from cellvec.service import create_app

    with (
        Server(create_app(served, max_body_bytes=20_000)) as url,
        httpx.Client(base_url=url, timeout=30) as c,
    ):
        r = c.post("/v1/atlases/nope/map", json=_cells()[0])
        assert r.status_code == 404 and "tiny" in r.json()["error"]
        r = c.post("/v1/atlases/no such/map", json=_cells()[0])  # not a table name LanceDB takes
        assert r.status_code == 404 and "tiny" in r.json()["error"]
        r = c.post(
            "/v1/atlases/tiny/map",
            json={"genes": ["A"], "cells": [{"id": "x", "indices": [5], "values": [1.0]}]},
        )
        assert r.status_code == 422 and "out of range" in r.json()["error"]
        r = c.post(
            "/v1/atlases/tiny/map",
            json={"genes": ["NOTAGENE"] * 3, "cells": [{"id": "x", "indices": [0], "values": [1]}]},
        )
        assert r.status_code == 422 and "genes" in r.json()["error"]
        r = c.post("/v1/atlases/tiny/map", json={"cells": []})
        assert r.status_code == 422 and r.json()["error"].startswith("Invalid request")
        r = c.post(
            "/v1/atlases/tiny/map",
            content=b"x" * 30_000,
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and "split the cells" in r.json()["error"]
        r = c.post("/v1/sql", json={"query": "SELECT 1"})
        assert r.status_code == 403 and "--enable-sql" in r.json()["error"]
        r = c.get("/v1/genes/NOPE/neighbors")
        assert r.status_code == 404
        r = c.post("/v1/atlases/tiny/map_h5ad", files={"file": ("q.h5ad", b"not hdf5")})
        assert r.status_code == 422 and "h5ad" in r.json()["error"]


def test_auth(served, monkeypatch):
    from cellvec.service import create_app

    monkeypatch.setenv("CELLVEC_API_TOKEN", "s3cret")
    with Server(create_app(served)) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200  # liveness stays open
        r = c.get("/v1/atlases")
        assert r.status_code == 401 and "Authorization: Bearer" in r.json()["error"]
        assert c.get("/v1/atlases", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/atlases", headers={"Authorization": "Bearer s3cret"}).status_code == 200


@pytest.mark.slow
def test_concurrent_requests_while_atlas_is_rebuilt(served):
    from cellvec.service import create_app

    body, truth = _cells(12)
    stop = threading.Event()
    errors, sizes = [], []

    def rebuild():
        seed = 10
        while not stop.is_set():
            n = 60 if seed % 2 else 90
            build_atlas(
                tiny_adata(n_cells=n, seed=seed),
                store=served,
                name="tiny",
                label_key="cell_type",
                recipe=Recipe(top_genes=10),
            )
            seed += 1

    with Server(create_app(served)) as url, httpx.Client(base_url=url, timeout=60) as c:
        t = threading.Thread(target=rebuild)
        t.start()

        def one(i):
            if i % 3 == 0:
                r = c.get("/v1/atlases")
                if r.status_code != 200:
                    errors.append(r.text)
                else:
                    sizes.append(r.json()["atlases"][0]["n_cells"])
                return
            r = c.post("/v1/atlases/tiny/map", json=body)
            if r.status_code != 200 or [x["label"] for x in r.json()["cells"]] != truth:
                errors.append(r.text)

        try:
            with ThreadPoolExecutor(8) as ex:
                list(ex.map(one, range(120)))
        finally:
            stop.set()
            t.join()
    assert errors == []
    assert set(sizes) <= {60, 90} and len(set(sizes)) >= 1  # only whole atlases were ever seen


def test_bad_cell_arrays_are_422(served):
    from cellvec.service import create_app

    with Server(create_app(served)) as url, httpx.Client(base_url=url, timeout=30) as c:
        genes = [f"TGENE{i}" for i in range(5)]
        for cell, message in (
            ({"id": "x", "indices": [0.5], "values": [1.0]}, "integers"),
            ({"id": "x", "indices": ["a"], "values": [1.0]}, "integers"),
            ({"id": "x", "indices": [0], "values": ["high"]}, "numbers"),
            ({"id": "x", "indices": [[0]], "values": [[1.0]]}, "flat list"),
            ({"id": "x", "indices": [[0], 1], "values": [1.0, 2.0]}, "flat list"),
            ({"id": "x", "indices": [10**30], "values": [1.0]}, "integers"),
            ({"id": "x", "indices": [0, 1], "values": [1.0]}, "2 indices but 1 values"),
        ):
            r = c.post("/v1/atlases/tiny/map", json={"genes": genes, "cells": [cell]})
            assert r.status_code == 422 and message in r.json()["error"], (cell, r.text)


@pytest.mark.slow
def test_serve_with_several_workers(served):
    """`cellvec serve --workers 2` starts worker processes from the environment-configured factory."""
    with serve_process("--store", served, "--workers", 2) as url:
        body, truth = _cells(4)
        r = httpx.post(f"{url}/v1/atlases/tiny/map", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert [c["label"] for c in r.json()["cells"]] == truth


def test_chunked_body_over_the_limit_is_413(served):
    """The limit counts the bytes received: a chunked upload (no Content-Length) is refused too."""
    from cellvec.service import create_app

    def chunks():
        for _ in range(10):
            yield b"x" * 5_000

    with (
        Server(create_app(served, max_body_bytes=20_000)) as url,
        httpx.Client(base_url=url, timeout=30) as c,
    ):
        r = c.post(
            "/v1/atlases/tiny/map", content=chunks(), headers={"content-type": "application/json"}
        )
        assert "content-length" not in r.request.headers
        assert r.status_code == 413 and "split the cells" in r.json()["error"]
        body, truth = _cells(3)  # the server still answers after refusing
        r = c.post("/v1/atlases/tiny/map", json=body)
        assert [x["label"] for x in r.json()["cells"]] == truth


def test_batched_answers_equal_one_at_a_time(served):
    """Concurrent requests are gathered into batches; each gets what it would get alone."""
    from cellvec.service import create_app

    bodies = []
    for seed in range(24):
        body, _ = _cells(1 + seed % 3, seed=100 + seed)
        if seed % 4 == 0:  # another gene list (genes in another order) in the same batches
            perm = list(reversed(range(len(body["genes"]))))
            pos = {g: i for i, g in enumerate(perm)}
            body["genes"] = [body["genes"][i] for i in perm]
            for c in body["cells"]:
                c["indices"] = [pos[i] for i in c["indices"]]
        bodies.append({**body, "scores": True})

    def answers(app, concurrent):
        with Server(app) as url, httpx.Client(base_url=url, timeout=30) as c:
            post = lambda b: c.post("/v1/atlases/tiny/map", json=b).json()["cells"]  # noqa: E731
            if not concurrent:
                return [post(b) for b in bodies]
            with ThreadPoolExecutor(12) as ex:
                return list(ex.map(post, bodies))

    alone = answers(create_app(served, batch_wait_ms=0), concurrent=False)
    app = create_app(served, batch_wait_ms=50)
    together = answers(app, concurrent=True)
    assert app.state.batcher.batches < app.state.batcher.jobs == len(bodies)  # batches formed
    for a, b in zip(alone, together):
        assert [c["label"] for c in a] == [c["label"] for c in b]
        for ca, cb in zip(a, b):
            assert ca["confidence"] == pytest.approx(cb["confidence"], abs=1e-4)
            assert ca["scores"].keys() == cb["scores"].keys()
            for cls in ca["scores"]:
                assert ca["scores"][cls] == pytest.approx(cb["scores"][cls], abs=1e-4)


def _arrow(adata, dictionary=True):
    import numpy as np
    import pyarrow as pa

    x = adata.X.tocoo()
    genes = list(adata.var_names)
    gene = (
        pa.DictionaryArray.from_arrays(pa.array(x.col.astype(np.int32)), pa.array(genes))
        if dictionary
        else pa.array([genes[j] for j in x.col])
    )
    table = pa.table(
        {
            "cell_id": pa.array(np.asarray(adata.obs_names)[x.row]),
            "gene": gene,
            "value": pa.array(x.data.astype(np.float32)),
        }
    )
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_arrow_bodies_and_answers(served):
    import json

    import pyarrow as pa

    from cellvec.service import create_app

    a = tiny_adata(n_cells=12, seed=7, prefix="a")
    truth = a.obs["cell_type"].astype(str).tolist()
    arrow = "application/vnd.apache.arrow.stream"
    with Server(create_app(served)) as url, httpx.Client(base_url=url, timeout=30) as c:
        for dictionary in (True, False):
            r = c.post(
                "/v1/atlases/tiny/map",
                content=_arrow(a, dictionary),
                headers={"content-type": arrow},
                params={"scores": "true"},
            )
            assert r.status_code == 200, r.text
            assert [x["label"] for x in r.json()["cells"]] == truth
        r = c.post(
            "/v1/atlases/tiny/map",
            content=_arrow(a),
            headers={"content-type": arrow, "accept": arrow},
            params={"scores": "true", "vectors": "true"},
        )
        assert r.headers["content-type"].startswith(arrow)
        table = pa.ipc.open_stream(r.content).read_all()
        assert table.column("label").to_pylist() == truth
        meta = json.loads(table.schema.metadata[b"cellvec"])
        assert meta["classes"] == ["B", "M", "T"] and meta["k"] == 15
        assert table.column("scores").type.list_size == 3
        assert table.column("vector").type.list_size == meta["vector_dimension"] == 128
        # errors stay JSON 422s
        r = c.post("/v1/atlases/tiny/map", content=b"not arrow", headers={"content-type": arrow})
        assert r.status_code == 422 and "Arrow IPC" in r.json()["error"]
        sink = pa.BufferOutputStream()
        t = pa.table({"cell": ["x"], "gene": ["TGENE0"], "value": [1.0]})
        with pa.ipc.new_stream(sink, t.schema) as w:
            w.write_table(t)
        r = c.post(
            "/v1/atlases/tiny/map",
            content=sink.getvalue().to_pybytes(),
            headers={"content-type": arrow},
        )
        assert r.status_code == 422 and "cell_id" in r.json()["error"]
        r = c.post("/v1/atlases/tiny/map", content=b"x", headers={"content-type": "text/csv"})
        assert r.status_code == 415 and "application/json" in r.json()["error"]


def test_workers_share_the_atlas_files(served, monkeypatch):
    """An atlas version is written once for memory-mapping; later loads only map the files."""
    import numpy as np

    from cellvec.cell_index.atlas import Atlas
    from cellvec.service import create_app

    with Server(create_app(served)) as url:
        body, truth = _cells(4)
        assert [
            x["label"] for x in httpx.post(f"{url}/v1/atlases/tiny/map", json=body).json()["cells"]
        ] == truth
    folders = list((served / "_serving" / "tiny").glob("v*"))
    assert len(folders) == 1 and (folders[0] / "index.faiss").exists()

    def no_table_read(*a, **k):
        raise AssertionError("the atlas table was read again")

    monkeypatch.setattr(Atlas, "open", no_table_read)
    app = create_app(served)  # another worker: the files are there
    atlas = app.state.atlases.get("tiny")
    assert atlas.folder == folders[0] and isinstance(atlas.reference.labels.codes, np.memmap)
    with Server(app) as url:
        r = httpx.post(f"{url}/v1/atlases/tiny/map", json=body)
        assert [x["label"] for x in r.json()["cells"]] == truth


def test_client_maps_like_local_mapping(served, tmp_path, monkeypatch):
    """`cellvec.Client.map` and `cellvec map --server` give what local `map_cells` gives."""
    import json

    import anndata as ad
    import numpy as np
    import scipy.sparse as sp
    from click.testing import CliRunner

    from cellvec import Client
    from cellvec.cell_index.mapping import map_cells
    from cellvec.cli import cli
    from cellvec.service import create_app

    query = tiny_adata(n_cells=40, seed=11, prefix="m")
    keep = np.ones(query.n_obs, dtype=np.float32)
    keep[3] = 0  # an empty cell: excluded, as locally
    query.X = sp.csr_matrix(sp.diags(keep) @ query.X)
    path = tmp_path / "query.h5ad"
    query.write_h5ad(path)
    local = map_cells(path, "tiny", store=served, truth_key="cell_type")
    monkeypatch.setenv("CELLVEC_API_TOKEN", "tok")
    with Server(create_app(served)) as url:
        res = Client(url).map(path, atlas="tiny", truth_key="cell_type", chunk_size=16)
        assert res.cell_ids == local.cell_ids and len(res.cell_ids) == 39
        assert res.labels.tolist() == local.labels.tolist()
        np.testing.assert_allclose(res.confidence, local.confidence, atol=1e-5)
        np.testing.assert_allclose(res.scores, local.scores, atol=1e-5)
        np.testing.assert_allclose(res.vectors, local.vectors, atol=1e-5)
        assert res.metrics["accuracy"] == local.metrics["accuracy"]
        assert list(res.classes) == list(local.classes)
        out, table = tmp_path / "out.h5ad", tmp_path / "out.parquet"
        r = CliRunner().invoke(
            cli,
            ["map", str(path), "--server", url, "--atlas", "tiny", "--out", str(out)]
            + ["--table", str(table), "--truth-key", "cell_type", "--json"],
        )
        assert r.exit_code == 0, r.output
        summary = json.loads(r.stdout)
        assert summary["accuracy"] == local.metrics["accuracy"] and summary["n_cells"] == 39
        mapped = ad.read_h5ad(out)
        assert mapped.obs["cellvec_label"].astype(str).tolist() == local.labels.tolist()
        assert "cellvec_confidence" in mapped.obs and mapped.obsm["X_cellvec"].shape[0] == 39
        assert table.exists()
        monkeypatch.setenv("CELLVEC_API_TOKEN", "wrong")
        r = CliRunner().invoke(cli, ["map", str(path), "--server", url, "--atlas", "tiny"])
        assert r.exit_code != 0 and "401" in r.output


def test_service_maps_panels_and_typicality_like_local_mapping(served):
    """A request measuring a third of the atlas's genes is compared with the reference over
    those genes, and the typicality threshold applies, exactly as local `map_cells` does."""
    import numpy as np

    from cellvec import Client
    from cellvec.cell_index.mapping import map_cells
    from cellvec.service import create_app

    query = tiny_adata(n_cells=30, seed=12, prefix="p")
    panel = query[:, [i for i in range(query.n_vars) if i % 3 == 0]].copy()
    local = map_cells(panel, "tiny", store=served, min_typicality=0.2)
    assert local.gene_coverage < 0.6
    with Server(create_app(served)) as url:
        res = Client(url).map(panel, atlas="tiny", min_typicality=0.2)
    assert res.labels.tolist() == local.labels.tolist()
    np.testing.assert_allclose(res.typicality, local.typicality, atol=1e-6)
    np.testing.assert_allclose(res.vectors, local.vectors, atol=1e-5)


@pytest.mark.parametrize("mapped", [False, True])
def test_map_server_gives_map_store_labels_with_every_option(served, tmp_path, mapped):
    """`cellvec map --server` with the mixing test, a blocklist and an ortholog table gives
    the labels, confidences and mixing p-values `cellvec map --store` gives: one mapping
    path (the whole query travels in one request, the table with it), through the atlas's
    cross-species view held in memory or memory-mapped from the cache folder (`mapped`)."""
    import json

    import anndata as ad
    import numpy as np
    from click.testing import CliRunner

    from cellvec.cli import cli
    from cellvec.service import create_app

    query = tiny_adata(n_cells=45, seed=13, prefix="o")
    query.var_names = ["Z" + n[0].lower() + n[len("XGENE") :] for n in query.var_names]
    q = tmp_path / "q.h5ad"
    query.write_h5ad(q)
    table = tmp_path / "orth.tsv"  # "another species": Zt3 is TGENE3's ortholog
    table.write_text(
        "mouse\thuman\n" + "".join(f"Z{n[0].lower()}{n[5:]}\t{n}\n" for n in tiny_adata().var_names)
    )
    options = ["--atlas", "tiny", "--orthologs", str(table), "--min-mixing", "0.01"]
    options += ["--exclude-labels", "B,Doublet", "--min-typicality", "0.01"]
    options += ["--truth-key", "cell_type", "--json"]
    local = CliRunner().invoke(
        cli, ["map", str(q), "--store", str(served), "--out", str(tmp_path / "l.h5ad"), *options]
    )
    assert local.exit_code == 0, local.output
    cache = tmp_path / "cache" if mapped else None
    with Server(create_app(served, cache_dir=cache)) as url:
        remote = CliRunner().invoke(
            cli, ["map", str(q), "--server", url, "--out", str(tmp_path / "r.h5ad"), *options]
        )
    assert remote.exit_code == 0, remote.output
    if mapped:  # the view has its own memory-mapped files beside the atlas's
        assert {p.name for p in cache.iterdir()} == {"tiny", "tiny__species"}
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["excluded_labels"] == b["excluded_labels"] == ["B"]
    assert a["orthologs"] == b["orthologs"] == "orth.tsv"
    assert a["mixing"] == b["mixing"] and a["label_counts"] == b["label_counts"]
    assert "B" not in a["label_counts"] and a["accuracy"] == b["accuracy"]
    left, right = ad.read_h5ad(tmp_path / "l.h5ad"), ad.read_h5ad(tmp_path / "r.h5ad")
    assert left.obs["cellvec_label"].tolist() == right.obs["cellvec_label"].tolist()
    weightings = {x.uns["cellvec"]["recipe"]["weighting"] for x in (left, right)}
    assert weightings == {"softmax"}  # both answered by the atlas's cross-species view
    for column in ("cellvec_confidence", "cellvec_typicality", "cellvec_mixing"):
        np.testing.assert_allclose(left.obs[column], right.obs[column], atol=1e-5)


def test_service_reads_a_centroid_atlas_as_map_cells_does(served):
    """An atlas read by class centroids answers the same labels and scores through the
    service (the client's path and a JSON request's) as `map_cells` in this process, the
    blocklist included."""
    import numpy as np

    from cellvec.cell_index.mapping import map_cells
    from cellvec.client import Client
    from cellvec.service import create_app

    atlas = build_centroid_atlas(served)
    query = tiny_adata(n_cells=20, seed=4, prefix="q")
    local = map_cells(query, "few", store=served, exclude_labels=["M"])
    body, _ = _cells(6)
    with Server(create_app(served)) as url:
        remote = Client(url).map(query, atlas="few", exclude_labels=["M"])
        r = httpx.post(f"{url}/v1/atlases/few/map", json=body, params={"scores": "true"})
    assert list(remote.labels) == list(local.labels) and "M" not in set(local.labels)
    np.testing.assert_allclose(remote.scores, local.scores, atol=1e-6)
    # the scores are the centroids', not a vote's
    expected = centroid_scores(atlas, remote.vectors, exclude=["M"])
    np.testing.assert_allclose(remote.scores, expected, atol=1e-5)
    assert r.status_code == 200, r.text
    six = map_cells(tiny_adata(n_cells=6, seed=3, prefix="q"), "few", store=served)
    assert [c["label"] for c in r.json()["cells"]] == list(six.labels)


def test_a_view_that_fails_to_load_fails_only_the_jobs_through_orthologs(served, tmp_path):
    """Jobs batched together: one through orthologs, whose atlas's cross-species view cannot
    be loaded (a disk error, say), fails alone; the job of the atlas's own species is
    mapped. The next job through orthologs tries the view again."""
    from cellvec.cell_index.calls import MapOptions
    from cellvec.cell_index.readers import read_expression
    from cellvec.gene_store.orthologs import read_orthologs
    from cellvec.gene_store.store import GeneStore
    from cellvec.service.atlases import AtlasCache
    from cellvec.service.mapping import MapJob, map_jobs
    from cellvec.storage import store_location

    store = store_location(served)
    atlas = AtlasCache(store, GeneStore(store), None).get("tiny")
    loads = []

    def broken():
        loads.append(1)
        raise RuntimeError("disk gone")

    atlas.reference._cross = broken
    query = tiny_adata(n_cells=20, seed=13, prefix="o")
    x = read_expression(query).to_csr()
    table = tmp_path / "orth.tsv"
    table.write_text("mouse\thuman\n" + "".join(f"{g}\t{g}\n" for g in query.var_names))
    through = MapOptions(orthologs=read_orthologs(table))
    own = MapJob(query.var_names, x, list(query.obs_names))
    other = MapJob(query.var_names, x, list(query.obs_names), through)
    out = map_jobs(atlas, [own, other])
    assert isinstance(out[1], RuntimeError) and len(out[0].labels) == 20
    assert isinstance(map_jobs(atlas, [other])[0], RuntimeError) and len(loads) == 2
