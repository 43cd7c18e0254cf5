"""Attacks on `cellvec serve`, each as a red-team session sent it: uploads that point the
server at its own files, bombs that decode past any limit, bodies that crashed a parser,
and error answers in a shape other than `{"error": ...}`. Each test fails when its fix is
reverted; the server must stay up and log no traceback."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import anndata as ad
import h5py
import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import scipy.sparse as sp

from helpers import SPARSE_DAMAGE, replace_dataset, request_cells, tiny_adata
from servers import Server

ARROW = "application/vnd.apache.arrow.stream"
SECRET = "root:x:0:0:secret-line-of-the-server"


@pytest.fixture
def client(served, caplog):
    """A client of a real server on loopback; after the test, no error was logged."""
    from cellvec.service import create_app

    caplog.set_level(logging.ERROR, logger="cellvec")
    with Server(create_app(served)) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c
        assert c.get("/healthz").status_code == 200  # still up
    tracebacks = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


def _h5ad_bytes(adata, edit=None) -> bytes:
    """The file anndata writes, then changed by `edit(h5py.File)` as an attacker would."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "q.h5ad"
        adata.write_h5ad(path)
        if edit is not None:
            with h5py.File(path, "r+") as f:
                edit(f)
        return path.read_bytes()


def _upload(client, data: bytes, atlas: str = "tiny"):
    return client.post(f"/v1/atlases/{atlas}/map", files={"file": ("q.h5ad", data)})


def _refused(r, *words):
    assert r.status_code == 422, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    message = r.json()["error"]
    assert all(w in message for w in words), message
    assert SECRET not in r.text
    return message


@pytest.fixture
def secret_file(tmp_path):
    """A file of the server's that no client may read (stands in for /etc/passwd)."""
    path = tmp_path / "passwd"
    path.write_text((SECRET + "\n") * 64)
    return path


def test_an_upload_whose_obs_index_is_stored_in_a_server_file_is_refused(client, secret_file):
    def external(f):
        del f["obs/_index"]
        f["obs"].create_dataset(
            "_index", shape=(5,), dtype="S32", external=[(str(secret_file), 0, 160)]
        )

    r = _upload(client, _h5ad_bytes(tiny_adata(n_cells=5, prefix="q"), external))
    _refused(r, "obs/_index", "external files")


def _loop(f):
    f["uns"]["again"] = f["uns"]  # a hard link back up: a walk that followed it never ends


def _vlen_grid(f):
    f["uns"].create_dataset("grid", (2, 2), dtype=h5py.string_dtype())


def _vlen_array_field(f):
    kind = np.dtype([("names", h5py.string_dtype(), (2,))])
    f["uns"].create_dataset("rec", (3,), dtype=kind)


def _vlen_in_array(f):
    f["uns"].create_dataset("arr", (3,), dtype=np.dtype((h5py.string_dtype(), (2,))))


@pytest.mark.parametrize(
    "edit, words",
    [
        (_loop, ("/uns/again links a group that appears elsewhere",)),
        (_vlen_grid, ("/uns/grid holds variable-length values in 2 dimensions",)),
        (_vlen_array_field, ("/uns/rec holds variable-length values nested in field 'names'",)),
        (_vlen_in_array, ("/uns/arr holds variable-length values inside arrays",)),
    ],
)
def test_an_upload_shaped_as_anndata_never_writes_is_refused(client, edit, words):
    """What is not counted is not read: shapes of HDF5 data anndata never writes."""
    _refused(_upload(client, _h5ad_bytes(tiny_adata(n_cells=5, prefix="q"), edit)), *words)


def test_an_upload_of_too_many_hdf5_objects_is_refused(client, monkeypatch):
    import cellvec.untrusted as untrusted

    monkeypatch.setattr(untrusted, "MAX_HDF5_OBJECTS", 10)  # a tiny h5ad holds dozens
    r = _upload(client, _h5ad_bytes(tiny_adata(n_cells=5, prefix="q")))
    _refused(r, "has more than 10 HDF5 objects")


def test_an_upload_whose_x_is_an_external_link_is_refused(client, tmp_path):
    other = tmp_path / "other.h5ad"
    tiny_adata(n_cells=5, prefix="o").write_h5ad(other)

    def link(f):
        del f["X"]
        f["X"] = h5py.ExternalLink(str(other), "/X")

    r = _upload(client, _h5ad_bytes(tiny_adata(n_cells=5, prefix="q"), link))
    _refused(r, "/X", "external link")


def test_an_upload_with_a_virtual_dataset_or_a_soft_link_is_refused(client, secret_file):
    def virtual(f):
        layout = h5py.VirtualLayout(shape=(5,), dtype="S32")
        layout[:] = h5py.VirtualSource(str(secret_file), "data", shape=(5,))
        del f["obs/_index"]
        f["obs"].create_virtual_dataset("_index", layout)

    def soft(f):
        f["obs/alias"] = h5py.SoftLink("/obs/_index")

    q = tiny_adata(n_cells=5, prefix="q")
    _refused(_upload(client, _h5ad_bytes(q, virtual)), "virtual dataset")
    _refused(_upload(client, _h5ad_bytes(q, soft)), "soft link")


def test_an_upload_of_more_cells_than_a_request_may_hold_is_refused(client):
    from cellvec.service.schemas import MAX_CELLS_PER_REQUEST

    n = MAX_CELLS_PER_REQUEST + 1
    genes = tiny_adata(n_cells=3).var_names
    x = sp.csr_matrix((np.ones(n, np.float32), (np.arange(n), np.zeros(n, int))), (n, len(genes)))
    big = ad.AnnData(x, obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    big.var_names = genes
    _refused(_upload(client, _h5ad_bytes(big)), f"{n:,} cells", "split")


def test_a_gzip_bomb_upload_is_refused_before_it_is_decoded(client, monkeypatch):
    import cellvec.untrusted as untrusted

    monkeypatch.setattr(untrusted, "MAX_DECODED_BYTES", 4 * 2**20)
    genes = tiny_adata(n_cells=3).var_names

    def dense_zeros(f):  # 2,000 cells x 30 genes x 2,000 columns of float32 zeros: 16 MB
        del f["X"]
        f.create_dataset("X", shape=(2000, 2000), dtype="f4", compression="gzip", fillvalue=0)

    q = ad.AnnData(sp.csr_matrix((2000, len(genes)), dtype=np.float32))
    q.var_names = genes
    data = _h5ad_bytes(q, dense_zeros)
    assert len(data) < 200_000
    _refused(_upload(client, data), "MiB", "split")


def test_variable_length_strings_count_by_their_text_not_their_pointers(client, monkeypatch):
    """Strings live in the file's heap, where a crafted file can point many elements at
    one large object: counted at their 16-byte pointers they passed any budget."""
    import cellvec.untrusted as untrusted

    monkeypatch.setattr(untrusted, "MAX_DECODED_BYTES", 4 * 2**20)

    def long_names(f):  # 5,000 names of 1 KB: 80 KB of pointers, 5 MB of text
        f["uns"].create_dataset("names", data=["x" * 1024] * 5000, dtype=h5py.string_dtype())

    _refused(_upload(client, _h5ad_bytes(tiny_adata(n_cells=5, prefix="q"), long_names)), "MiB")


def _arrow_stream(table: pa.Table, compression=None) -> bytes:
    sink = pa.BufferOutputStream()
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.ipc.new_stream(sink, table.schema, options=options) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()


def test_a_compressed_arrow_bomb_is_refused_from_its_metadata(client, monkeypatch):
    import cellvec.untrusted as untrusted

    monkeypatch.setattr(untrusted, "MAX_DECODED_BYTES", 4 * 2**20)
    n = 1_000_000  # rows of one cell, one gene: 9 MB decoded, a few KB sent
    table = pa.table(
        {
            "cell_id": pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), ["c0"]),
            "gene": pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), ["TGENE0"]),
            "value": np.ones(n, np.float32),
        }
    )
    body = _arrow_stream(table, "zstd")
    assert len(body) < 100_000
    r = client.post("/v1/atlases/tiny/map", content=body, headers={"content-type": ARROW})
    _refused(r, "decodes to more than", "split")


def test_arrow_columns_that_expand_when_read_are_refused(client):
    """A dictionary of one 1 MB cell id indexed 300 times (1.5 KB with zstd) became
    300 MB when cast to plain strings; string views repeat their data the same way."""
    n = 300
    big = "c" * 1_000_000
    dictionary = pa.table(
        {
            "cell_id": pa.DictionaryArray.from_arrays(np.zeros(n, np.int32), [big]),
            "gene": pa.array(["TGENE0"] * n),
            "value": np.ones(n, np.float32),
        }
    )
    body = _arrow_stream(dictionary, "zstd")
    assert len(body) < 20_000
    r = client.post("/v1/atlases/tiny/map", content=body, headers={"content-type": ARROW})
    assert r.status_code == 200, r.text  # read as a dictionary: one cell, never expanded
    assert [c["id"] for c in r.json()["cells"]] == [big]
    view = np.zeros((n, 4), np.int32)  # n views of the same 1 MB: length, prefix, buffer 0
    view[:, 0], view[:, 1] = len(big), np.frombuffer(big[:4].encode(), np.int32)[0]
    ids = pa.Array.from_buffers(
        pa.string_view(), n, [None, pa.py_buffer(view.tobytes()), pa.py_buffer(big.encode())]
    )
    body = _arrow_stream(dictionary.set_column(0, "cell_id", ids), "zstd")
    assert len(body) < 20_000
    r = client.post("/v1/atlases/tiny/map", content=body, headers={"content-type": ARROW})
    _refused(r, "cell_id is string_view", "send string or dictionary<string>")


def test_an_upload_with_an_empty_dataspace_is_read_not_a_500(client):
    def empty(f):
        f["uns"].create_dataset("nothing", data=h5py.Empty("f4"))

    r = _upload(client, _h5ad_bytes(tiny_adata(n_cells=5, prefix="q"), empty))
    assert r.status_code in (200, 422), r.text
    assert r.headers["content-type"].startswith("application/json")


def test_an_arrow_gene_index_out_of_its_dictionary_is_422(client):
    gene = pa.DictionaryArray.from_arrays(
        pa.array([0, 7], pa.int32()), pa.array(["TGENE0", "TGENE1"]), safe=False
    )
    table = pa.table({"cell_id": ["c0", "c0"], "gene": gene, "value": [3.0, 4.0]})
    r = client.post(
        "/v1/atlases/tiny/map", content=_arrow_stream(table), headers={"content-type": ARROW}
    )
    _refused(r, "not a valid Arrow IPC stream")


def test_values_whose_total_overflows_float32_are_refused(client):
    body, _ = request_cells(1)
    body["cells"][0].update(indices=[0, 1], values=[3e38, 3e38])
    r = client.post("/v1/atlases/tiny/map", json=body)
    _refused(r, "3.4e38")


def test_every_error_is_json_with_an_error_key(client):
    checks = [
        client.get("/no/such/route"),
        client.delete("/v1/atlases"),
        client.post(
            "/v1/atlases/tiny/map",
            content=b"--x\r\nnot a part",
            headers={"content-type": "multipart/form-data; boundary=zz"},
        ),
        client.post("/v1/atlases/tiny/map_h5ad"),
    ]
    for r in checks:
        assert 400 <= r.status_code < 500, r.text
        assert r.headers["content-type"].startswith("application/json"), r.text
        assert list(r.json()) == ["error"], r.text


def test_an_atlas_name_no_atlas_can_have_is_a_404_without_a_store_look_up(client, monkeypatch):
    """Each look-up of such a name took ~2 s, stalling other requests: none is made now
    (counted, not timed: the server runs in this process)."""
    from cellvec.storage import Store

    looked_up = []
    real = Store.open_table
    monkeypatch.setattr(Store, "open_table", lambda self, n: looked_up.append(n) or real(self, n))
    body, _ = request_cells(1)
    assert client.post("/v1/atlases/nosuch/map", json=body).status_code == 404
    assert "atlas_nosuch" in looked_up  # a name an atlas could have is looked up
    names = ("a" * 260, "x" * 1000, "a.b", "..%2F..%2Fetc", "tiny__species")
    for name in names:
        r = client.post(f"/v1/atlases/{name}/map", json=body)
        assert r.status_code == 404 and r.json()["error"], r.text
        assert "%2F" in name or "tiny" in r.json()["error"]  # the atlases there are
    assert not [n for n in looked_up if any(name in n for name in names)], looked_up


@pytest.mark.parametrize("damage", SPARSE_DAMAGE)
def test_an_upload_whose_sparse_structure_points_outside_its_matrix_is_refused(client, damage):
    """scipy took the file's indices unchecked: an index of 10**6 crashed the server
    (segmentation fault), one of -5 answered 200 with values read from memory outside
    the matrix, a backward index pointer was a 500."""
    data = _h5ad_bytes(tiny_adata(n_cells=6, prefix="q"), SPARSE_DAMAGE[damage])
    _refused(_upload(client, data), "The uploaded file: the sparse expression matrix is malformed")


def test_an_upload_of_values_that_are_not_numbers_is_refused(client):
    def text(f):
        replace_dataset(f, "X", np.arange(6 * 30).reshape(6, 30).astype("S8"))

    _refused(_upload(client, _h5ad_bytes(tiny_adata(n_cells=6, prefix="q"), text)), "not real")


def test_a_chunk_declared_far_larger_than_its_data_counts_in_full(client, monkeypatch):
    """HDF5 decodes whole chunks: 89 values in one gzip chunk of 2^21 float32 (8 MiB)
    were counted as 356 bytes, and a chunk of 2^30 as well."""
    import cellvec.untrusted as untrusted

    monkeypatch.setattr(untrusted, "MAX_DECODED_BYTES", 4 * 2**20)

    def one_big_chunk(f):
        data = f["X/data"][:]
        del f["X/data"]
        f["X"].create_dataset(
            "data", data=data, maxshape=(None,), chunks=(2**21,), compression="gzip"
        )

    data = _h5ad_bytes(tiny_adata(n_cells=6, prefix="q"), one_big_chunk)
    assert len(data) < 200_000
    _refused(_upload(client, data), "MiB", "/X/data")


def test_strings_inside_records_count_by_their_text(client, monkeypatch):
    """anndata writes rec-arrays (scanpy's rank_genes_groups) as records with string
    fields: counted at the record's size, many records pointing at one large string
    decoded to gigabytes. Here 5,000 records of 1 KB strings each (a 5 MB upload) pass
    a 4 MiB budget only when each string is counted at its record's few bytes."""
    import cellvec.untrusted as untrusted

    monkeypatch.setattr(untrusted, "MAX_DECODED_BYTES", 4 * 2**20)
    kind = np.dtype([("names", h5py.string_dtype()), ("scores", "<f4")])

    def records(n: int):
        def edit(f):  # n records of 1 KB names
            values = np.array([("x" * 1024, 0.0)] * n, dtype=kind)
            rank = f["uns"].create_dataset("rank", data=values)
            rank.attrs["encoding-type"], rank.attrs["encoding-version"] = "rec-array", "0.2.0"

        return edit

    q = tiny_adata(n_cells=5, prefix="q")
    _refused(_upload(client, _h5ad_bytes(q, records(5000))), "MiB", "/uns/rank")
    assert _upload(client, _h5ad_bytes(q, records(50))).status_code == 200


def test_a_corrupt_gzip_ortholog_table_is_a_422(client):
    r = client.post(
        "/v1/atlases/tiny/map_h5ad",
        files={
            "file": ("q.h5ad", _h5ad_bytes(tiny_adata(n_cells=5, prefix="q"))),
            "orthologs": ("o.csv.gz", b"\x1f\x8b\x08\x00" + b"\0" * 20),
        },
    )
    _refused(r, "not valid gzip")


def test_no_error_names_the_server_s_store(client, served):
    """The gene routes' errors named the store's directory (and the command to build
    it there)."""
    where = (str(served), str(Path(served).resolve()))
    checks = [
        client.get("/v1/genes/search", params={"q": "x", "model": "nope"}),
        client.get("/v1/genes/NOSUCHGENE/neighbors"),
    ]
    for r in checks:
        assert 400 <= r.status_code < 500, r.text
        assert not any(w in r.text for w in where), r.text
        assert "<store>" in r.json()["error"], r.text


def test_uploads_are_read_a_few_at_a_time(client, monkeypatch):
    """Each upload may decode to the whole budget: a burst of them was read all at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import cellvec.service.mapping as mapping
    from cellvec.service.map_routes import UPLOAD_SLOTS

    reading, most, lock = [0], [0], threading.Lock()
    full = threading.Event()  # as many reads at once as there are slots: reached for sure
    read = mapping.job_from_h5ad

    def slow_read(data, **options):
        with lock:
            reading[0] += 1
            most[0] = max(most[0], reading[0])
            if reading[0] >= UPLOAD_SLOTS:
                full.set()
        full.wait(10)
        time.sleep(0.3)  # room for more to pile up, were the slots not kept
        try:
            return read(data, **options)
        finally:
            with lock:
                reading[0] -= 1

    monkeypatch.setattr(mapping, "job_from_h5ad", slow_read)
    data = _h5ad_bytes(tiny_adata(n_cells=5, prefix="q"))
    with ThreadPoolExecutor(6) as pool:
        codes = [r.status_code for r in pool.map(lambda _: _upload(client, data), range(6))]
    assert codes == [200] * 6
    assert most[0] == UPLOAD_SLOTS  # all slots used, never more (6 were sent at once)
