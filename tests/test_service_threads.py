"""Thread pools and heap of a serving process (`service.threads`, `AtlasCache.preload`)."""

import json
import os
import subprocess
import sys

from cellvec.service.threads import POOL_ENV, THREADS_ENV, cores, pool_size


def test_pool_size_shares_the_cores_out_less_the_event_loops():
    assert pool_size(1, n_cores=2) == 1  # the event loop keeps the other core busy
    assert pool_size(2, n_cores=2) == 1
    assert pool_size(4, n_cores=2) == 1
    assert pool_size(1, n_cores=16) == 15
    assert pool_size(2, n_cores=16) == 7
    assert pool_size(1, n_cores=1) == 1


CHILD = r"""
import gc, json, sys
from concurrent.futures import ThreadPoolExecutor

import numpy  # loaded first, with one BLAS thread per core, as in a test or a notebook
from threadpoolctl import threadpool_info

from cellvec.service import create_app

app = create_app(sys.argv[1], threads=1, preload=False, freeze_heap=True)
app.state.atlases.preload()

import faiss

print(json.dumps({
    "pools": sorted({p["num_threads"] for p in threadpool_info()}),
    "batch_thread_omp": app.state.batcher.executor.submit(faiss.omp_get_max_threads).result(),
    "other_thread_omp": ThreadPoolExecutor(1).submit(faiss.omp_get_max_threads).result(),
    "frozen": gc.get_freeze_count(),
}))
"""


def test_served_process_pools_are_sized_and_its_heap_frozen(served):
    """Pools already loaded are set to `threads` (OpenMP's in the thread that maps batches
    too), and the heap as loaded is out of the collector's full passes."""
    env = {k: v for k, v in os.environ.items() if k not in (*POOL_ENV, THREADS_ENV)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(served)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["pools"] == [1] and got["batch_thread_omp"] == 1
    assert got["other_thread_omp"] == cores()  # why each thread that maps is set
    assert got["frozen"] > 10_000
