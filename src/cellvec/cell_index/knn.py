"""Nearest neighbours of unit vectors by cosine similarity.

Below `EXACT_MAX` reference cells: exact (faiss IndexFlatIP, ~3x faster than a
numpy product + argpartition, same neighbours). Above: a faiss IVF-Flat index in
memory (inner product on unit vectors = cosine). Measured on clustered 128-d
vectors (200k atlas, k=15): nlist = sqrt(n) with nprobe = 64 gives recall@15
0.999-1.000 at ~0.2 ms a query; nprobe 16 only 0.83-0.96
(see benchmarks/bench_mapping.py).
Every path searches this in-memory index, built once per loaded atlas
(`Atlas.index()`): `map_cells`, the CLI and the HTTP service alike. An atlas larger
than memory is searched through a Lance index on its table instead
(`disk_index.DiskIndex`, same `search` answer), see cell_index/atlas.py.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

EXACT_MAX = 200_000


class FlatIndex:
    """Exact inner-product search (faiss IndexFlatIP: BLAS blocks and a heap top-k, bounded memory)."""

    def __init__(self, ref: np.ndarray | None, *, index=None):
        import faiss

        if index is not None:
            self.index = index
            return
        self.index = faiss.IndexFlatIP(ref.shape[1])
        self.index.add(np.ascontiguousarray(ref, dtype=np.float32))

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.index.ntotal)
        sim, idx = self.index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        return idx.astype(np.int64), sim


def without_self(
    idx: np.ndarray, sim: np.ndarray, k: int, own: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Cells searched in an index that holds them (searched for k + 1): each cell's k
    nearest others, best first, its own hit taken out. `own`: each row's own position in
    the index (-1 for a cell it does not hold); by default row i is position i."""
    own = np.arange(len(idx)) if own is None else own
    keep = idx != own[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(idx, order, 1), np.take_along_axis(sim, order, 1)


def exact_knn(query: np.ndarray, ref: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, similarities) of the k most similar rows of `ref`, best first."""
    return FlatIndex(ref).search(query, k)


def build_index(ref: np.ndarray) -> FlatIndex | IVFIndex:
    """Exact up to `EXACT_MAX` reference cells, IVF above."""
    return IVFIndex(ref) if ref.shape[0] > EXACT_MAX else FlatIndex(ref)


class IVFIndex:
    """A faiss IVF-Flat index over unit vectors (inner product)."""

    def __init__(
        self,
        ref: np.ndarray | None,
        *,
        nlist: int | None = None,
        nprobe: int = 64,
        seed: int = 0,
        index=None,
    ):
        import faiss

        if index is not None:
            self.index, self.nlist = index, index.nlist
            return
        n, d = ref.shape
        self.nlist = nlist or max(1, int(min(np.sqrt(n), n // 40)))
        quantizer = faiss.IndexFlatIP(d)
        self.index = faiss.IndexIVFFlat(quantizer, d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = ref[rng.choice(n, size=min(n, self.nlist * 40), replace=False)]
        self.index.train(np.ascontiguousarray(train, dtype=np.float32))
        self.index.add(np.ascontiguousarray(ref, dtype=np.float32))
        self.index.nprobe = min(nprobe, self.nlist)

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sim, idx = self.index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        return idx.astype(np.int64), sim


def write_index(index: FlatIndex | IVFIndex, path) -> None:
    """Write a search index to `path` (faiss format), for `read_index` to map into memory."""
    import faiss

    faiss.write_index(index.index, str(path))


def read_index(path) -> FlatIndex | IVFIndex:
    """A search index written by `write_index`, memory-mapped: processes that read the same
    file share its pages instead of holding one copy each."""
    import faiss

    flag = getattr(faiss, "IO_FLAG_MMAP_IFC", faiss.IO_FLAG_MMAP)
    raw = faiss.read_index(str(path), flag)
    if isinstance(raw, faiss.IndexIVF):
        return IVFIndex(None, index=raw)
    return FlatIndex(None, index=raw)


def knn(
    query: np.ndarray, ref: np.ndarray, k: int, *, index: FlatIndex | IVFIndex | None = None
) -> tuple[np.ndarray, np.ndarray]:
    return (index or build_index(ref)).search(query, k)


def vote(
    neigh_idx: np.ndarray,
    neigh_sim: np.ndarray,
    ref_codes: np.ndarray,
    n_classes: int,
    class_sizes: np.ndarray | None = None,
) -> np.ndarray:
    """Distance-weighted class scores (rows sum to 1): weight = 1 / (cosine distance + 0.01).
    With `class_sizes` (reference cells per class), a class of fewer cells than the k
    neighbours counts its votes k / its cells times: it could never fill the vote."""
    valid = neigh_idx >= 0
    w = np.where(valid, 1.0 / (1.0 - np.clip(neigh_sim, -1, 1) + 0.01), 0.0)
    scores = np.zeros((len(neigh_idx), n_classes), dtype=np.float64)
    rows = np.repeat(np.arange(len(neigh_idx)), neigh_idx.shape[1])
    np.add.at(scores, (rows, ref_codes[np.where(valid, neigh_idx, 0)].ravel()), w.ravel())
    if class_sizes is not None:
        k = neigh_idx.shape[1]
        scores *= k / np.clip(np.minimum(class_sizes, k), 1, None)
    total = scores.sum(1, keepdims=True)
    return scores / np.where(total > 0, total, 1)
