"""Refinement settings compared on the labelled sets, several seeds each.

Each fit is exactly what `fit_encoder` trains in one fold of `cellvec evaluate`
(top-1,000 weights over whitened gene vectors, the same 5 stratified folds, seed
0 folds) and is scored by the mapping's distance-weighted kNN vote (k 5, 10, 15)
in the refined space. Two stages, so the fits can run on a machine with many
cores and no gene store:

    python benchmarks/refine_variants.py export [--dir DIR]       # needs ../shared/data and the stores
    python benchmarks/refine_variants.py run ROUND [--dir DIR] [--procs N]
    python benchmarks/refine_variants.py table                    # results/refine_variants.md

`run` needs only numpy, scipy, scikit-learn, torch and this checkout's src/
(the store and readers are kept out), one process per fit, one torch thread
each. ROUND is a key of VARIANTS below; its JSON goes to
results/refine_variants/ROUND.json. Every variant spells out the settings it
changes from the old defaults, so the rounds stay reproducible after the
defaults moved to the winner.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "refine_variants"
SETS = ["amacrine", "pbmc3k", "pbmc_3chem", "pbmc68k"]
OLD = {"schedule": "constant", "balance": 1.0, "temperature": 0.1}  # before dcb97f4
NEW = {"schedule": "cosine", "balance": 0.5, "temperature": 0.2}  # the defaults since
SEEDS = [0, 1, 2]
VARIANTS = {
    "round1": {
        "base": {**OLD, "seeds": SEEDS},
        "s800": {**OLD, "steps": 800},
        "s800cos": {**OLD, "steps": 800, "schedule": "cosine"},
        "s400cos": {**OLD, "schedule": "cosine"},
        "s1200cos": {**OLD, "steps": 1200, "schedule": "cosine"},
        "bal05": {**OLD, "balance": 0.5},
        "bal05s800cos": {**OLD, "balance": 0.5, "steps": 800, "schedule": "cosine"},
        "t07": {**OLD, "temperature": 0.07},
        "t02": {**OLD, "temperature": 0.2},
        "dp01": {**OLD, "delta_penalty": 0.1},
        "dp10": {**OLD, "delta_penalty": 10.0},
        "drop0005": {**OLD, "dropout": [0.0, 0.5]},
        "lr3e3": {**OLD, "lr": 0.003},
        "bs512": {**OLD, "batch_size": 512},
    },
    "round2": {
        "cos": {**OLD, "schedule": "cosine", "seeds": SEEDS},
        "cos_bal05": {**OLD, "schedule": "cosine", "balance": 0.5, "seeds": SEEDS},
        "cos_t02": {**OLD, "schedule": "cosine", "temperature": 0.2, "seeds": SEEDS},
        "cos_bal05_t02": {**NEW, "seeds": SEEDS},
        "cos_drop0005": {**OLD, "schedule": "cosine", "dropout": [0.0, 0.5], "seeds": SEEDS},
    },
    "round3": {
        "cbt_s800": {**NEW, "steps": 800, "seeds": SEEDS},
        "cb75t02": {**NEW, "balance": 0.75, "seeds": SEEDS},
        "cbt03": {**NEW, "temperature": 0.3, "seeds": SEEDS},
        "cbt_lr2e3": {**NEW, "lr": 0.002, "seeds": SEEDS},
    },
}


def export(folder: Path) -> None:
    """Each set's top-1,000 weights, whitened gene vectors, labels and folds."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import SHARED
    from _stores import ensure_store

    from cellvec.cell_index.background import apply_background, fit_background
    from cellvec.cell_index.labels import labels_of
    from cellvec.cell_index.readers import read_expression
    from cellvec.cell_index.recipe import Recipe
    from cellvec.cell_index.vectors import GeneBasis, match_dataset_genes, weights_matrix
    from cellvec.gene_store.store import GeneStore
    from cellvec.metrics import folds

    cells = SHARED / "cells"
    plan = {
        "amacrine": ("mouse", cells / "macosko2015_amacrine.h5ad", "cell_type"),
        "pbmc3k": ("human", cells / "pbmc3k.h5ad", "classified"),
        "pbmc_3chem": ("human", cells / "pbmc_3chem.h5ad", "cell_type"),
        "pbmc68k": ("human", cells / "pbmc68k_reduced.h5ad", "bulk_labels"),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, (species, path, key) in plan.items():
        gs = GeneStore(ensure_store(Path("/tmp/cellvec_eval_stores") / species, species))
        genes = gs.load(gs.default_model())
        src = read_expression(path)
        y = np.asarray(labels_of(src, key)).astype(str)
        recipe = Recipe(model=genes.model, top_genes=1000)
        cols, rows = match_dataset_genes(src.var_names, genes, str(path))
        vecs = apply_background(genes.vectors[rows], fit_background(genes.vectors[rows], "whiten"))
        basis = GeneBasis(cols, rows, vecs, len(src.var_names))
        w = sp.csr_matrix(weights_matrix(src, basis, recipe)[:, cols])
        classes, codes = np.unique(y, return_inverse=True)
        tests = {f"test{i}": te for i, (_, te) in enumerate(folds(y, 5, 0))}
        np.savez_compressed(
            folder / f"{name}.npz",
            **dict(data=w.data, indices=w.indices, indptr=w.indptr, shape=np.array(w.shape)),
            vecs=vecs.astype(np.float32),
            codes=codes,
            classes=classes,
            **tests,
        )
        print(f"{name}: {w.shape[0]} cells, {w.shape[1]} genes, {len(classes)} classes")


def _light_imports() -> None:
    """Import refinement without the store and readers (lancedb, anndata)."""
    src = ROOT / "src"
    sys.path.insert(0, str(src))
    pkg = types.ModuleType("cellvec.gene_store")
    pkg.__path__ = [str(src / "cellvec" / "gene_store")]
    sys.modules.setdefault("cellvec.gene_store", pkg)
    vectors = types.ModuleType("cellvec.cell_index.vectors")

    def weighted_mean(w, gene_vectors, cell_mean=None):
        from cellvec.gene_store.embedders.base import normalise_rows

        v = np.asarray(w @ gene_vectors, dtype=np.float32)
        if cell_mean is not None:
            v -= cell_mean
        return normalise_rows(v)

    vectors.weighted_mean = weighted_mean
    sys.modules.setdefault("cellvec.cell_index.vectors", vectors)


_DATA: dict = {}


def _load(folder: Path, name: str):
    if name not in _DATA:
        z = np.load(folder / f"{name}.npz", allow_pickle=True)
        w = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=tuple(z["shape"]))
        _DATA[name] = (w, z["vecs"], z["codes"], [z[f"test{i}"] for i in range(5)])
    return _DATA[name]


def _fit(job):
    folder, settings, name, ds, fold, seed = job
    _light_imports()
    from cellvec.cell_index.refine import RefineOptions, encode_weights, fit_refinement

    w, vecs, codes, tests = _load(folder, ds)
    te = tests[fold]
    tr = np.setdiff1d(np.arange(w.shape[0]), te)
    kw = {k: v for k, v in settings.items() if k != "seeds"}
    if "dropout" in kw:
        kw["dropout"] = tuple(kw["dropout"])
    t = time.perf_counter()
    params, _ = fit_refinement(w[tr], vecs, codes[tr], options=RefineOptions(**kw), seed=seed)
    ref, query = encode_weights(w[tr], vecs, params), encode_weights(w[te], vecs, params)
    return (name, ds, fold, seed), ref, query, time.perf_counter() - t


def run(round_name: str, folder: Path, procs: int) -> dict:
    from sklearn.metrics import f1_score

    _light_imports()
    from cellvec.cell_index.knn import vote

    variants = VARIANTS[round_name]
    jobs = [
        (folder, v, name, ds, fold, seed)
        for name, v in variants.items()
        for ds in SETS
        for fold in range(5)
        for seed in v.get("seeds", [0])
    ]
    t0 = time.perf_counter()
    with Pool(procs) as pool:
        done = pool.map(_fit, jobs, chunksize=1)
    enc = {key: (ref, q) for key, ref, q, _ in done}
    results: dict[str, dict] = {}
    for name, v in variants.items():
        seeds = v.get("seeds", [0])
        for ds in SETS:
            _, _, codes, tests = _load(folder, ds)
            combos = [[s] for s in seeds] + ([seeds] if len(seeds) > 1 else [])
            for combo in combos:  # one seed, and the seeds' vectors side by side
                for k in (5, 10, 15):
                    pred = np.empty(len(codes), dtype=int)
                    for fold in range(5):
                        te = tests[fold]
                        tr = np.setdiff1d(np.arange(len(codes)), te)
                        ref = np.hstack([enc[(name, ds, fold, s)][0] for s in combo])
                        q = np.hstack([enc[(name, ds, fold, s)][1] for s in combo])
                        sim = q @ ref.T / len(combo)
                        idx = np.argsort(-sim, 1)[:, :k]
                        scores = vote(
                            idx, np.take_along_axis(sim, idx, 1), codes[tr], codes.max() + 1
                        )
                        pred[te] = scores.argmax(1)
                    key = f"{name}|{'+'.join(map(str, combo))}|k{k}"
                    f1 = f1_score(codes, pred, average="macro")
                    results.setdefault(key, {})[ds] = round(float(f1), 4)
    for r in results.values():
        r["mean"] = round(float(np.mean([r[d] for d in SETS])), 4)
    return {
        "round": round_name,
        "variants": variants,
        "results": results,
        "wall_seconds": round(time.perf_counter() - t0),
        "command": f"python benchmarks/refine_variants.py run {round_name} --procs {procs}",
    }


def table() -> str:
    """Seed-averaged macro-F1 (k 15) of every variant with three seeds, best first."""
    rows = []
    for f in sorted(OUT.glob("round*.json")):
        res = json.loads(f.read_text())["results"]
        names = {key.split("|")[0] for key in res}
        for name in names:
            per_seed = [res[f"{name}|{s}|k15"] for s in SEEDS if f"{name}|{s}|k15" in res]
            if len(per_seed) < len(SEEDS):
                continue
            mean = {d: np.mean([r[d] for r in per_seed]) for d in [*SETS, "mean"]}
            rows.append((mean["mean"], name, f.stem, mean, min(r["mean"] for r in per_seed)))
    lines = [
        "Refinement settings, macro-F1 (5 folds, k 15) averaged over seeds 0-2; "
        "`python benchmarks/refine_variants.py table` over results/refine_variants/*.json "
        "(each file names its command and machine). Round 1's single-seed variants "
        "are in round1.json; only variants run with all three seeds are ranked here.",
        "",
        "| variant | round | " + " | ".join(SETS) + " | mean | worst seed's mean |",
        "|---|---|" + "---|" * (len(SETS) + 2),
    ]
    for _, name, rnd, mean, worst in sorted(rows, reverse=True):
        cells = " | ".join(f"{mean[d]:.3f}" for d in SETS)
        lines.append(f"| {name} | {rnd} | {cells} | {mean['mean']:.4f} | {worst:.4f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["export", "run", "table"])
    ap.add_argument("round", nargs="?", choices=list(VARIANTS))
    ap.add_argument("--dir", type=Path, default=Path("/tmp/cellvec_refine_variants"))
    ap.add_argument("--procs", type=int, default=os.cpu_count())
    args = ap.parse_args()
    if args.stage == "export":
        export(args.dir)
    elif args.stage == "run":
        if not args.round:
            ap.error("run needs a ROUND: " + ", ".join(VARIANTS))
        out = run(args.round, args.dir, args.procs)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / f"{args.round}.json").write_text(json.dumps(out, indent=1))
        print(f"{args.round}: {out['wall_seconds']} s")
    else:
        text = table()
        (ROOT / "results" / "refine_variants.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
