"""`atlas build` on a local Ray cluster against one process, on the same machine, same run.

Data: the synthetic on-disk h5ad of `bench_cell_vectors.py` (`--cells` x `--genes`,
`--nnz` non-zeros per cell: 1,000 of 20,000 genes by default, 5% density as 10x
PBMC data after gene filtering, log-normalised values with a heavy tail), with a
`cell_type` column of `--classes` labels; random 384-d gene vectors imported as a
store. The h5ad is large enough to be read backed, in chunks, on both paths.

Both paths run `build_atlas` with the same recipe: top `--top-genes` genes,
whitening, centring, and **no refinement** by default (`--refine none`: the
refinement is one model trained in the driver process on both paths, so it would
only add the same seconds to both sides; `--refine-steps N` trains supcon for N
steps on both instead). Ray: a local cluster of `--ray-cpus` CPUs (127.0.0.1 only),
started before the timed run (its start-up is reported separately).

Prints cells/s of each path, the overhead ratio (Ray seconds / single-process
seconds; goal on 2 cores: <= 1.3), and checks on a sample that both atlases hold the
same rows with vectors within 1e-6.

    python benchmarks/bench_ray.py [--cells 1000000] [--ray-cpus 2] [--refine-steps 0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import log_progress, peak_rss_mib, synthetic_h5ad_args  # noqa: E402
from bench_cell_vectors import write_h5ad  # noqa: E402


def add_labels(path: Path, n_cells: int, n_classes: int, seed: int = 0) -> None:
    """A categorical obs column `cell_type` (class sizes from a Dirichlet draw)."""
    import h5py

    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(n_classes, 1.0))
    codes = rng.choice(n_classes, size=n_cells, p=p).astype(np.int8)
    with h5py.File(path, "a") as f:
        obs = f["obs"]
        col = obs.create_group("cell_type")
        col.attrs.update(
            {"encoding-type": "categorical", "encoding-version": "0.2.0", "ordered": False}
        )
        col.create_dataset("codes", data=codes)
        col.create_dataset(
            "categories",
            data=np.array([f"type{c}" for c in range(n_classes)], dtype=object),
            dtype=h5py.string_dtype(),
        )
        col["categories"].attrs.update(
            {"encoding-type": "string-array", "encoding-version": "0.2.0"}
        )
        obs.attrs["column-order"] = np.array(["cell_type"], dtype=object)


def main():
    ap = argparse.ArgumentParser()
    synthetic_h5ad_args(ap)
    ap.add_argument("--classes", type=int, default=30)
    ap.add_argument("--refine-steps", type=int, default=0, help="0: --refine none")
    ap.add_argument("--ray-cpus", type=int, default=2)
    args = ap.parse_args()
    log_progress()

    from cellvec._ray import start_local_cluster
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.recipe import Recipe
    from cellvec.gene_store.store import import_vectors

    recipe = Recipe(top_genes=args.top_genes, refine="supcon" if args.refine_steps else "none")
    refine_options = {"steps": args.refine_steps} if args.refine_steps else None
    out = {
        "cells": args.cells,
        "genes": args.genes,
        "nnz_per_cell": args.nnz,
        "top_genes": args.top_genes,
        "dim": args.dim,
        "refinement": f"supcon, {args.refine_steps} steps" if args.refine_steps else "none",
        "ray_cpus": args.ray_cpus,
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("CELLVEC_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_h5ad(tmp / "ref.h5ad", args.cells, args.genes, args.nnz)
        add_labels(tmp / "ref.h5ad", args.cells, args.classes)
        out["write_h5ad_s"] = round(time.perf_counter() - t, 1)
        out["h5ad_gib"] = round((tmp / "ref.h5ad").stat().st_size / 2**30, 2)
        rng = np.random.default_rng(1)
        e = rng.normal(size=(args.genes, args.dim)).astype(np.float32)
        names = np.array([f"G{i}" for i in range(args.genes)])
        np.savez(tmp / "vectors.npz", genes=names, vectors=e)
        import_vectors(tmp / "vectors.npz", store=tmp / "store", model="bench", species="human")
        options = dict(store=tmp / "store", label_key="cell_type", model="bench", recipe=recipe)

        t = time.perf_counter()
        single = build_atlas(
            tmp / "ref.h5ad",
            name="single",
            options=BuildOptions(refine_options=refine_options),
            **options,
        )
        single_s = time.perf_counter() - t
        single_rss = peak_rss_mib()
        ref_ids, ref_vecs = single.cell_ids, single.vectors
        del single

        t = time.perf_counter()
        ray = start_local_cluster(num_cpus=args.ray_cpus)
        start_s = time.perf_counter() - t
        t = time.perf_counter()
        dist = build_atlas(
            tmp / "ref.h5ad",
            name="on_ray",
            options=BuildOptions(refine_options=refine_options, ray=True),
            **options,
        )
        ray_s = time.perf_counter() - t
        ray.shutdown()

        same_rows = bool((dist.cell_ids == ref_ids).all())
        sample = np.random.default_rng(2).choice(args.cells, min(args.cells, 10_000), False)
        max_diff = float(np.abs(dist.vectors[sample] - ref_vecs[sample]).max())
    out.update(
        {
            "single_process_s": round(single_s, 1),
            "single_process_cells_per_s": round(args.cells / single_s),
            "ray_cluster_start_s": round(start_s, 1),
            "ray_s": round(ray_s, 1),
            "ray_cells_per_s": round(args.cells / ray_s),
            "overhead_ratio": round(ray_s / single_s, 3),
            "overhead_ratio_with_cluster_start": round((ray_s + start_s) / single_s, 3),
            "goal_ratio": "<= 1.3 on 2 cores",
            "same_rows": same_rows,
            "max_abs_vector_difference_on_10k_sample": max_diff,
            "driver_peak_rss_mib_single": round(single_rss),
            "driver_peak_rss_mib_end": round(peak_rss_mib()),
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        }
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
