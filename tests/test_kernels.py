"""A seed gives the same atlas on any Intel x86-64 machine (`cellvec._kernels`): an
AVX-512 machine and an AVX2-only one build it bit for bit alike.

The AVX2 machine is emulated in a second process: MKL held to AVX2
(`MKL_ENABLE_INSTRUCTIONS`), torch's ATen and faiss to their AVX2 code, and OpenBLAS on
the kernels it picks on such a CPU (Haswell's). Without the pins the two atlases' query
vectors differ by ~2e-3 after refinement, so the test runs where that difference can
show: on a CPU with AVX-512.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cellvec._kernels import PINS, has_flags, pinned

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or not has_flags("avx2", "fma"),
    reason="kernels are pinned on x86-64 Linux with AVX2 only",
)
TESTS = Path(__file__).parent
AVX2_MACHINE = {
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "FAISS_OPT_LEVEL": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",  # what OpenBLAS picks on an AVX2 CPU by itself
}
OWN = {"CELLVEC_PIN_KERNELS", *PINS, *AVX2_MACHINE}

BUILD_AND_MAP = """
import sys
import cellvec
import numpy as np
sys.path.insert(0, sys.argv[2])
from cellvec.gene_store.embedders import register_embedder
from helpers import FakeEmbedder, tiny_adata, tiny_store
from pathlib import Path
register_embedder("fake", lambda name="", **kw: FakeEmbedder(name, **kw))
from cellvec.cell_index.build import BuildOptions, build_atlas
from cellvec.cell_index.mapping import map_cells
from cellvec.cell_index.recipe import Recipe
store = tiny_store(Path(sys.argv[1]) / "store")
build_atlas(tiny_adata(n_cells=300, seed=1), store=store, name="t", label_key="cell_type",
            recipe=Recipe(top_genes=10), options=BuildOptions(calibration_split=0.2))
res = map_cells(tiny_adata(n_cells=200, seed=4, prefix="q"), "t", store=store)
np.savez(Path(sys.argv[1]) / "mapped.npz", vectors=res.vectors, labels=res.labels.astype(str),
         confidence=res.confidence, typicality=res.typicality)
"""


def _env(**extra) -> dict:
    """This environment less every variable of the pins (each process's own `import
    cellvec` sets them), plus `extra`."""
    return {**{k: v for k, v in os.environ.items() if k not in OWN}, **extra}


def _run(code: str, *args, env: dict) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _openblas_cores(env: dict) -> set[str]:
    """The kernels of the OpenBLAS libraries (numpy's, faiss's) after `import cellvec`."""
    code = (
        "import cellvec, numpy, faiss; from threadpoolctl import threadpool_info; print(' '.join("
        "i['architecture'] for i in threadpool_info() if i['internal_api'] == 'openblas'))"
    )
    return set(_run(code, env=env).split())


def test_importing_cellvec_first_pins_numpy_and_faiss():
    assert _openblas_cores(_env()) == {"Haswell"}  # numpy and faiss, whatever the CPU
    assert pinned() is True  # pytest loads cellvec first (`-p cellvec` in pyproject.toml)
    unpinned = _openblas_cores(_env(CELLVEC_PIN_KERNELS="0"))
    check = "import numpy; import cellvec; from cellvec._kernels import pinned; print(pinned())"
    # imported too late to pin, and said so, where this CPU's own kernels are others
    expected = "True" if unpinned == {"Haswell"} else "False"
    assert _run(check, env=_env()).strip() == expected
    # a user's own choice is kept
    mine = f"import cellvec, os, json; print(json.dumps({{k: os.environ[k] for k in {list(PINS)!r}}}))"  # fmt: skip
    out = _run(mine, env=_env(MKL_CBWR="COMPATIBLE", OPENBLAS_CORETYPE="SkylakeX"))
    assert json.loads(out) == {"MKL_CBWR": "COMPATIBLE", "OPENBLAS_CORETYPE": "SkylakeX"}


@pytest.mark.skipif(
    not has_flags("avx512f"),
    reason="an AVX2-only CPU is the machine the test emulates: nothing to compare",
)
def test_an_avx2_machine_builds_the_same_atlas(tmp_path):
    here, avx2 = tmp_path / "here", tmp_path / "avx2"
    _run(BUILD_AND_MAP, here, TESTS, env=_env())
    _run(BUILD_AND_MAP, avx2, TESTS, env=_env(**AVX2_MACHINE))
    a, b = np.load(here / "mapped.npz"), np.load(avx2 / "mapped.npz")
    assert list(a["labels"]) == list(b["labels"])
    for key in ("vectors", "confidence", "typicality"):
        assert np.array_equal(a[key], b[key], equal_nan=True), (key, np.nanmax(abs(a[key] - b[key])))  # fmt: skip
