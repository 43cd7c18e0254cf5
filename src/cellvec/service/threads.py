"""Thread pools of a serving process, sized from the cores it may run on.

A worker of `cellvec serve` maps with numpy (OpenBLAS: the refinement head's matrix
products), faiss (OpenMP, and an OpenBLAS of its own on OpenMP threads) and, for text
queries, torch. Left alone each starts one thread per core of the machine, whatever
the number of workers, and an idle pool thread spins for a while before it sleeps.
Under a steady stream of small batches numpy's second OpenBLAS thread never slept:
on 2 cores it took a core from the event loop (one worker) or from the other worker
(two workers: 4 busy threads on 2 cores, 4x fewer requests/s than one worker).

So each pool gets `pool_size(workers)` threads: the cores this process may use
(`os.sched_getaffinity`) shared out between the workers, less one for each worker's
event loop, which is busy too under load (on 2 cores, 1 thread: with 2 for one worker,
1-cell requests ran 6-8x slower and 1,000-cell ones no faster). The environment says so
(`OMP_NUM_THREADS`, `OPENBLAS_NUM_THREADS`, `MKL_NUM_THREADS`) before these libraries
load, for the worker processes and for libraries loaded later; `limit_pools` sets the
pools already loaded. OpenMP's count is per thread once set from code, hence
`limit_thread` for each thread that maps (the batch threads).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

THREADS_ENV = "CELLVEC_THREADS"
POOL_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def cores() -> int:
    """The cores this process may run on (its CPU affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def pool_size(workers: int, n_cores: int | None = None) -> int:
    """Threads per pool for each of `workers` processes: a worker's share of the cores
    less the one its event loop keeps busy (parsing, answering), at least 1."""
    return max(1, (n_cores or cores()) // max(1, workers) - 1)


def set_pool_env(threads: int) -> None:
    """Size the pools of the libraries this process loads from now on, and those of the
    processes it starts (uvicorn's workers), to `threads` each."""
    for name in POOL_ENV:
        os.environ[name] = str(threads)
    os.environ[THREADS_ENV] = str(threads)


def env_threads() -> int | None:
    """The pool size `set_pool_env` gave this process (None if it was not called)."""
    value = os.environ.get(THREADS_ENV, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def limit_thread(threads: int) -> None:
    """OpenMP's thread count for the calling thread (faiss searches in it)."""
    import faiss

    faiss.omp_set_num_threads(threads)


def limit_pools(threads: int) -> None:
    """Set the pools already loaded in this process to `threads` each: the BLAS
    libraries (numpy's, faiss's), OpenMP (for this thread), and torch if it is
    imported; logs the threads of each pool after."""
    import faiss  # noqa: F401 (loaded first, so that its pools are found and set)
    from threadpoolctl import threadpool_info, threadpool_limits  # with scikit-learn

    threadpool_limits(limits=threads)  # process-wide for OpenBLAS; OpenMP for this thread
    limit_thread(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    pools = {}
    for info in threadpool_info():
        name = f"{info['internal_api']} ({os.path.basename(info['filepath']).split('-')[0]})"
        pools[name] = info["num_threads"]
    if "torch" in sys.modules:
        pools["torch"] = sys.modules["torch"].get_num_threads()
    log.info(
        "Thread pools: %s (%d cores available)",
        ", ".join(f"{k} {v}" for k, v in pools.items()),
        cores(),
    )
