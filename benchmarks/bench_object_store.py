"""`map` onto an atlas whose store is in a bucket (moto's S3 server on 127.0.0.1) vs the
same atlas on local disk, in the same run.

One synthetic reference (clustered counts, `--classes` subtypes with their own marker
genes) and one query are written as h5ad; a gene store (`genes import` of random
vectors) and an atlas (`atlas build --refine none`) are built into a local directory
and into `s3://cellvec-bench/store`. After one untimed warm-up map on each
(imports, first connections), each repeat maps the query from scratch on both,
alternately (so both see the same machine load), as `cellvec map` does:
open the atlas (its table, the gene table, the artifacts), encode, search, vote.
Printed: the median time of the open and of the whole map on each store, their ratio
(bucket / local disk), the store's size, and that both give the same labels.

The S3 server is moto, in Python, on the same cores: it is slower than a real object
store per request and has no network latency, so the ratio says what the object-store
path costs here, not what a region away would.

    python benchmarks/bench_object_store.py [--atlas-cells 50000] [--query-cells 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import log_progress  # noqa: E402

from servers import s3_server  # noqa: E402


def synthetic(n_cells: int, genes: list[str], n_classes: int, seed: int, prefix: str):
    """Counts: ~`nnz` genes a cell, a tenth of them from its class's 40 marker genes."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    n_genes, nnz = len(genes), 300
    markers = np.random.default_rng(99).choice(n_genes, size=(n_classes, 40), replace=False)
    labels = rng.integers(0, n_classes, n_cells)
    cols = rng.integers(0, n_genes, (n_cells, nnz))
    cols[:, :30] = markers[labels][:, rng.integers(0, 40, 30)]
    vals = rng.poisson(1.0, (n_cells, nnz)).astype(np.float32) + 1
    vals[:, :30] += rng.poisson(6, (n_cells, 30))
    x = sp.csr_matrix(
        (vals.ravel(), cols.ravel(), np.arange(0, n_cells * nnz + 1, nnz)),
        shape=(n_cells, n_genes),
    )
    x.sum_duplicates()
    obs = pd.DataFrame(
        {"subtype": pd.Categorical([f"type{c}" for c in labels])},
        index=[f"{prefix}{i}" for i in range(n_cells)],
    )
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=genes))


def build(store, vectors: Path, ref: Path, top_genes: int) -> float:
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.recipe import Recipe
    from cellvec.gene_store import import_vectors

    t = time.perf_counter()
    import_vectors(vectors, store=store, model="bench")
    build_atlas(
        ref,
        store=store,
        name="bench",
        label_key="subtype",
        model="bench",
        recipe=Recipe(top_genes=top_genes, refine="none"),
        options=BuildOptions(calibration_split=0.1),
    )
    return time.perf_counter() - t


def map_once(store, query: Path) -> tuple[float, float, np.ndarray]:
    """(seconds to open the atlas, seconds for the whole map, labels)."""
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.mapping import map_cells

    t = time.perf_counter()
    atlas = Atlas.open(store, "bench")
    atlas.encoder()
    atlas.calibration()
    opened = time.perf_counter() - t
    res = map_cells(query, atlas, truth_key="subtype")
    return opened, time.perf_counter() - t, np.asarray(res.labels)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--atlas-cells", type=int, default=50_000)
    ap.add_argument("--query-cells", type=int, default=1_000)
    ap.add_argument("--genes", type=int, default=2_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--top-genes", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", dest="json_out", help="also write the figures to this file")
    args = ap.parse_args()
    log_progress()

    from cellvec.storage import store_location

    with tempfile.TemporaryDirectory() as tmp, s3_server() as s3:
        tmp = Path(tmp)
        genes = [f"G{i}" for i in range(args.genes)]
        np.savez(
            tmp / "vectors.npz",
            symbols=np.array(genes),
            vectors=np.random.default_rng(0).standard_normal((args.genes, args.dim), np.float32),
        )
        ref, query = tmp / "ref.h5ad", tmp / "query.h5ad"
        synthetic(args.atlas_cells, genes, args.classes, 1, "r").write_h5ad(ref)
        synthetic(args.query_cells, genes, args.classes, 2, "q").write_h5ad(query)
        s3.create_bucket("cellvec-bench")
        stores = {
            "local": store_location(tmp / "store"),
            "s3": store_location("s3://cellvec-bench/store", s3.storage_options()),
        }
        built = {
            k: build(loc, tmp / "vectors.npz", ref, args.top_genes) for k, loc in stores.items()
        }
        for loc in stores.values():  # warm-up, not timed: imports, first connections
            map_once(loc, query)
        times = {k: {"open": [], "map": []} for k in stores}
        labels = {}
        for _ in range(args.repeats):
            for kind, loc in stores.items():
                opened, total, labels[kind] = map_once(loc, query)
                times[kind]["open"].append(opened)
                times[kind]["map"].append(total)
        size = sum(p.stat().st_size for p in (tmp / "store").rglob("*") if p.is_file())
    med = {k: {p: statistics.median(v) for p, v in t.items()} for k, t in times.items()}
    out = {
        "atlas_cells": args.atlas_cells,
        "query_cells": args.query_cells,
        "genes": args.genes,
        "dim": args.dim,
        "top_genes": args.top_genes,
        "repeats": args.repeats,
        "store_mib": round(size / 2**20, 1),
        "build_s": {k: round(v, 2) for k, v in built.items()},
        "open_s": {k: round(v["open"], 3) for k, v in med.items()},
        "map_s": {k: round(v["map"], 3) for k, v in med.items()},
        "ratio_open": round(med["s3"]["open"] / med["local"]["open"], 2),
        "ratio_map": round(med["s3"]["map"] / med["local"]["map"], 2),
        "ratio_build": round(built["s3"] / built["local"], 2),
        "same_labels": bool(np.array_equal(labels["s3"], labels["local"])),
    }
    print(
        f"map of {args.query_cells:,} cells onto a {args.atlas_cells:,}-cell atlas "
        f"({out['store_mib']} MiB store), median of {args.repeats}:\n"
        f"  local disk: open {out['open_s']['local']:.2f} s, map {out['map_s']['local']:.2f} s\n"
        f"  S3 (moto):  open {out['open_s']['s3']:.2f} s, map {out['map_s']['s3']:.2f} s\n"
        f"  ratio S3 / local: map {out['ratio_map']:.2f}x, open {out['ratio_open']:.2f}x; "
        f"build {out['ratio_build']:.2f}x ({out['build_s']['s3']:.1f} s vs "
        f"{out['build_s']['local']:.1f} s); same labels: {out['same_labels']}"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
