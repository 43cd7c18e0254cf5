"""The seed-to-seed spread of the disk index's recall, which tests/test_disk_index.py's
recall floors are set from.

The tests' 1,200-cell atlas (`indexed_atlas` of tests/helpers.py, on the tiny gene set and the fake embedder),
its Lance IVF_PQ index rebuilt with each training seed, and the tie-aware recall@15 of
every 5th and every 7th atlas cell against exact search in the same run. One seed gives
one figure on every run, so a floor is set from the spread over seeds: the lowest less
the range, rounded down to 3 decimals.

    python benchmarks/disk_index_seed_spread.py --seeds 40
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _common  # noqa: E402, F401 (run on cellvec's pinned numerical kernels)

from helpers import (  # noqa: E402
    FakeEmbedder,
    build_tiny,
    indexed_atlas,
    seed_spread,
    write_gene_files,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="training seeds 0..SEEDS-1")
    args = ap.parse_args()
    import cellvec.gene_store.embedders as reg
    import cellvec.gene_store.store as store_mod

    # what the tests' `fake_models` fixture does: every model is the fake embedder
    reg.get_embedder = store_mod.get_embedder = lambda spec, **kw: FakeEmbedder()
    with tempfile.TemporaryDirectory() as d:
        store = Path(d) / "store"
        build_tiny(write_gene_files(Path(d)), store)
        indexed_atlas(store, "tiny", "memory")
        for step in (5, 7):
            r = seed_spread(store, "tiny", step, args.seeds)
            low, spread = r.min(), np.ptp(r)
            print(
                f"every {step}th cell, seeds 0-{args.seeds - 1}: seed 0 {r[0]:.4f}, "
                f"min {low:.4f}, max {r.max():.4f}, range {spread:.4f}, "
                f"floor {math.floor((low - spread) * 1000) / 1000:.3f} "
                f"(min - range = {low - spread:.4f}, rounded down)"
            )


if __name__ == "__main__":
    main()
