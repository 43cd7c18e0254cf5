"""A seed gives the same atlas on any x86-64 machine (`cellvec._kernels`): an AVX-512
machine and an AVX2-only one build it bit for bit alike.

The AVX2 machine is emulated here in a second process (`MKL_ENABLE_INSTRUCTIONS=AVX2`,
torch's `ATEN_CPU_CAPABILITY=avx2`, faiss's `FAISS_OPT_LEVEL=AVX2`). Without the pins,
on an AVX-512 machine, the two atlases' query vectors differ by ~2e-3 after refinement;
on an AVX2 machine both processes already are that machine and the test holds trivially.
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

from cellvec._kernels import PINS, _has_avx2

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or not _has_avx2(),
    reason="kernels are pinned on x86-64 Linux with AVX2 only",
)
TESTS = Path(__file__).parent
AVX2_MACHINE = {
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
    "FAISS_OPT_LEVEL": "AVX2",
}

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
np.save(Path(sys.argv[1]) / "vectors.npy", res.vectors)
"""


def _env(**extra) -> dict:
    """This environment less the pins (each process's own `import cellvec` sets them)."""
    env = {k: v for k, v in os.environ.items() if k not in PINS and k not in AVX2_MACHINE}
    return {**env, **extra}


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


def test_importing_cellvec_first_pins_numpy_and_faiss():
    check = (
        "import {0}; import {1}; import faiss; from cellvec._kernels import pinned; print(pinned())"
    )
    assert _run(check.format("cellvec", "numpy"), env=_env()).strip() == "True"
    assert _run(check.format("numpy", "cellvec"), env=_env()).strip() == "False"  # too late
    # a user's own choice is kept
    mine = f"import cellvec, os, json; print(json.dumps({{k: os.environ[k] for k in {list(PINS)!r}}}))"  # fmt: skip
    out = _run(mine, env=_env(MKL_CBWR="AUTO", OPENBLAS_CORETYPE="SkylakeX"))
    assert json.loads(out) == {"MKL_CBWR": "AUTO", "OPENBLAS_CORETYPE": "SkylakeX"}


def test_an_avx2_machine_builds_the_same_atlas(tmp_path):
    here, avx2 = tmp_path / "here", tmp_path / "avx2"
    _run(BUILD_AND_MAP, here, TESTS, env=_env())
    _run(BUILD_AND_MAP, avx2, TESTS, env=_env(**AVX2_MACHINE))
    a, b = np.load(here / "vectors.npy"), np.load(avx2 / "vectors.npy")
    assert a.shape == b.shape and np.array_equal(a, b), float(np.abs(a - b).max())
