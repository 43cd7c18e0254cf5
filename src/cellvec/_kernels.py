"""One set of numerical kernels on every Intel x86-64 machine, so that a seed gives the
same gene vectors, atlases and labels on each, not only on a machine of the same kind.

MKL (torch's matrix products: the language model, refinement) and OpenBLAS (numpy's and
faiss's) each pick kernels for the CPU they find. An AVX-512 machine and an AVX2 one then
round differently (1e-7 in a gene vector), and refinement's training carries that into
different atlases: measured on the Baron pair, macro-F1 0.772 on one machine and 0.768
on another for the same command and seed. Pinned to their AVX2 kernels (`MKL_CBWR=AVX2`,
`OPENBLAS_CORETYPE=Haswell`), an AVX-512 machine gives the arrays an AVX2-only one gives,
bit for bit (tests/test_kernels.py emulates the AVX2 machine). Cost measured here: none
on a real atlas (the Baron mouse set, two refinements: 60.6-61.3 s pinned, 58.6-61.8 s
not), ~10-15% on the test suite's tiny ones (tests/test_refine_evaluate.py 19.3-19.9 s
against 16.4-17.5 s).
faiss's own SIMD level and torch's ATen level changed nothing measured (AVX2 against
AVX-512), so they are left to choose.

On a CPU that is not Intel's, MKL ignores the AVX2 branch and picks its own: numpy and
faiss are pinned there too, torch is not. `MKL_CBWR=COMPATIBLE` (set before starting
Python) gives the same results on every x86-64 CPU, Intel's and AMD's alike, at a cost
measured here of ~1.4x the embedding time and ~1.3x refinement's.

Both libraries read these variables when they load, so `pin()` runs on `import cellvec`,
before numpy or torch: the CLI, the service, a local Ray cluster cellvec starts and any
script that imports cellvec first are pinned (workers of a cluster started otherwise keep
that cluster's environment). A variable already set is left as it is; nothing is pinned
with `CELLVEC_PIN_KERNELS=0`, on a CPU without AVX2 and FMA (the kernels would not run) or
off x86-64 Linux. `pinned()` says whether the loaded OpenBLAS libraries use the pinned
kernels (not, when numpy was imported before cellvec)."""

from __future__ import annotations

import os
import platform

PINS = {"MKL_CBWR": "AVX2", "OPENBLAS_CORETYPE": "Haswell"}


def has_flags(*flags: str) -> bool:
    """Whether the CPU (Linux's /proc/cpuinfo) has all of `flags`; False where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(flags) <= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return False


def pin() -> None:
    """Set `PINS` in the environment where unset, on an x86-64 Linux CPU with AVX2."""
    if os.environ.get("CELLVEC_PIN_KERNELS", "1") == "0":
        return
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return
    if not has_flags("avx2", "fma"):
        return
    for key, value in PINS.items():
        os.environ.setdefault(key, value)


def pinned() -> bool | None:
    """Whether every OpenBLAS loaded in this process runs its pinned kernels (None where
    nothing was pinned: another CPU, or the variable set otherwise)."""
    if os.environ.get("OPENBLAS_CORETYPE") != PINS["OPENBLAS_CORETYPE"]:
        return None
    from threadpoolctl import threadpool_info

    arch = [i.get("architecture") for i in threadpool_info() if i["internal_api"] == "openblas"]
    return all(a == PINS["OPENBLAS_CORETYPE"] for a in arch)
