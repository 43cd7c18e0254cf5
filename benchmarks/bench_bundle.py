"""What an atlas bundle costs and saves: its size, the time to export it, to fetch it
from a web server (http.server on 127.0.0.1, in a thread) and to map onto it, beside the
gene-store build a lab skips by mapping onto the bundle, all in one run.

Two atlases:

- `demo`: the demo's atlas (`cellvec demo`: PBMC 68k reduced, 70% of the cells as the
  reference, refined with SupCon, calibration split 0.1) on the demo's gene store, built
  here from the shipped gene texts with the offline MiniLM model (that build is timed);
  the other 30% are the query.
- `synthetic`: `--cells` (100,000) clustered synthetic cells over `--ref-genes` (20,000)
  of a `--store-genes` (60,000) gene table of random `--dim`-d vectors (`genes import`),
  top 200 genes, no refinement (`--refine` to change), calibration split 0.1; a
  `--query-cells` (1,000) query.

For each: export (`export_bundle`), fetch into an empty cache over HTTP
(`fetch_bundle`: download and sha256 of every file), fetch again (cached: one GET of the
manifest), map the query from the fetched bundle and from the original store (the same
labels are checked), and the store's and the bundle's sizes. The store build saved:
timed for the demo store; for a full species table, the MiniLM rate measured on
`--embed-sample` real human gene texts (../shared/data) times the table's gene count.

    python benchmarks/bench_bundle.py [--cells 100000] [--skip-demo] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import SHARED, log_progress  # noqa: E402
from bench_object_store import synthetic  # noqa: E402

from servers import static_server  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"


def size_mib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 2)


def measure(tmp: Path, store: Path, name: str, query) -> dict:
    """Export, fetch (cold, then cached) over HTTP, then map (open + encode + search + vote;
    median of 3 alternating runs after a warm-up) from the bundle and from the store."""
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.bundle import export_bundle
    from cellvec.cell_index.mapping import map_cells
    from cellvec.fetch import fetch_bundle

    www = tmp / f"www_{name}"
    t = time.perf_counter()
    export_bundle(store, name, www / f"{name}.cellvec")
    export_s = time.perf_counter() - t
    out = {"store_mib": size_mib(store), "bundle_mib": size_mib(www / f"{name}.cellvec")}
    cache = tmp / f"cache_{name}"
    with static_server(www, lifetime_s=3600) as (url, _):
        ref = f"{url}/{name}.cellvec"
        t = time.perf_counter()
        bundle = fetch_bundle(ref, cache=cache)
        fetch_s = time.perf_counter() - t
        t = time.perf_counter()
        fetch_bundle(ref, cache=cache)
        cached_s = time.perf_counter() - t
    map_cells(query, Atlas.open(store, name))  # warm-up: imports, first reads
    times, labels = {"bundle": [], "store": []}, {}
    for _ in range(3):  # alternating, so both see the same load; each opens afresh
        for kind in times:
            t = time.perf_counter()
            where = (bundle.path, bundle.atlas) if kind == "bundle" else (store, name)
            labels[kind] = map_cells(query, Atlas.open(*where)).labels
            times[kind].append(time.perf_counter() - t)
    map_bundle_s, map_store_s = (float(np.median(times[k])) for k in ("bundle", "store"))
    from_bundle, from_store = labels["bundle"], labels["store"]
    return {
        **out,
        "export_s": round(export_s, 2),
        "fetch_s": round(fetch_s, 2),
        "fetch_cached_s": round(cached_s, 3),
        "map_from_bundle_s": round(map_bundle_s, 2),
        "map_from_store_s": round(map_store_s, 2),
        "same_labels": bool(np.array_equal(from_bundle, from_store)),
    }


def demo_case(tmp: Path) -> dict:
    from sklearn.model_selection import train_test_split

    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.readers import read_expression
    from cellvec.gene_store.store import build_gene_store

    store = tmp / "demo_store"
    t = time.perf_counter()
    res = build_gene_store(
        DATA / "human_pbmc68k.gene_info.gz",
        gene2go=DATA / "human_pbmc68k.gene2go.gz",
        species="human",
        store=store,
        model="minilm",
    )
    store_s = time.perf_counter() - t
    src = read_expression(DATA / "pbmc68k_reduced.h5ad")
    labels = src.obs["bulk_labels"].astype(str).to_numpy()
    idx = np.arange(src.n_obs)
    ref_idx, _ = train_test_split(idx, test_size=0.3, stratify=labels, random_state=0)
    mask = np.isin(idx, ref_idx)
    t = time.perf_counter()
    build_atlas(src.subset(mask), store=store, name="pbmc68k", label_key="bulk_labels", options=BuildOptions(calibration_split=0.1))  # fmt: skip
    atlas_s = time.perf_counter() - t
    out = measure(tmp, store, "pbmc68k", src.subset(~mask))
    return {
        "cells": int(mask.sum()),
        "store_genes": res.n_genes,
        "store_build_s": round(store_s, 1),
        "atlas_build_s": round(atlas_s, 1),
        **out,
    }


def synthetic_case(tmp: Path, args) -> dict:
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.recipe import Recipe
    from cellvec.gene_store import import_vectors

    genes = [f"G{i}" for i in range(args.store_genes)]
    np.savez(
        tmp / "vectors.npz",
        symbols=np.array(genes),
        vectors=np.random.default_rng(0).standard_normal((len(genes), args.dim), np.float32),
    )
    measured = genes[: args.ref_genes]
    ref = synthetic(args.cells, measured, 20, 1, "r")
    query = synthetic(args.query_cells, measured, 20, 2, "q")
    store = tmp / "synthetic_store"
    import_vectors(tmp / "vectors.npz", store=store, model="bench")
    t = time.perf_counter()
    build_atlas(ref, store=store, name="bench", label_key="subtype", model="bench", recipe=Recipe(top_genes=200, refine=args.refine), options=BuildOptions(calibration_split=0.1))  # fmt: skip
    atlas_s = time.perf_counter() - t
    out = measure(tmp, store, "bench", query)
    return {
        "cells": args.cells,
        "store_genes": args.store_genes,
        "atlas_genes": args.ref_genes,
        "dim": args.dim,
        "refine": args.refine,
        "atlas_build_s": round(atlas_s, 1),
        **out,
    }


def embedding_rate(n: int) -> dict | None:
    """MiniLM's rate on `n` real human gene texts (NCBI record + GO, the store's own
    composition; model loaded and warmed up first), and the human table's gene count:
    what building a full human store costs here."""
    from cellvec.gene_store.embedders import get_embedder
    from cellvec.gene_store.sources import read_gene2go, read_gene_info
    from cellvec.gene_store.text import compose_texts

    info = SHARED / "genes" / "human.gene_info.gz"
    if not info.exists():
        return None
    genes = read_gene_info(info, species="human")
    go = read_gene2go(SHARED / "genes" / "human.gene2go.gz", tax_id=9606)
    texts = compose_texts(genes, go)["text"].to_list()
    picked = np.random.default_rng(0).choice(len(texts), n + 16, replace=False)
    embedder = get_embedder("minilm")
    embedder.embed([texts[i] for i in picked[:16]])  # warm-up
    t = time.perf_counter()
    embedder.embed([texts[i] for i in picked[16:]])
    rate = n / (time.perf_counter() - t)
    return {
        "sample_genes": n,
        "genes_per_s": round(rate, 1),
        "human_genes": len(texts),
        "full_human_store_min": round(len(texts) / rate / 60, 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--query-cells", type=int, default=1_000)
    ap.add_argument("--store-genes", type=int, default=60_000)
    ap.add_argument("--ref-genes", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--refine", default="none")
    ap.add_argument("--embed-sample", type=int, default=200)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    log_progress()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_demo:
            out["demo"] = demo_case(tmp)
            shutil.rmtree(tmp / "demo_store", ignore_errors=True)
        out["synthetic"] = synthetic_case(tmp, args)
        out["embedding"] = embedding_rate(args.embed_sample)
    for name, r in out.items():
        if name == "embedding":
            continue
        print(
            f"{name}: {r['cells']:,}-cell atlas; store {r['store_mib']} MiB, bundle "
            f"{r['bundle_mib']} MiB; export {r['export_s']} s, fetch over HTTP {r['fetch_s']} s "
            f"(cached {r['fetch_cached_s']} s), map {r['map_from_bundle_s']} s from the bundle "
            f"vs {r['map_from_store_s']} s from the store; same labels: {r['same_labels']}"
            + (
                f"; the store build it saves: {r['store_build_s']} s"
                if "store_build_s" in r
                else ""
            )
        )
    if out.get("embedding"):
        e = out["embedding"]
        print(
            f"full human store ({e['human_genes']:,} genes) at {e['genes_per_s']} genes/s "
            f"(MiniLM, {e['sample_genes']} real texts): ~{e['full_human_store_min']} min"
        )
    print(json.dumps(out, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
