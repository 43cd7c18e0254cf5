"""Opening what a client sends: sizes budgeted before decoding, nothing that points elsewhere.

An HTTP upload (and, later, a bundle fetched from elsewhere) is untrusted. Two formats
can make a small body do large or far-reaching work:

- HDF5 (`.h5ad`): a dataset may keep its bytes in *external storage* (any file on the
  server, e.g. /etc/passwd), a link may be an *external link* to another file, a
  *virtual dataset* maps other files, and a 1 MB gzip-compressed dataset may decode to
  gigabytes. `check_hdf5` walks every link without following it and refuses all of
  these before anndata reads a byte.
- Arrow IPC streams: a compressed (zstd, lz4) record batch of a few KB may decode to
  millions of rows. `check_arrow_stream` reads each message's own record of its buffer
  sizes (the flatbuffer metadata, and the uncompressed length that prefixes every
  compressed buffer) and adds them up before anything is decompressed.

Both raise `cellvec.errors.UntrustedInputError` (the service answers 422).
"""

from __future__ import annotations

import math
import struct

from cellvec.errors import UntrustedInputError

# What one request may decode to, whatever its format: 4x the default body limit (64 MiB).
MAX_DECODED_BYTES = 256 * 1024 * 1024
MAX_HDF5_OBJECTS = 100_000  # links walked in one file (an AnnData has a few hundred)


def check_hdf5(path, *, where: str = "the upload") -> None:
    """Refuse an HDF5 file with external storage, external or soft links, virtual datasets,
    or datasets that decode past `MAX_DECODED_BYTES` (counted per link, so a dataset
    linked twice counts twice, as a reader would read it twice). Nothing is followed and
    no dataset is read."""
    import h5py

    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as e:
        raise UntrustedInputError(
            f"{where} is not an HDF5 file ({e}); send an .h5ad written by anndata."
        ) from e
    with f:
        total, seen = 0, 0
        groups = {_address(f)}
        stack = [("", f)]
        while stack:
            path, group = stack.pop()
            for name in group:
                seen += 1
                if seen > MAX_HDF5_OBJECTS:
                    raise UntrustedInputError(
                        f"{where} has more than {MAX_HDF5_OBJECTS:,} HDF5 objects; an .h5ad has "
                        "a few hundred. Write it with anndata."
                    )
                full = f"{path}/{name}"
                kind = group.id.links.get_info(name.encode()).type
                if kind != h5py.h5l.TYPE_HARD:
                    what = {
                        h5py.h5l.TYPE_SOFT: "a soft link",
                        h5py.h5l.TYPE_EXTERNAL: "an external link",
                    }
                    raise UntrustedInputError(
                        f"{where}: {full} is {what.get(kind, 'a user-defined link')}; links are "
                        "not followed in uploaded files. Write the data into the file itself "
                        "(anndata's write_h5ad does)."
                    )
                obj = group[name]
                if isinstance(obj, h5py.Group):
                    address = _address(obj)
                    if address in groups:
                        raise UntrustedInputError(
                            f"{where}: {full} links a group that appears elsewhere in the file; "
                            "write the file with anndata."
                        )
                    groups.add(address)
                    stack.append((full, obj))
                elif isinstance(obj, h5py.Dataset):
                    total += _dataset_bytes(obj, full, where)
                    if total > MAX_DECODED_BYTES:
                        raise UntrustedInputError(
                            f"{where} decodes to more than {MAX_DECODED_BYTES / 2**20:,.0f} MiB "
                            f"(counted up to {full}); split the cells over several requests."
                        )


def _address(obj) -> bytes:
    import h5py

    info = h5py.h5o.get_info(obj.id)
    return bytes(info.token) if hasattr(info, "token") else info.addr.to_bytes(8, "little")


def _dataset_bytes(dset, full: str, where: str) -> int:
    import h5py

    plist = dset.id.get_create_plist()
    if plist.get_external_count() > 0:
        raise UntrustedInputError(
            f"{where}: dataset {full} keeps its values in external files; uploaded files must "
            "hold their own data. Write it with anndata."
        )
    if plist.get_layout() == h5py.h5d.VIRTUAL:
        raise UntrustedInputError(
            f"{where}: dataset {full} is a virtual dataset mapping other files; uploaded "
            "files must hold their own data. Write it with anndata."
        )
    stored = _stored_bytes(dset)
    vlen = _vlen_fields(dset.dtype, full, where)
    if vlen:
        return stored + _vlen_bytes(dset, vlen, full, where)
    return stored


def _stored_bytes(dset) -> int:
    """Bytes a read of the whole dataset decodes. A chunked dataset is decoded chunk by
    whole chunk, and a chunk may be declared far larger than the data (a dataset of 89
    values in one chunk of 2^27): every chunk the extent touches counts in full."""
    if dset.shape is None:  # h5py.Empty: no data
        return 0
    itemsize = int(dset.dtype.itemsize)
    if dset.chunks is None or dset.size == 0:
        return int(dset.size) * itemsize
    n_chunks = 1
    for extent, chunk in zip(dset.shape, dset.chunks):
        n_chunks *= -(-extent // chunk)
    return max(int(dset.size), n_chunks * math.prod(dset.chunks)) * itemsize


def _vlen_fields(dtype, full: str, where: str) -> list[str | None]:
    """The variable-length parts of a dataset's elements: [None] for a variable-length
    element (anndata's strings), the names of a record's variable-length fields (anndata's
    rec-arrays, e.g. scanpy's rank_genes_groups), [] for fixed-size elements. Anything
    deeper (a record in a record, an array of strings in a field) is refused: anndata
    writes none, and what is not counted is not read."""
    import h5py

    if h5py.check_vlen_dtype(dtype) is not None:
        return [None]
    if dtype.fields is None:
        if _holds_vlen(dtype):
            raise UntrustedInputError(
                f"{where}: dataset {full} holds variable-length values inside arrays; "
                "anndata does not write such data. Write the file with anndata."
            )
        return []
    names = []
    for name, (field, *_) in dtype.fields.items():
        if h5py.check_vlen_dtype(field) is not None:
            names.append(name)
        elif _holds_vlen(field):
            raise UntrustedInputError(
                f"{where}: dataset {full} holds variable-length values nested in field "
                f"{name!r}; anndata writes them only as 1-D arrays or record fields. Write "
                "the file with anndata."
            )
    return names


def _holds_vlen(dtype) -> bool:
    """Whether a variable-length type is anywhere inside `dtype`."""
    import h5py

    if h5py.check_vlen_dtype(dtype) is not None:
        return True
    if dtype.subdtype is not None:
        return _holds_vlen(dtype.subdtype[0])
    return any(_holds_vlen(f[0]) for f in (dtype.fields or {}).values())


def _vlen_bytes(dset, fields: list[str | None], full: str, where: str) -> int:
    """Bytes of the variable-length values of a dataset (`fields`: `_vlen_fields`), read a
    few elements at a time. Their values lie in the file's heap, and many elements may
    point at one large heap object, each read as a copy: so at most `MAX_DECODED_BYTES //
    (file size x fields)` elements a read (none larger than the file), and reading stops
    past the budget."""
    if dset.ndim != 1:
        raise UntrustedInputError(
            f"{where}: dataset {full} holds variable-length values in {dset.ndim} dimensions; "
            "anndata writes them as 1-D arrays. Write the file with anndata."
        )
    per_element = max(1, dset.file.id.get_filesize()) * len(fields)
    step = max(1, MAX_DECODED_BYTES // per_element)
    total = 0
    for start in range(0, dset.shape[0], step):
        block = dset[start : start + step]
        for name in fields:
            for value in block if name is None else block[name]:
                total += len(value) if isinstance(value, (bytes, str)) else value.nbytes
        if total > MAX_DECODED_BYTES:
            break
    return total


# Arrow IPC: the few fields of the flatbuffer `Message` that give a batch's decoded size.
_RECORD_BATCH, _DICTIONARY_BATCH = 3, 2


def check_arrow_stream(body: bytes) -> None:
    """Add up the decoded bytes of an Arrow IPC stream from each message's metadata (and,
    for a compressed buffer, the uncompressed length it starts with), before decoding
    anything; `UntrustedInputError` past `MAX_DECODED_BYTES`, and for a stream whose
    metadata cannot be read (what cannot be measured is not decoded). The reader must
    still refuse types that expand when converted (views, dictionaries cast to strings)."""
    import pyarrow as pa

    total = 0
    try:
        for message in pa.ipc.MessageReader.open_stream(pa.py_buffer(body)):
            meta = message.metadata.to_pybytes()
            batch = _batch_table(meta)
            if batch is None:
                continue
            total += _batch_bytes(meta, batch, message.body)
            if total > MAX_DECODED_BYTES:
                raise UntrustedInputError(
                    f"The Arrow body decodes to more than {MAX_DECODED_BYTES / 2**20:,.0f} MiB; "
                    "split the cells over several requests."
                )
    except (pa.ArrowException, OSError, ValueError, IndexError, struct.error) as e:
        raise UntrustedInputError(
            f"The body is not an Arrow IPC stream ({type(e).__name__}: {e}); send a stream "
            "written by pyarrow.ipc.new_stream."
        ) from e


def _table(buf: bytes, pos: int) -> tuple[int, int, int]:
    """(table position, its vtable position, the vtable's length) of a flatbuffer table."""
    vtable = pos - struct.unpack_from("<i", buf, pos)[0]
    return pos, vtable, struct.unpack_from("<H", buf, vtable)[0]


def _field(buf: bytes, table: tuple[int, int, int], i: int) -> int | None:
    """Position of field `i` of a table, or None when absent (its default)."""
    pos, vtable, size = table
    if 4 + 2 * i >= size:
        return None
    off = struct.unpack_from("<H", buf, vtable + 4 + 2 * i)[0]
    return pos + off if off else None


def _deref(buf: bytes, at: int) -> int:
    return at + struct.unpack_from("<I", buf, at)[0]


def _batch_table(meta: bytes):
    """The `RecordBatch` table of a record-batch or dictionary message, else None."""
    message = _table(meta, struct.unpack_from("<I", meta, 0)[0])
    kind_at, header_at = _field(meta, message, 1), _field(meta, message, 2)
    if kind_at is None or header_at is None:
        return None
    kind = meta[kind_at]
    header = _table(meta, _deref(meta, header_at))
    if kind == _RECORD_BATCH:
        return header
    if kind == _DICTIONARY_BATCH:
        data_at = _field(meta, header, 1)
        return None if data_at is None else _table(meta, _deref(meta, data_at))
    return None


def _batch_bytes(meta: bytes, batch, body) -> int:
    import numpy as np

    buffers_at = _field(meta, batch, 2)
    if buffers_at is None:
        return 0
    vec = _deref(meta, buffers_at)
    n = struct.unpack_from("<I", meta, vec)[0]
    # the Buffer structs: (offset, length) int64 pairs; a ValueError when out of bounds
    offset, length = np.frombuffer(meta, "<i8", 2 * n, vec + 4).reshape(n, 2).T
    if _field(meta, batch, 3) is None or body is None:  # not compressed
        return int(np.maximum(length, 0).sum())
    # each compressed buffer starts with its uncompressed length (-1: stored as is)
    data = np.frombuffer(body, np.uint8)
    has = length >= 8
    at = offset[has, None] + np.arange(8)
    if at.size and (at.min() < 0 or at.max() >= len(data)):
        raise IndexError("a buffer lies outside the message body")
    decoded = data[at].copy().view("<i8").ravel()
    decoded = np.where(decoded == -1, length[has] - 8, np.maximum(decoded, 0))
    return int(np.maximum(length[~has], 0).sum() + decoded.sum())
