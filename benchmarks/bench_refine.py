"""Refinement time on the CPU for 100,000 cells (target: minutes; an atlas build within 2x
of the head-only refinement it replaced).

Synthetic reference: `--cells` cells of `--classes` subtypes (a few rare), each
with ~200 top genes of which 60 come from its subtype's programme, over `--genes`
genes with 384-d gene vectors. Trains the default refinement (gene adapter +
centre + head) and, in the same run, the head alone (`adapt_genes=False`, the
shape of the refinement it replaced) for the same steps; prints both times, their
ratio, and the kNN macro-F1 of held-out cells before and after refinement.

    python benchmarks/bench_refine.py [--cells 100000] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import time

import _common  # noqa: F401 (run on cellvec's pinned numerical kernels)
import numpy as np
import scipy.sparse as sp


def _knn_macro_f1(ref, ref_y, q, q_y, k=15) -> float:
    """Macro-F1 of the distance-weighted kNN vote that mapping uses."""
    from sklearn.metrics import f1_score

    from cellvec.cell_index.knn import exact_knn, vote

    idx, sim = exact_knn(q, ref, k)
    pred = vote(idx, sim, ref_y, int(max(ref_y.max(), q_y.max())) + 1).argmax(1)
    return float(f1_score(q_y, pred, average="macro"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument(
        "--genes",
        type=int,
        default=15_000,
        help="genes measured (a 10x reference's top 200 genes span 10-20k of them)",
    )
    ap.add_argument("--steps", type=int, help="steps for both fits (default: the recipe's)")
    args = ap.parse_args()
    from cellvec.cell_index.recipe import Recipe
    from cellvec.cell_index.refine import RefineOptions, encode_weights, fit_refinement
    from cellvec.cell_index.vectors import top_n_weights
    from cellvec.gene_store.embedders.base import normalise_rows

    rng = np.random.default_rng(0)
    n, g, d = args.cells, args.genes, 384
    p = rng.dirichlet(np.full(args.classes, 0.5))
    y = rng.choice(args.classes, n, p=p)
    programmes = rng.integers(0, g, size=(args.classes, 60))  # overlapping, weakly expressed
    rows, cols, vals = [], [], []
    for c in range(args.classes):
        idx = np.flatnonzero(y == c)
        prog = np.repeat(programmes[c][None, :], len(idx), 0)
        noise = rng.integers(0, g, size=(len(idx), 140))
        genes = np.concatenate([prog, noise], 1)
        rows.append(np.repeat(idx, genes.shape[1]))
        cols.append(genes.ravel())
        vals.append(
            (rng.gamma(1.0, 1.0, genes.shape) + np.r_[np.full(60, 0.12), np.zeros(140)]).ravel()
        )
    x = sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, g)
    )
    x.sum_duplicates()
    w = top_n_weights(x, 200, "value")
    basis = rng.normal(size=(g, d)).astype(np.float32)
    test = rng.random(n) < 0.1
    # A short fit first: the first fit of a process paid for torch's warm-up (~4 s).
    fit_refinement(w[~test][:2000], basis, y[~test][:2000], options=RefineOptions(steps=20))
    t = time.perf_counter()
    options = RefineOptions(steps=args.steps)
    params, report = fit_refinement(w[~test], basis, y[~test], options=options)
    secs = time.perf_counter() - t
    t = time.perf_counter()
    head_only = Recipe(adapt_genes=False, center=False)
    fit_refinement(w[~test], basis, y[~test], recipe=head_only, options=options)
    head_secs = time.perf_counter() - t
    clean = normalise_rows(np.asarray(w @ basis, dtype=np.float32))
    ref = np.flatnonzero(~test)[:20_000]
    before = _knn_macro_f1(clean[ref], y[ref], clean[test], y[test])
    refined = encode_weights(w, basis, params)
    after = _knn_macro_f1(refined[ref], y[ref], refined[test], y[test])
    print(
        json.dumps(
            {
                "cells": n,
                "train_cells": int((~test).sum()),
                "classes": args.classes,
                "smallest_class": int(np.bincount(y).min()),
                "train_seconds": round(secs, 1),
                "head_only_seconds_same_steps": round(head_secs, 1),
                "ratio_to_head_only": round(secs / head_secs, 2),
                "steps": report["steps"],
                "test_macro_f1_unrefined": round(before, 3),
                "test_macro_f1_refined": round(after, 3),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
