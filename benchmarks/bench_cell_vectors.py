"""Cell-vector throughput, streamed from an on-disk h5ad, against a bare scipy product.

Data: synthetic log-normalised expression, `--cells` x `--genes` (default 1,000,000 x
20,000) with `--nnz` non-zeros per cell (default 1,000: 5% density, as 10x PBMC data
after gene filtering), written chunk by chunk to an h5ad in a temporary folder.

Baseline, same run, same chunks read the same way: `X_chunk @ E` with scipy (E is
genes x 384). cellvec: the whole path (read, value checks, gene matching, top-N
selection, weights, background transform, `W @ E`, normalisation), its vectors
streamed to disk. Prints cells/s, the ratio (target >= 0.5), and RSS at several
points (target: flat in the number of cells, < 4 GiB).

    python benchmarks/bench_cell_vectors.py [--cells 1000000] [--genes 20000] [--nnz 1000]
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
from _common import peak_rss_mib, rss_mib, synthetic_h5ad_args  # noqa: E402


def write_h5ad(
    path: Path, n_cells: int, n_genes: int, nnz: int, chunk: int = 50_000, seed: int = 0
) -> None:
    """A CSR h5ad written chunk-wise with h5py: memory does not grow with n_cells."""
    import anndata as ad
    import h5py
    import pandas as pd
    import scipy.sparse as sp

    small = ad.AnnData(
        sp.csr_matrix((1, n_genes), dtype=np.float32),
        var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]),
    )
    small.obs_names = ["c0"]
    small.write_h5ad(path)
    rng = np.random.default_rng(seed)
    step = n_genes // nnz
    with h5py.File(path, "a") as f:
        del f["X"], f["obs"]
        obs = f.create_group("obs")
        obs.attrs.update(
            {
                "encoding-type": "dataframe",
                "encoding-version": "0.2.0",
                "_index": "_index",
                "column-order": np.array([], dtype="S"),
            }
        )
        obs.create_dataset(
            "_index",
            data=np.array([f"c{i}" for i in range(n_cells)], dtype=object),
            dtype=h5py.string_dtype(),
        )
        obs["_index"].attrs.update({"encoding-type": "string-array", "encoding-version": "0.2.0"})
        x = f.create_group("X")
        x.attrs.update(
            {
                "encoding-type": "csr_matrix",
                "encoding-version": "0.1.0",
                "shape": (n_cells, n_genes),
            }
        )
        total = n_cells * nnz
        data = x.create_dataset(
            "data", shape=(total,), dtype=np.float32, chunks=(min(total, 1 << 20),)
        )
        idx = x.create_dataset(
            "indices", shape=(total,), dtype=np.int32, chunks=(min(total, 1 << 20),)
        )
        x.create_dataset("indptr", data=np.arange(0, total + 1, nnz, dtype=np.int64))
        cols = (np.arange(nnz, dtype=np.int32) * step)[None, :]
        for s in range(0, n_cells, chunk):
            m = min(chunk, n_cells - s)
            offs = rng.integers(0, step, size=(m, 1), dtype=np.int32)
            idx[s * nnz : (s + m) * nnz] = (cols + offs).ravel()
            # log-normalised-looking values: most near 0.5-2, a heavy tail of highly expressed genes
            data[s * nnz : (s + m) * nnz] = (
                np.log1p(rng.gamma(0.6, 3.0, size=m * nnz)).astype(np.float32) + 0.01
            )


def main():
    ap = argparse.ArgumentParser()
    synthetic_h5ad_args(ap)
    ap.add_argument("--chunk", type=int, default=20_000)
    args = ap.parse_args()

    from cellvec.cell_index.background import apply_background, fit_background
    from cellvec.cell_index.readers import read_expression
    from cellvec.cell_index.recipe import Recipe
    from cellvec.cell_index.vectors import GeneBasis, iter_cell_vectors, match_dataset_genes
    from cellvec.gene_store.store import GeneStore, import_vectors

    out = {"cells": args.cells, "genes": args.genes, "nnz_per_cell": args.nnz, "dim": args.dim}
    with tempfile.TemporaryDirectory(dir=os.environ.get("CELLVEC_BENCH_DIR")) as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        write_h5ad(tmp / "big.h5ad", args.cells, args.genes, args.nnz)
        out["write_h5ad_s"] = round(time.perf_counter() - t, 1)
        out["h5ad_gib"] = round((tmp / "big.h5ad").stat().st_size / 2**30, 2)
        rng = np.random.default_rng(1)
        e = rng.normal(size=(args.genes, args.dim)).astype(np.float32)
        np.savez(
            tmp / "vectors.npz", genes=np.array([f"G{i}" for i in range(args.genes)]), vectors=e
        )
        import_vectors(tmp / "vectors.npz", store=tmp / "store", model="bench", species="human")
        gt = GeneStore(tmp / "store").load("bench")

        src = read_expression(tmp / "big.h5ad", backed=True)
        out["rss_mib_after_open"] = round(rss_mib())

        # Baseline: the same chunks, read the same way, multiplied by E with scipy.
        t = time.perf_counter()
        for _, block in src.chunks(args.chunk):
            _ = block @ e
        bare = time.perf_counter() - t

        cols, rows = match_dataset_genes(src.var_names, gt, "bench")
        raw = gt.vectors[rows]
        bg = fit_background(raw, "whiten")
        basis = GeneBasis(cols, rows, apply_background(raw, bg))
        recipe = Recipe(model=gt.model, dimension=args.dim, top_genes=args.top_genes)
        rss_marks = {}
        t = time.perf_counter()
        with open(tmp / "vectors.f32", "wb") as fh:
            for sl, vecs in iter_cell_vectors(src, basis, recipe, chunk_size=args.chunk):
                fh.write(vecs.tobytes())
                done = sl.stop
                for mark in (args.cells // 4, args.cells // 2, args.cells):
                    if done >= mark and mark not in rss_marks:
                        rss_marks[mark] = round(rss_mib())
        full = time.perf_counter() - t
    out.update(
        {
            "bare_product_s": round(bare, 1),
            "bare_cells_per_s": round(args.cells / bare),
            "cellvec_s": round(full, 1),
            "cellvec_cells_per_s": round(args.cells / full),
            "throughput_ratio": round(bare / full, 3),
            "target_ratio": ">= 0.5",
            "rss_mib_at_cells": rss_marks,
            "peak_rss_mib": round(peak_rss_mib()),
            "target_peak": "< 4096, flat",
        }
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
