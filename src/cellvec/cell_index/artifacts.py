"""Content-addressed arrays (background transforms, refinement heads) in `<store>/_artifacts/`.

An artifact is written to a temporary file and renamed into place, so a reader
never sees half of one; its name is the hash the recipe records.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np

from cellvec.errors import StoreError


def array_hash(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


def save_artifact(store: str | Path, arrays: dict[str, np.ndarray]) -> str:
    digest = array_hash(arrays)
    folder = Path(store) / "_artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{digest}.npz"
    if not final.exists():
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        tmp = folder / f".{digest}.{os.getpid()}.tmp"
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, final)
    return digest


def load_artifact(store: str | Path, digest: str) -> dict[str, np.ndarray]:
    path = Path(store) / "_artifacts" / f"{digest}.npz"
    if not path.exists():
        raise StoreError(
            f"{path} is missing: the atlas needs it. Rebuild the atlas with `cellvec atlas build`."
        )
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    if array_hash(arrays) != digest:
        raise StoreError(f"{path} does not match its hash (corrupted?). Rebuild the atlas.")
    return arrays
