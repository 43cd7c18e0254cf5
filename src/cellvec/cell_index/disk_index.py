"""Disk-resident search for atlases larger than memory: a Lance vector index on the atlas table.

An atlas is searched in memory with faiss (`knn.py`) while its vectors fit a memory
budget; above it (or with `atlas build --index disk`) it is searched through a Lance
IVF_PQ index stored next to the atlas table, and only the label codes and the
typicality calibration (4 + 4 bytes a cell) are held in memory. Each query probes
`nprobes` IVF partitions, ranks their cells by PQ codes, then re-ranks the best
`k * refine_factor` by their full stored vectors (exact cosine), so the neighbours'
similarities, which the vote and typicality use, are exact.

The IVF centroids and the PQ codebook are trained here (`train_quantizers`: faiss
k-means with a fixed seed on a seeded sample), then handed to Lance. Lance's own k-means
starts from an unseeded draw on an unseeded sample, and lance-ray trains IVF on
`sample_rate` rows a centroid with a rate capped by PQ's 256 centroids (4 a partition,
140 rows, for 1,200 cells): every build was another index, and the tests' 1,200-cell
atlas gave recall@15 0.995-1.000 over 20 lance-ray builds (0.989 once in CI). Seeded, a
rebuild is the same index, here or on Ray workers (0.998 on every one of 20 builds;
0.998-1.000 over seeds 0-39: `python
benchmarks/disk_index_seed_spread.py --seeds 40`).

Parameters (`choose_params`) were chosen on real cell vectors (refined 128-d atlases
of pbmc_3chem, pbmc3k, pbmc68k_reduced and amacrine) and on 1M vectors drawn around
their class centroids with each class's own covariance (benchmarks/bench_large_atlas.py);
random vectors are PQ's worst case and would have asked for far more than real ones
need. See `choose_params` for the figures behind each value (measured with Lance's own
training; on the tests' atlas the seeded training's PQ alone found 0.88-0.89 of the
neighbours where Lance's found 0.87).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from cellvec._arrow import fixed_size_rows
from cellvec.errors import CellvecError, StoreError

log = logging.getLogger(__name__)

INDEX_KINDS = ("auto", "memory", "disk")
INDEX_NAME = "vector_idx"
# What an atlas searched in memory may take before `--index auto` puts it on disk:
# 4 GiB, or CELLVEC_ATLAS_MEMORY_BUDGET (bytes; K, M, G suffixes).
DEFAULT_MEMORY_BUDGET = 4 * 2**30
MIN_DISK_CELLS = 256  # IVF_PQ trains 256 PQ centroids per sub-vector: fewer cells cannot


def memory_budget() -> int:
    """The memory budget of an in-memory atlas, in bytes (see `DEFAULT_MEMORY_BUDGET`)."""
    raw = os.environ.get("CELLVEC_ATLAS_MEMORY_BUDGET", "").strip().upper()
    if not raw:
        return DEFAULT_MEMORY_BUDGET
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(raw[-1], 1)
    try:
        return int(float(raw.rstrip("KMGTB") if scale > 1 else raw) * scale)
    except ValueError as e:
        raise CellvecError(
            f"CELLVEC_ATLAS_MEMORY_BUDGET={raw!r}: give bytes, e.g. 4000000000 or 4G."
        ) from e


def memory_estimate(n_cells: int, dim: int) -> int:
    """Bytes an atlas takes when searched in memory: its vectors, faiss's copy of them
    (IVF-Flat stores every vector), and cell ids, labels and batches as Python strings
    (~200 bytes a cell, measured on the atlases of ../shared/data)."""
    return int(n_cells) * (2 * 4 * int(dim) + 200)


def choose_kind(kind: str, n_cells: int, dim: int) -> str:
    """'memory' or 'disk' for an atlas of `n_cells` vectors of `dim`; `kind` 'auto' puts it
    on disk when `memory_estimate` is above `memory_budget()`."""
    if kind not in INDEX_KINDS:
        raise CellvecError(f"Index {kind!r}: choose one of {', '.join(INDEX_KINDS)}.")
    if kind == "auto":
        kind = "disk" if memory_estimate(n_cells, dim) > memory_budget() else "memory"
    if kind == "disk" and n_cells < MIN_DISK_CELLS:
        raise CellvecError(
            f"An atlas of {n_cells:,} cells is too small for a disk index (IVF_PQ needs "
            f"{MIN_DISK_CELLS:,} cells or more to train); build it with --index memory."
        )
    return kind


@dataclass(frozen=True)
class DiskIndexParams:
    """How the Lance index of a disk atlas is built and searched (recorded in the atlas)."""

    index_type: str
    num_partitions: int
    num_sub_vectors: int
    nprobes: int
    refine_factor: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DiskIndexParams:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


def choose_params(n_cells: int, dim: int) -> DiskIndexParams:
    """IVF_PQ parameters for `n_cells` unit vectors of `dim`.

    - partitions: sqrt(n) (Lance's and faiss's rule of thumb), at most 4,096, so that IVF
      training (k-means on 256 cells a partition) and the assignment pass stay affordable
      on a few cores; 20M cells then have ~4,900 cells a partition.
    - sub-vectors: dim / 4 (32 bytes a cell for 128-d). PQ ranks the probed cells and
      only the best k x refine_factor are re-ranked exactly, so PQ must put the true
      neighbours among them: on the real atlases PQ alone found 0.70 of the 15 nearest
      with 16 sub-vectors and 0.83 with 32; on 1M cells drawn around pbmc3k's classes,
      with refine 10 and nprobes 5%, recall@15 was 0.85 with 16 and 0.994 with 32.
    - nprobes: 5% of the partitions, at least 8 (1M cells: 1% gave 0.92, 2.5% 0.989,
      5% 0.994, 10% 0.995 with refine 10).
    - refine_factor: 10 (150 candidates re-ranked on the stored vectors for k = 15;
      5 gave 0.968, 20 0.998 at ~30% fewer queries a second).
    Label agreement with exact KNN was 1.000 in every one of these settings at 1M cells
    and 0.993-1.000 on the real atlases.
    """
    parts = int(min(4096, max(1, round(np.sqrt(n_cells)))))
    sub = _sub_vectors(dim)
    return DiskIndexParams(
        index_type="IVF_PQ",
        num_partitions=parts,
        num_sub_vectors=sub,
        nprobes=int(min(parts, max(8, round(0.05 * parts)))),
        refine_factor=10,
    )


def _sub_vectors(dim: int) -> int:
    for width in (4, 8, 2, 16, 1):  # dimensions per sub-vector, 4 preferred
        if dim % width == 0 and dim // width >= 1:
            return dim // width
    return 1


TRAIN_SEED = 0
SAMPLE_PER_CENTROID = 256  # training vectors a centroid, Lance's own default sample rate


def train_quantizers(
    dataset, params: DiskIndexParams, *, seed: int = TRAIN_SEED
) -> tuple[np.ndarray, np.ndarray]:
    """IVF centroids (partitions x dim) and PQ codebook (sub-vectors x 256 x dim/sub-vectors)
    for the cosine IVF_PQ index of a table's `vector` column, as Lance trains them (k-means
    on the unit vectors; PQ on their residuals to the nearest centroid), but seeded: the
    sample (256 rows a centroid, all rows below that) and both k-means draw from `seed`."""
    import faiss

    n = dataset.count_rows()
    rng = np.random.default_rng(seed)
    size = SAMPLE_PER_CENTROID * max(params.num_partitions, 256)
    rows = np.sort(rng.choice(n, size, replace=False)) if size < n else np.arange(n)
    x = fixed_size_rows(dataset.take(rows, columns=["vector"]).column(0))
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = np.ascontiguousarray(x[norm[:, 0] > 0] / norm[norm[:, 0] > 0])  # Lance drops NaNs
    dim = x.shape[1]
    ivf = faiss.Kmeans(
        dim,
        params.num_partitions,
        niter=50,  # Lance's max_iters
        seed=seed,
        max_points_per_centroid=SAMPLE_PER_CENTROID,
        min_points_per_centroid=1,  # small atlases: no warning, the sample is all there is
    )
    ivf.train(x)
    pick = np.sort(rng.permutation(len(x))[: SAMPLE_PER_CENTROID * 256])
    part = ivf.index.search(x[pick], 1)[1][:, 0]
    pq = faiss.ProductQuantizer(dim, params.num_sub_vectors, 8)
    pq.cp.seed = seed
    pq.cp.min_points_per_centroid = 1
    pq.train(np.ascontiguousarray(x[pick] - ivf.centroids[part]))
    codebook = faiss.vector_to_array(pq.centroids).reshape(params.num_sub_vectors, 256, -1)
    return ivf.centroids, codebook


def build_disk_index(
    dataset,
    params: DiskIndexParams,
    *,
    ray_address: str | bool | None = None,
    storage_options: dict | None = None,
    num_workers: int = 2,
    seed: int = TRAIN_SEED,
):
    """Build the Lance vector index of an atlas table (a `lance.LanceDataset`), replacing
    any earlier one; returns the dataset at its new version. The centroids and codebook
    come from `train_quantizers(seed=seed)`, so the same table gives the same index.

    With `ray_address` (an address as `cellvec._ray` reads it, True for a local cluster;
    a process already connected to Ray uses its cluster) each of up to `num_workers` Ray
    tasks indexes a share of the table's fragments with those centroids and codebook, and
    the segments are committed once, as one index; `storage_options` (the store's,
    `StoreLocation.options()`) let the workers open the table where it lives."""
    t = time.perf_counter()
    n = dataset.count_rows()
    centroids, codebook = train_quantizers(dataset, params, seed=seed)
    options = dict(
        index_type=params.index_type,
        name=INDEX_NAME,
        replace=True,
        metric="cosine",
        num_partitions=params.num_partitions,
        num_sub_vectors=params.num_sub_vectors,
        ivf_centroids=centroids,
        pq_codebook=codebook,
    )
    if ray_address:
        from cellvec._ray import init_ray

        dataset = _index_on_ray(
            init_ray(ray_address), dataset, options, num_workers, storage_options
        )
    else:
        dataset = dataset.create_index("vector", **options)
    log.info(
        "%s index over %s atlas cells (%d partitions, %d sub-vectors) in %.1f s%s",
        params.index_type,
        f"{n:,}",
        params.num_partitions,
        params.num_sub_vectors,
        time.perf_counter() - t,
        " on Ray" if ray_address else "",
    )
    return dataset


def _index_on_ray(ray, dataset, options: dict, num_workers: int, storage: dict | None):
    """The index built by Ray tasks, each over a share of the fragments, then committed.

    What lance-ray's `create_index` does, but with the centroids and codebook given:
    lance-ray 0.5 retrains both itself (unseeded) whatever it is passed."""
    import lance

    shares = _fragment_shares(dataset, num_workers)
    shared = ray.put(options)
    task = ray.remote(_index_share)
    segments = ray.get([task.remote(dataset.uri, storage, ids, shared) for ids in shares])
    dataset = lance.dataset(dataset.uri, storage_options=storage)
    return dataset.commit_existing_index_segments(INDEX_NAME, "vector", segments)


def _index_share(uri: str, storage_options: dict | None, fragment_ids: list[int], options):
    """(On a Ray worker) the index segment over `fragment_ids`, uncommitted."""
    import lance

    dataset = lance.dataset(uri, storage_options=storage_options)
    return dataset.create_index_uncommitted("vector", fragment_ids=fragment_ids, **options)


def _fragment_shares(dataset, n: int) -> list[list[int]]:
    """The table's fragment ids in at most `n` shares of about equal rows (largest fragment
    first to the share with fewest rows), each share's ids sorted: the same split every
    time, whichever worker finishes first."""
    frags = sorted(
        ((f.count_rows(), f.fragment_id) for f in dataset.get_fragments()),
        key=lambda x: (-x[0], x[1]),
    )
    shares: list[list[int]] = [[] for _ in range(max(1, min(n, len(frags))))]
    rows = [0] * len(shares)
    for count, fid in frags:
        i = rows.index(min(rows))
        shares[i].append(fid)
        rows[i] += count
    return [sorted(s) for s in shares]


def row_starts(dataset) -> tuple[np.ndarray, np.ndarray]:
    """(fragment ids, sorted; each one's first row position in scan order); refuses a
    table with deleted rows (its row addresses would no longer match scan order)."""
    ids, starts, at = [], [], 0
    for frag in dataset.get_fragments():
        if frag.metadata.deletion_file is not None:
            raise StoreError(
                f"The atlas table {dataset.uri} has deleted rows; rebuild the atlas with "
                "`cellvec atlas build`."
            )
        ids.append(frag.fragment_id)
        starts.append(at)
        at += frag.count_rows()
    order = np.argsort(ids)
    return np.asarray(ids, dtype=np.int64)[order], np.asarray(starts, dtype=np.int64)[order]


class DiskIndex:
    """Search an atlas table through its Lance vector index; `search` answers like
    `knn.FlatIndex.search`: (row positions, cosine similarities), best first, -1 where a
    query has fewer than k neighbours."""

    def __init__(self, dataset, params: DiskIndexParams):
        self.dataset = dataset
        self.params = params
        self.ntotal = dataset.count_rows()
        self.dim = dataset.schema.field("vector").type.list_size
        self._fragments, self._starts = row_starts(dataset)
        self.indexed = any(i.name == INDEX_NAME for i in dataset.describe_indices())
        if not self.indexed:
            log.warning(
                "Atlas table %s has no vector index yet (a build that is still indexing, or "
                "one that stopped): searching it exactly, by a scan of every vector",
                dataset.uri,
            )

    def search(
        self, query: np.ndarray, k: int, *, nprobes: int | None = None, refine: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        query = np.ascontiguousarray(query, dtype=np.float32)
        k = min(k, self.ntotal)
        idx = np.full((len(query), k), -1, dtype=np.int64)
        sim = np.full((len(query), k), -1.0, dtype=np.float32)
        live = np.flatnonzero(query.any(axis=1))  # cosine is undefined for an empty cell
        if not len(live) or k == 0:
            return idx, sim
        if not self.indexed:
            i, s = self.exact(query[live], k)
            idx[live], sim[live] = i, s
            return idx, sim
        t = self.dataset.to_table(
            columns=["_distance"],
            with_row_address=True,
            nearest={
                "column": "vector",
                "q": query[live] if len(live) > 1 else query[live][0],
                "k": k,
                "nprobes": nprobes or self.params.nprobes,
                "refine_factor": refine or self.params.refine_factor,
            },
        )
        q_of = (
            t.column("query_index").to_numpy()
            if "query_index" in t.column_names
            else np.zeros(len(t), np.int64)
        )
        addr = t.column("_rowaddr").to_numpy()
        pos = self._positions(addr)
        s = 1.0 - t.column("_distance").to_numpy(zero_copy_only=False).astype(np.float32)
        order = np.lexsort((-s, q_of))  # by query, best first
        q_of, pos, s = q_of[order], pos[order], s[order]
        rank = np.arange(len(q_of)) - np.searchsorted(q_of, q_of, side="left")
        keep = rank < k
        idx[live[q_of[keep]], rank[keep]] = pos[keep]
        sim[live[q_of[keep]], rank[keep]] = s[keep]
        return idx, sim

    def _positions(self, addr: np.ndarray) -> np.ndarray:
        """Row positions (scan order) of Lance row addresses (fragment id << 32 | offset)."""
        frag = (addr >> 32).astype(np.int64)
        offs = (addr & 0xFFFFFFFF).astype(np.int64)
        return self._starts[np.searchsorted(self._fragments, frag)] + offs

    def exact(
        self, query: np.ndarray, k: int, *, batch_rows: int = 65_536
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k by a scan of the stored vectors, `batch_rows` at a time (memory stays
        at one batch): the ground truth the index is checked against, and the search of a
        disk atlas whose index is not built yet."""
        q = np.ascontiguousarray(query, dtype=np.float32)
        k = min(k, self.ntotal)
        best_i = np.full((len(q), 0), -1, dtype=np.int64)
        best_s = np.full((len(q), 0), -np.inf, dtype=np.float32)
        at = 0
        for batch in self.dataset.to_batches(columns=["vector"], batch_size=batch_rows):
            v = fixed_size_rows(batch.column(0))
            s = q @ v.T  # queries x batch_rows: 130 MB for 500 queries
            take = min(k, s.shape[1])
            part = np.argpartition(s, s.shape[1] - take, axis=1)[:, -take:]
            best_s = np.concatenate([best_s, np.take_along_axis(s, part, 1)], axis=1)
            best_i = np.concatenate([best_i, part + at], axis=1)
            keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
            best_s, best_i = (
                np.take_along_axis(best_s, keep, 1),
                np.take_along_axis(best_i, keep, 1),
            )
            at += len(v)
        return best_i, best_s
