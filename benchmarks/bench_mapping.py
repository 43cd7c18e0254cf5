"""Bulk mapping: 100,000 query cells onto a 1,000,000-cell atlas, next to exact search.

Vectors: synthetic clustered unit vectors shaped like refined cell vectors (128-d,
`--classes` subtypes of unequal size, within-class spread drawn per class). Query
cells come from the same distribution. Reports wall time of cellvec's path (faiss
IVF build + search + vote) and of sklearn's exact brute-force search on the same
queries, recall@k of the ANN neighbours, and agreement of the voted labels with
the exact-KNN labels (target >= 0.99).

    python benchmarks/bench_mapping.py [--atlas 1000000] [--queries 100000] [--exact-queries 100000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_mib  # noqa: E402


def clustered(
    n: int, centres: np.ndarray, spread: np.ndarray, weights: np.ndarray, rng
) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.choice(len(centres), size=n, p=weights)
    x = centres[labels] + spread[labels, None] * rng.standard_normal(
        (n, centres.shape[1]), dtype=np.float32
    )
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--atlas", type=int, default=1_000_000)
    ap.add_argument("--queries", type=int, default=100_000)
    ap.add_argument(
        "--exact-queries",
        type=int,
        default=5_000,
        help="queries given to the exact searches (sklearn brute force on all 100k x 1M takes ~1 h here; "
        "its time for all queries is projected linearly)",
    )
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--classes", type=int, default=40)
    ap.add_argument("-k", type=int, default=15)
    args = ap.parse_args()

    from sklearn.neighbors import NearestNeighbors

    from cellvec.cell_index.knn import IVFIndex, exact_knn, vote

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    spread = rng.uniform(0.06, 0.14, args.classes).astype(
        np.float32
    )  # within-class cosine ~0.3-0.7
    weights = rng.dirichlet(np.full(args.classes, 0.7))
    ref, ref_y = clustered(args.atlas, centres, spread, weights, rng)
    q, _ = clustered(args.queries, centres, spread, weights, rng)
    out = {
        "atlas_cells": args.atlas,
        "queries": args.queries,
        "dim": args.dim,
        "k": args.k,
        "classes": args.classes,
    }

    t = time.perf_counter()
    index = IVFIndex(ref)
    out["ivf_build_s"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    ai, asim = index.search(q, args.k)
    ann_labels = vote(ai, asim, ref_y, args.classes).argmax(1)
    out["ivf_search_vote_s"] = round(time.perf_counter() - t, 1)
    out["cellvec_total_s"] = round(out["ivf_build_s"] + out["ivf_search_vote_s"], 1)
    out["nlist"], out["nprobe"] = index.nlist, index.index.nprobe

    m = min(args.exact_queries or args.queries, args.queries)
    sub = np.arange(m)
    t = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=args.k, algorithm="brute", metric="cosine").fit(ref)
    dist, ei = nn.kneighbors(q[sub])
    sk = time.perf_counter() - t
    out["exact_queries"] = m
    out["sklearn_exact_s"] = round(sk, 1)
    out["sklearn_exact_projected_all_s"] = round(sk * args.queries / m, 1)
    t = time.perf_counter()
    ni, _ = exact_knn(q[sub], ref, args.k)
    out["faiss_exact_s"] = round(time.perf_counter() - t, 1)
    exact_labels = vote(ei, 1 - dist, ref_y, args.classes).argmax(1)
    recall = np.mean([len(set(a) & set(e)) / args.k for a, e in zip(ai[sub], ei)])
    out["recall_at_k"] = round(float(recall), 4)
    out["label_agreement_with_exact"] = round(float(np.mean(ann_labels[sub] == exact_labels)), 4)
    out["speedup_vs_sklearn_projected"] = round(
        out["sklearn_exact_projected_all_s"] / out["cellvec_total_s"], 1
    )
    _ = ni
    out["peak_rss_mib"] = round(peak_rss_mib())
    out["target"] = "label agreement >= 0.99"
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
