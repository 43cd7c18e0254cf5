"""Content-addressed arrays (background transforms, refinement heads): one Lance table
per artifact, `_artifact_<digest>`, in the store.

An artifact is the arrays as npz bytes in a one-row table written in one commit, so
a reader never sees half of one, and it goes wherever the store goes (a local
directory or a bucket) with the store's storage options. Its digest is the hash the
recipe records. A table per artifact, not one shared table: two writers saving the
same artifact at once write the same bytes, and different artifacts never touch the
same table. (One shared table was tried: LanceDB on S3 let two concurrent creates of
a new table both succeed, the second replacing the first, and an artifact was lost.)
Stores written before kept artifacts as files in `<store>/_artifacts/<digest>.npz`;
those are still read.
"""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa

from cellvec.errors import StoreError
from cellvec.storage import Store, StoreLocation

PREFIX = "_artifact_"
# What an artifact's arrays may take decoded, per byte stored: `np.savez` stores them
# uncompressed (1), so anything far above is a zip bomb, refused before decoding.
MAX_EXPANSION = 4
DIGEST_LENGTH = 24  # hex characters of sha256 an artifact is named by (`array_hash`)
DIGEST = re.compile(f"[0-9a-f]{{{DIGEST_LENGTH}}}")
_SCHEMA = pa.schema([pa.field("digest", pa.string()), pa.field("data", pa.large_binary())])


def array_hash(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:DIGEST_LENGTH]


def _read(store: Store, digest: str) -> bytes | None:
    tbl = store.open_table(PREFIX + digest)
    if tbl is None:
        return None
    rows = tbl.to_lance().to_table(columns=["data"])
    return rows.column("data")[0].as_py() if rows.num_rows else None


def save_artifact(store: Store | str | Path | StoreLocation, arrays: dict[str, np.ndarray]) -> str:
    digest = array_hash(arrays)
    store = Store.of(store, create=True)
    if PREFIX + digest in store.table_names():
        return digest
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    row = pa.table({"digest": [digest], "data": [buf.getvalue()]}, schema=_SCHEMA)
    try:
        store.db.create_table(PREFIX + digest, row)
    except (ValueError, RuntimeError, OSError):
        if _read(store, digest) is None:
            raise
        # saved by another writer at the same moment: the same bytes
    return digest


def decode_arrays(data: bytes, where: str) -> dict[str, np.ndarray]:
    """The arrays of npz bytes `data` (artifact `where`). An artifact may come from a
    bundle, so before anything is decoded its zip and npy headers must show plain numeric
    arrays (no pickled objects, no strings) whose sizes add up to at most
    `MAX_EXPANSION` times the bytes stored, each within what its zip entry holds."""
    import zipfile

    def refuse(problem: str):
        raise StoreError(f"Artifact {where} {problem}; it was not decoded. Rebuild the atlas.")

    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = zf.infolist()
            decoded = sum(i.file_size for i in infos)
            if decoded > MAX_EXPANSION * len(data) + 2**16:
                refuse(f"decodes to {decoded:,} bytes from {len(data):,} stored (a zip bomb?)")
            for info in infos:
                with zf.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = header(f)
                if dtype.hasobject or dtype.kind not in "biuf":
                    refuse(f"holds {info.filename} of dtype {dtype}: not plain numeric arrays")
                if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize > info.file_size:
                    refuse(f"says {info.filename} is {shape} but holds {info.file_size:,} bytes")
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise StoreError(f"Artifact {where} is not plain arrays ({e}); it was not decoded.") from e


def load_artifact(store: Store | str | Path | StoreLocation, digest: str) -> dict[str, np.ndarray]:
    """The arrays saved as `digest`. An open `Store`'s connection is used, not a new one
    (on a bucket a new connection and its check cost requests)."""
    if not isinstance(digest, str) or not DIGEST.fullmatch(digest):
        # a recipe may come from a bundle: its hash names a table and, in old stores, a file
        raise StoreError(
            f"Artifact name {str(digest)[:80]!r} is not a digest ({DIGEST_LENGTH} hex "
            "characters); the atlas's recipe is damaged. Rebuild or re-export the atlas."
        )
    store = Store.of(store)
    loc = store.location
    data = _read(store, digest)
    where = f"table {PREFIX}{digest} of {loc.uri}"
    if data is None and loc.is_local:
        legacy = loc.path / "_artifacts" / f"{digest}.npz"
        if legacy.exists():
            data, where = legacy.read_bytes(), str(legacy)
    if data is None:
        raise StoreError(
            f"Artifact {digest} is missing ({where}): the atlas needs it. Rebuild the atlas "
            "with `cellvec atlas build`."
        )
    arrays = decode_arrays(data, where)
    if array_hash(arrays) != digest:
        raise StoreError(
            f"Artifact {digest} ({where}) does not match its hash (corrupted?). Rebuild the atlas."
        )
    return arrays
