"""Gene texts embedded on a Ray cluster: the store build's batches spread over workers.

Each worker (a Ray Data actor) holds one copy of the embedding model, received once
through the object store, and embeds whole store batches exactly as one process
would (the same texts together, so padding and results are the same). The driver
receives the batches in order and commits each to the staging table as it comes,
so a build on Ray stays incremental and resumable.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

from cellvec._ray import cluster_cpus, init_ray, ordered_data
from cellvec.gene_store.embedders.base import Embedder

log = logging.getLogger(__name__)


class _EmbedBatches:
    """A Ray Data actor: one embedder, loaded on its first batch."""

    def __init__(self, embedder):
        import ray

        self.embedder = ray.get(embedder) if isinstance(embedder, ray.ObjectRef) else embedder

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = [
            np.ascontiguousarray(self.embedder.embed(texts), dtype=np.float32)
            for texts in batch.column("texts").to_pylist()
        ]
        config = json.dumps(self.embedder.config())
        return pa.table(
            {
                "vectors": pa.array([v.tobytes() for v in vectors], pa.large_binary()),
                "dim": pa.array([v.shape[1] for v in vectors], pa.int64()),
                "config": pa.array([config] * len(vectors), pa.string()),
            }
        )


def embed_batches(
    embedder: Embedder, batches: list[list[str]], *, ray=True
) -> Iterator[tuple[np.ndarray, dict]]:
    """Yield (vectors, the worker's `embedder.config()`) for each batch of texts, in order,
    each batch embedded by one Ray worker as `embedder.embed(texts)`."""
    ray = init_ray(ray)
    if not batches:
        return
    t0 = time.perf_counter()
    workers = min(cluster_cpus(ray), len(batches))
    log.info("Embedding %d batches with %s on %d Ray workers", len(batches), embedder.spec, workers)
    with ordered_data(ray):
        ds = ray.data.from_items(
            [{"texts": list(t)} for t in batches],
            override_num_blocks=len(batches),
        )
        ds = ds.map_batches(
            _EmbedBatches,
            fn_constructor_kwargs={"embedder": ray.put(embedder)},
            concurrency=workers,
            num_cpus=1,
            batch_size=None,
            batch_format="pyarrow",
        )
        for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for vec, dim, cfg in zip(
                table.column("vectors").to_pylist(),
                table.column("dim").to_pylist(),
                table.column("config").to_pylist(),
            ):
                yield np.frombuffer(vec, dtype=np.float32).reshape(-1, dim), json.loads(cfg)
    log.info("Embedded %d batches on Ray in %.1f s", len(batches), time.perf_counter() - t0)
