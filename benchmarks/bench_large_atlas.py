"""An atlas larger than memory: N synthetic cells around real cell-vector centroids, on disk.

The cluster structure is real: a real atlas is built from ../shared/data (default
pbmc3k, 8 cell types, refined 128-d vectors), and each synthetic cell is drawn from
one of its classes (chosen in proportion to the class's size) as the class centroid
plus a Gaussian with that class's own covariance (the top 32 principal components
of its real cells exactly, the remaining variance isotropic), normalised to unit length like every atlas vector. The cells are written
as an atlas table of the real atlas's store in chunks of `--chunk` rows (never all in
memory), with the real atlas's recipe, so `cellvec map` can map onto it.

Then, each in its own process so that each peak RSS is its own:
  1. index: `index_atlas(..., index="disk")`, the Lance IVF_PQ index cellvec builds;
  2. query: `--queries` fresh cells from the same distribution mapped through
     `Atlas.index()` (disk), against exact search (a streaming scan of every vector)
     on a sample of `--exact-queries`: recall@15 and agreement of the voted labels;
  3. memory (only where the atlas fits, `--memory-max`, default 2M): the same queries
     through the in-memory faiss path `map` uses below the memory budget, for the ratio.

    python benchmarks/bench_large_atlas.py --cells 1000000           # ~10 min on 2 cores
    nice -n 10 python benchmarks/bench_large_atlas.py --cells 20000000 --keep   # hours

Prints one JSON object per phase and a summary; peak RSS must stay below 4 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("LANCE_CPU_THREADS", "1")  # shared cores: one compute thread
os.environ.setdefault("LANCE_IO_THREADS", "4")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, compare, peak_rss_mib  # noqa: E402

REFERENCES = {  # name: (species, file, label key)
    "pbmc3k": ("human", "pbmc3k", "classified"),
    "amacrine": ("mouse", "macosko2015_amacrine", "cell_type"),
    "pbmc_3chem": ("human", "pbmc_3chem", "cell_type"),
}
K = 15


def real_atlas(work: Path, reference: str):
    """The real atlas the synthetic cells are drawn around (built once in `work`)."""
    from _stores import ensure_store

    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.table import list_atlases

    species, fname, key = REFERENCES[reference]
    store = ensure_store(work / f"store_{species}", species)
    if reference not in list_atlases(store):
        build_atlas(
            SHARED / "cells" / f"{fname}.h5ad",
            store=store,
            name=reference,
            label_key=key,
            options=BuildOptions(calibration_split=0.1, index="memory"),
        )
    return store, Atlas.open(store, reference)


class Sampler:
    """Unit vectors drawn around the classes of a real atlas: each class's centroid plus a
    Gaussian with that class's covariance, its top `rank` principal components exactly and
    the rest of its variance spread evenly over the other directions (a full-rank draw
    costs ~30x more at 20M cells and changes nothing the index sees)."""

    def __init__(self, atlas, rank: int = 32):
        classes, codes = atlas.label_codes()
        v = atlas.vectors.astype(np.float64)
        self.classes = classes.astype(str)
        self.weights = np.bincount(codes, minlength=len(classes)) / len(codes)
        self.means, self.factors, self.noise = [], [], []
        for c in range(len(classes)):
            x = v[codes == c]
            mu = x.mean(0)
            _, s, vt = np.linalg.svd((x - mu) / np.sqrt(max(len(x) - 1, 1)), full_matrices=False)
            r = min(rank, len(s))
            rest = float((s[r:] ** 2).sum()) / max(v.shape[1] - r, 1)
            self.means.append(mu.astype(np.float32))
            self.factors.append((s[:r, None] * vt[:r]).astype(np.float32))
            self.noise.append(np.float32(np.sqrt(rest)))

    def draw(self, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.choice(len(self.classes), size=n, p=self.weights)
        dim = self.means[0].shape[0]
        out = np.empty((n, dim), dtype=np.float32)
        for c in np.unique(labels):
            rows = np.flatnonzero(labels == c)
            z = rng.standard_normal((len(rows), len(self.factors[c])), dtype=np.float32)
            e = rng.standard_normal((len(rows), dim), dtype=np.float32)
            out[rows] = self.means[c] + z @ self.factors[c] + self.noise[c] * e
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out, labels


def write_phase(args) -> dict:
    """Write N synthetic cells as atlas `synth` of the real atlas's store, chunk by chunk."""
    import lance
    import pyarrow as pa

    from cellvec.cell_index.table import atlas_schema
    from cellvec.storage import META_KEY

    store, atlas = real_atlas(args.work, args.reference)
    sampler = Sampler(atlas)
    dim = atlas.dimension
    uri = Path(store) / f"atlas_{args.name}.lance"
    shutil.rmtree(uri, ignore_errors=True)
    rng = np.random.default_rng(args.seed)
    counts = np.zeros(len(sampler.classes), dtype=np.int64)

    def batches():
        done = 0
        while done < args.cells:
            m = min(args.chunk, args.cells - done)
            vecs, labels = sampler.draw(m, rng)
            counts[:] += np.bincount(labels, minlength=len(counts))
            yield pa.RecordBatch.from_arrays(
                [
                    pa.array([f"s{i:09d}" for i in range(done, done + m)], pa.string()),
                    pa.array(sampler.classes[labels], pa.string()),
                    pa.array([""] * m, pa.string()),
                    pa.array(["synthetic"] * m, pa.string()),
                    pa.FixedSizeListArray.from_arrays(pa.array(vecs.ravel()), dim),
                    pa.array([[]] * m, pa.large_list(pa.int32())),
                    pa.array([[]] * m, pa.large_list(pa.float32())),
                    pa.array(np.full(m, np.nan, dtype=np.float32)),
                ],
                schema=schema,
            )
            done += m
            print(f"  wrote {done:,} cells, peak RSS {peak_rss_mib():,.0f} MiB", file=sys.stderr)

    meta = {**atlas.meta, "n_cells": args.cells, "source": f"synthetic around {args.reference}"}
    meta["classes"] = {c: 0 for c in sampler.classes}  # counts filled in below
    meta["index"] = {"kind": "memory"}
    schema = atlas_schema(dim, meta)
    t = time.perf_counter()
    reader = pa.RecordBatchReader.from_batches(schema, batches())
    ds = lance.write_dataset(reader, str(uri), schema=schema, max_rows_per_file=args.chunk * 4)
    meta["classes"] = {c: int(n) for c, n in zip(sampler.classes, counts)}
    ds.update_schema_metadata({META_KEY.decode(): json.dumps(meta)})
    secs = time.perf_counter() - t
    return {
        "phase": "write",
        "cells": args.cells,
        "dim": dim,
        "seconds": round(secs, 1),
        "cells_per_s": round(args.cells / secs),
        "bytes_on_disk": sum(f.stat().st_size for f in uri.rglob("*") if f.is_file()),
        "peak_rss_mib": round(peak_rss_mib()),
    }


def index_phase(args) -> dict:
    from cellvec.cell_index.build import index_atlas

    store = args.work / f"store_{REFERENCES[args.reference][0]}"
    params = {k: v for k, v in (("nprobes", args.nprobes), ("refine_factor", args.refine)) if v}
    if args.partitions:
        params["num_partitions"] = args.partitions
    t = time.perf_counter()
    entry = index_atlas(store, args.name, index="disk", params=params, ray=args.ray)
    return {
        "phase": "index",
        "cells": args.cells,
        "seconds": round(time.perf_counter() - t, 1),
        "params": entry,
        "peak_rss_mib": round(peak_rss_mib()),
    }


def queries(args, atlas):
    """Query cells from the same distribution as the atlas (fresh draws, another seed)."""
    return Sampler(atlas).draw(args.queries, np.random.default_rng(args.seed + 1))[0]


def search_phase(args, kind: str) -> dict:
    """Map `--queries` cells through the disk index (kind 'disk') or the in-memory faiss
    index (kind 'memory'); neighbours are saved for the comparison with exact search."""
    from cellvec.cell_index.atlas import Atlas

    store, real = real_atlas(args.work, args.reference)
    q = queries(args, real)
    t = time.perf_counter()
    atlas = Atlas.open(store, args.name)
    if kind == "memory":
        atlas.meta["index"] = {"kind": "memory"}  # read it whole, as below the budget
        atlas = Atlas(
            name=atlas.name,
            store=atlas.store,
            meta=atlas.meta,
            _codes=atlas.label_codes(),
            version=atlas.version,
            _ds=atlas.dataset(),
            _vectors=np.ascontiguousarray(atlas.vectors),
        )
    index = atlas.index()
    ready = time.perf_counter() - t
    index.search(q[:50], K)  # warm-up: first partitions read, caches filled
    t = time.perf_counter()
    idx, sim = [], []
    for s in range(0, len(q), args.batch):
        i, d = index.search(q[s : s + args.batch], K)
        idx.append(i)
        sim.append(d)
    secs = time.perf_counter() - t
    np.savez(args.work / f"neighbours_{kind}.npz", idx=np.concatenate(idx), sim=np.concatenate(sim))
    return {
        "phase": kind,
        "cells": args.cells,
        "open_seconds": round(ready, 1),
        "queries": len(q),
        "queries_per_s": round(len(q) / secs, 1),
        "peak_rss_mib": round(peak_rss_mib()),
    }


def exact_phase(args) -> dict:
    """Exact neighbours of the first `--exact-queries` queries (a scan of every stored
    vector, one batch in memory at a time), and recall / label agreement of each path."""
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.knn import vote

    store, real = real_atlas(args.work, args.reference)
    q = queries(args, real)[: args.exact_queries]
    atlas = Atlas.open(store, args.name)
    index = atlas.index()
    t = time.perf_counter()
    ei, es = index.exact(q, K)
    secs = time.perf_counter() - t
    classes, codes = atlas.label_codes()
    truth = vote(ei, es, codes, len(classes)).argmax(1)
    out = {"phase": "exact", "queries": len(q), "seconds": round(secs, 1)}
    for kind in ("disk", "memory"):
        f = args.work / f"neighbours_{kind}.npz"
        if not f.exists():
            continue
        nb = np.load(f)
        out[kind] = compare(
            nb["idx"][: len(q)], nb["sim"][: len(q)], ei, truth, codes, len(classes)
        )
    out["peak_rss_mib"] = round(peak_rss_mib())
    return out


def sweep_phase(args) -> dict:
    """Recall@15, label agreement and queries/s of other nprobes / refine factors on the
    exact sample (the index as built; `DiskIndex.search` takes both per call)."""
    from cellvec.cell_index.atlas import Atlas
    from cellvec.cell_index.knn import vote

    store, real = real_atlas(args.work, args.reference)
    q = queries(args, real)[: args.exact_queries]
    atlas = Atlas.open(store, args.name)
    index = atlas.index()
    ei, es = index.exact(q, K)
    classes, codes = atlas.label_codes()
    truth = vote(ei, es, codes, len(classes)).argmax(1)
    parts = index.params.num_partitions
    rows = []
    for nprobes in sorted(
        {max(1, parts // 100), max(1, parts // 40), max(1, parts // 20), max(1, parts // 10)}
    ):
        for refine in (1, 5, 10, 20):
            t = time.perf_counter()
            ai, asim = index.search(q, K, nprobes=nprobes, refine=refine)
            secs = time.perf_counter() - t
            rows.append(
                {
                    "nprobes": nprobes,
                    "refine_factor": refine,
                    **compare(ai, asim, ei, truth, codes, len(classes)),
                    "queries_per_s": round(len(q) / secs, 1),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {
        "phase": "sweep",
        "partitions": parts,
        "rows": rows,
        "peak_rss_mib": round(peak_rss_mib()),
    }


def run_phase(args, phase: str) -> dict:
    """Run one phase in a child process (its own peak RSS), return its JSON line."""
    cmd = [sys.executable, __file__, "--phase", phase] + args.passthrough
    print(f"== {phase}: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    line = res.stdout.strip().splitlines()[-1]
    print(line, flush=True)
    return json.loads(line)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--reference", choices=sorted(REFERENCES), default="pbmc3k")
    ap.add_argument("--work", type=Path, default=Path("/tmp/cellvec_bench_large"))
    ap.add_argument("--name", default="synth")
    ap.add_argument("--chunk", type=int, default=250_000, help="rows generated and written at once")
    ap.add_argument("--queries", type=int, default=2_000)
    ap.add_argument("--exact-queries", type=int, default=500)
    ap.add_argument("--batch", type=int, default=500, help="query cells a search call")
    ap.add_argument(
        "--memory-max", type=int, default=2_000_000, help="largest atlas mapped in memory too"
    )
    ap.add_argument("--partitions", type=int, help="IVF partitions (default: chosen)")
    ap.add_argument("--nprobes", type=int)
    ap.add_argument("--refine", type=int, help="refine factor")
    ap.add_argument("--ray", metavar="ADDRESS", help="build the index on this Ray cluster")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-write", action="store_true", help="reuse the table of an earlier run")
    ap.add_argument("--sweep", action="store_true", help="also try other nprobes / refine factors")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic table afterwards")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.phase:
        fn = {
            "write": write_phase,
            "index": index_phase,
            "disk": lambda a: search_phase(a, "disk"),
            "memory": lambda a: search_phase(a, "memory"),
            "exact": exact_phase,
            "sweep": sweep_phase,
        }[args.phase]
        print(json.dumps(fn(args)))
        return
    args.passthrough = [a for a in sys.argv[1:] if a not in ("--skip-write", "--keep", "--sweep")]
    free = shutil.disk_usage(args.work).free
    need = args.cells * (4 * 128 + 60) * 1.3
    if free < need:
        sys.exit(f"{args.work}: {free / 2**30:.0f} GiB free, ~{need / 2**30:.0f} GiB needed.")
    for f in args.work.glob("neighbours_*.npz"):
        f.unlink()
    res = {}
    for phase in (["index"] if args.skip_write else ["write", "index"]) + ["disk"]:
        res[phase] = run_phase(args, phase)
    if args.cells <= args.memory_max:
        res["memory"] = run_phase(args, "memory")
    res["exact"] = run_phase(args, "exact")
    if args.sweep:
        res["sweep"] = run_phase(args, "sweep")
    peak = max(r["peak_rss_mib"] for r in res.values())
    summary = {
        "cells": args.cells,
        "reference": args.reference,
        "index_params": res["index"]["params"],
        "write_s": res.get("write", {}).get("seconds"),
        "index_build_s": res["index"]["seconds"],
        "disk_queries_per_s": res["disk"]["queries_per_s"],
        "disk": res["exact"].get("disk"),
        "peak_rss_mib": {k: v["peak_rss_mib"] for k, v in res.items()},
        "rss_below_4gib": peak < 4096,
    }
    if "memory" in res:
        summary["memory"] = res["exact"].get("memory")
        summary["memory_queries_per_s"] = res["memory"]["queries_per_s"]
        summary["disk_over_memory_qps"] = round(
            res["disk"]["queries_per_s"] / res["memory"]["queries_per_s"], 3
        )
        summary["disk_over_memory_peak_rss"] = round(
            res["disk"]["peak_rss_mib"] / res["memory"]["peak_rss_mib"], 3
        )
    print(json.dumps({"summary": summary}, indent=1))
    if not args.keep:
        shutil.rmtree(
            args.work / f"store_{REFERENCES[args.reference][0]}" / f"atlas_{args.name}.lance"
        )


if __name__ == "__main__":
    main()
