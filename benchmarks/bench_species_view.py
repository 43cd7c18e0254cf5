"""What an atlas's cross-species view costs at build: `cellvec atlas build` of a real
reference with the view (the default) and with `--no-cross-species`, in the same run,
each twice (new tables each time); prints the best times, their ratio, and the size of
the atlas table and of its view (`atlas_<name>__species`) on disk.

    python benchmarks/bench_species_view.py [--data pbmc3k --label-key classified --species human]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, log_progress  # noqa: E402
from _stores import ensure_store  # noqa: E402


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="pbmc3k", help="a labelled set of ../shared/data/cells")
    ap.add_argument("--label-key", default="classified", help="pbmc3k's labels")
    ap.add_argument("--species", default="human")
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    args = ap.parse_args()
    path = SHARED / "cells" / f"{args.data}.h5ad"
    if not path.exists():
        sys.exit(f"{path} not found: this needs the shared real data")
    log_progress()
    from cellvec.cell_index.build import BuildOptions, build_atlas

    store = ensure_store(args.stores / args.species, args.species)
    times = {True: [], False: []}
    for i in range(2):
        for view in (True, False):
            t = time.perf_counter()
            build_atlas(
                path,
                store=store,
                name=f"bench_view_{i}_{view}",  # new tables: one version each
                label_key=args.label_key,
                options=BuildOptions(calibration_split=0.1, cross_species=view),
            )
            times[view].append(time.perf_counter() - t)
    with_view, without = min(times[True]), min(times[False])
    atlas = folder_bytes(Path(store) / "atlas_bench_view_1_True.lance")
    view = folder_bytes(Path(store) / "atlas_bench_view_1_True__species.lance")
    print(
        f"{args.data}: atlas build {with_view:.1f} s with the view, {without:.1f} s without "
        f"(best of 2 each; ratio {with_view / without:.2f}); atlas table {atlas / 2**20:.1f} "
        f"MiB, its view {view / 2**20:.1f} MiB"
    )


if __name__ == "__main__":
    main()
