"""Arrow columns as numpy arrays (numpy only at import: the CLI and the client use it)."""

from __future__ import annotations

import numpy as np


def fixed_size_rows(column) -> np.ndarray:
    """A fixed-size-list column (chunked or not; the atlas's `vector`, the service's
    `scores`) as a rows x size float32 array. `flatten`, not `.values`: a slice's own."""
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(column), column.type.list_size).astype(np.float32, copy=False)


def string_values(column) -> np.ndarray:
    """A string column (chunked or not) as an object array of str (None for nulls): Arrow
    converts it in C, twice as fast as `to_pylist` (1M cell ids: 0.07 vs 0.13 s)."""
    return column.to_numpy(zero_copy_only=False).astype(object, copy=False)
