"""Content-addressed arrays (background transforms, refinement heads) in the store's
`_artifacts` table.

An artifact is one row (`digest`, `data`: the arrays as npz bytes) appended in one
Lance commit, so a reader never sees half of one, and it goes wherever the store
goes (a local directory or a bucket) with the store's storage options. Its digest is
the hash the recipe records. Two atlas builds appending at once both land: Lance
rebases concurrent appends. Stores written before the table existed kept artifacts
as files in `<store>/_artifacts/<digest>.npz`; those are still read.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa

from cellvec.errors import StoreError
from cellvec.storage import StoreLocation, store_location

TABLE = "_artifacts"
_SCHEMA = pa.schema([pa.field("digest", pa.string()), pa.field("data", pa.large_binary())])


def array_hash(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


def _find(tbl, digest: str) -> bytes | None:
    rows = tbl.to_lance().to_table(columns=["data"], filter=f"digest = '{digest}'", limit=1)
    return rows.column("data")[0].as_py() if rows.num_rows else None


def save_artifact(store: str | Path | StoreLocation, arrays: dict[str, np.ndarray]) -> str:
    from cellvec.gene_store.store import GeneStore

    digest = array_hash(arrays)
    gs = GeneStore(store, create=True)
    tbl = gs.open_table(TABLE)
    if tbl is not None and _find(tbl, digest) is not None:
        return digest
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    row = pa.table({"digest": [digest], "data": [buf.getvalue()]}, schema=_SCHEMA)
    if tbl is None:
        try:
            gs.db.create_table(TABLE, row)
            return digest
        except ValueError as e:  # another writer created the table first: append to it
            if "already exists" not in str(e):
                raise
            tbl = gs.db.open_table(TABLE)
    tbl.add(row)
    return digest


def load_artifact(store: str | Path | StoreLocation, digest: str) -> dict[str, np.ndarray]:
    from cellvec.gene_store.store import GeneStore

    loc = store_location(store)
    tbl = GeneStore(loc).open_table(TABLE)
    data = _find(tbl, digest) if tbl is not None else None
    where = f"the {TABLE} table of {loc.uri}"
    if data is None and loc.is_local:
        legacy = loc.path / "_artifacts" / f"{digest}.npz"
        if legacy.exists():
            data, where = legacy.read_bytes(), str(legacy)
    if data is None:
        raise StoreError(
            f"Artifact {digest} is missing from {where}: the atlas needs it. Rebuild the atlas "
            "with `cellvec atlas build`."
        )
    with np.load(io.BytesIO(data)) as z:
        arrays = {k: z[k] for k in z.files}
    if array_hash(arrays) != digest:
        raise StoreError(
            f"Artifact {digest} in {where} does not match its hash (corrupted?). Rebuild the atlas."
        )
    return arrays
