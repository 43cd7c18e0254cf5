"""Disk index parameters on real atlases: each cell's 15 nearest others through a Lance IVF_PQ
index against exact search, over partitions, sub-vectors, nprobes and refine factors.

The atlases are real (refined cell vectors of ../shared/data sets built with `atlas
build`); each is re-indexed per setting with `index_atlas` and put back in memory at
the end. Prints one JSON line per setting (results/large_atlas/ holds a run).

    python benchmarks/sweep_disk_index.py STORE:ATLAS [STORE:ATLAS ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import compare  # noqa: E402

K = 15


def sweep(store: str, name: str) -> None:
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.build import index_atlas
    from cellvec.cell_index.knn import FlatIndex, vote, without_self

    mem = Atlas.open(store, name)
    vecs = mem.vectors
    classes, codes = mem.label_codes()
    n = len(vecs)
    ei, es = without_self(*FlatIndex(vecs).search(vecs, K + 1), K)
    exact = vote(ei, es, codes, len(classes)).argmax(1)
    try:
        for parts in (int(round(np.sqrt(n))), max(4, int(round(np.sqrt(n) / 2)))):
            for sub in (16, 32):
                index_atlas(store, name, params={"num_partitions": parts, "num_sub_vectors": sub})
                index = Atlas.open(store, name).index()
                for nprobes in sorted(
                    {max(1, parts // 20), max(1, parts // 10), max(1, parts // 4)}
                ):
                    for refine in (1, 5, 10):
                        t = time.perf_counter()
                        found = index.search(vecs, K + 1, nprobes=nprobes, refine=refine)
                        secs = time.perf_counter() - t
                        row = {"atlas": name, "n": n, "parts": parts, "sub": sub}
                        row |= {"nprobes": nprobes, "refine_factor": refine}
                        row |= compare(*without_self(*found, K), ei, exact, codes, len(classes))
                        row |= {"ms_per_query": round(1000 * secs / n, 2)}
                        print(json.dumps(row), flush=True)
    finally:  # a failed setting leaves the atlas searched in memory, as it was
        index_atlas(store, name, index="memory")


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        store, name = arg.rsplit(":", 1)
        sweep(store, name)
