"""CellTypist 1.7.1 against the expression baselines, on the folds cellvec's evaluation uses.

For each labelled set in ../shared/data/cells: 5-fold CV with `folds(y, 5, seed=0)` from
`cellvec.metrics` (the same splits `cellvec evaluate` scores), and the two
cross-dataset pairs: pbmc_3chem 3pv1 mapped from 3pv2 + 5p, and pbmc68k_reduced mapped onto
pbmc3k through data/labelmaps/pbmc68k_to_pbmc3k.json. Peers: `celltypist` (its default
training, best-match labels, in its own venv; see README.md), `logreg_expr` and `pca_knn`
(`expression_baseline`, k=15); with --feature-selection also `celltypist_fs` (CellTypist's
two-pass feature selection, as in its tutorials). Writes peers.json and peers.md under --out.

    nice -n 10 python benchmarks/peers/run_peers.py --out results/peers
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _common import SHARED  # noqa: E402

from cellvec import metrics  # noqa: E402
from cellvec.cell_index.labels import known_labels, labels_of  # noqa: E402
from cellvec.cell_index.mapping import read_label_map  # noqa: E402
from cellvec.cell_index.readers import read_expression  # noqa: E402
from cellvec.evaluation import peers  # noqa: E402
from cellvec.evaluation.baselines import expression_baseline  # noqa: E402
from cellvec.metrics import classification_metrics  # noqa: E402

log = logging.getLogger("run_peers")

SETS = {  # file stem -> label column
    "pbmc3k": "classified",
    "pbmc_3chem": "cell_type",
    "pbmc68k_reduced": "bulk_labels",
    "macosko2015_amacrine": "cell_type",
}
PEERS = ("celltypist", "logreg_expr", "pca_knn")
CROSS = ("pbmc_3chem:3pv1<-3pv2+5p", "pbmc68k_reduced->pbmc3k")


def load(stem: str, label_map: dict | None = None):
    """(log-normalised CSR, gene names, labels, source) of the labelled cells of one set."""
    source = read_expression(SHARED / "cells" / f"{stem}.h5ad")
    keep = known_labels(source, SETS[stem])
    if not keep.all():
        source = source.subset(keep)
    y = labels_of(source, SETS[stem], label_map=label_map)
    return source.to_csr(), list(source.var_names), y, source


def predict(peer, x_tr, y_tr, x_te, genes, *, k, seed, python, test_genes=None, common=None):
    """One peer's labels. `common`: (train cols, test cols) of the shared genes, for the
    expression baselines when the query's genes differ; CellTypist gets all of both."""
    if peer.startswith("celltypist"):
        return peers.celltypist_predict(
            x_tr,
            y_tr,
            x_te,
            genes,
            test_var_names=test_genes,
            seed=seed,
            feature_selection=peer == "celltypist_fs",
            python=python,
        )
    if common is not None:
        x_tr, x_te = x_tr[:, common[0]], x_te[:, common[1]]
    return expression_baseline(peer, x_tr, y_tr, x_te, k, seed)


def scored(truth, pred, seconds: list[float]) -> dict:
    m = classification_metrics(truth, pred)
    m.pop("confusion")
    return {
        **m,
        "seconds": round(sum(seconds), 2),
        "seconds_per_fold": [round(s, 2) for s in seconds],
    }


def cross_validate(stem: str, names, *, folds: int, k: int, seed: int, python) -> dict:
    x, genes, y, _ = load(stem)
    splits = metrics.folds(y, folds, seed)
    out = {
        "n_cells": int(x.shape[0]),
        "n_genes": len(genes),
        "n_classes": int(len(np.unique(y))),
        "folds": folds,
        "peers": {},
    }
    for peer in names:
        pred, seconds = np.empty(len(y), dtype=object), []
        for i, (tr, te) in enumerate(splits):
            t0 = time.perf_counter()
            pred[te] = predict(peer, x[tr], y[tr], x[te], genes, k=k, seed=seed, python=python)
            seconds.append(time.perf_counter() - t0)
            log.info("%s %s fold %d/%d: %.1f s", stem, peer, i + 1, folds, seconds[-1])
        out["peers"][peer] = scored(y, pred, seconds)
        log.info("%s %-12s macro-F1 %.3f", stem, peer, out["peers"][peer]["macro_f1"])
    return out


def cross_dataset(name: str, names, *, k: int, seed: int, python) -> dict:
    if name.startswith("pbmc_3chem"):
        x, genes, y, source = load("pbmc_3chem")
        query = (source.obs["donor"].astype(str) == "3pv1").to_numpy()
        x_ref, y_ref, ref_genes = x[~query], y[~query], genes
        x_q, y_q, q_genes = x[query], y[query], genes
    else:
        label_map = read_label_map(ROOT / "data" / "labelmaps" / "pbmc68k_to_pbmc3k.json")
        x_ref, ref_genes, y_ref, _ = load("pbmc3k")
        x_q, q_genes, y_q, _ = load("pbmc68k_reduced", label_map=label_map)
    q_pos = {g: i for i, g in enumerate(q_genes)}
    shared = [g for g in ref_genes if g in q_pos]
    ref_pos = {g: i for i, g in enumerate(ref_genes)}
    common = ([ref_pos[g] for g in shared], [q_pos[g] for g in shared])
    out = {
        "n_reference": int(x_ref.shape[0]),
        "n_query": int(x_q.shape[0]),
        "reference_genes": len(ref_genes),
        "query_genes": len(q_genes),
        "shared_genes": len(shared),
        "query_labels_not_in_reference": sorted(set(y_q) - set(y_ref)),
        "peers": {},
    }
    for peer in names:
        t0 = time.perf_counter()
        pred = predict(
            peer,
            x_ref,
            y_ref,
            x_q,
            ref_genes,
            k=k,
            seed=seed,
            python=python,
            test_genes=q_genes,
            common=common,
        )
        out["peers"][peer] = scored(y_q, pred, [time.perf_counter() - t0])
        log.info("%s %-12s macro-F1 %.3f", name, peer, out["peers"][peer]["macro_f1"])
    return out


def peer_versions(python) -> dict:
    out = subprocess.run(
        [str(python), "-c", peers._CHECK], capture_output=True, text=True, env=peers._clean_env()
    )
    return json.loads(out.stdout) if out.returncode == 0 else {}


def to_markdown(result: dict) -> str:
    def cells(m):
        return f"{m['macro_f1']:.3f} / {m['accuracy']:.3f}"

    names = result["peers"]
    v = result["celltypist_env"]
    lines = [
        f"CellTypist {v.get('celltypist', '?')} (scikit-learn {v.get('scikit-learn', '?')}, "
        f"own venv) vs expression baselines, seed {result['seed']}, k={result['k']}. "
        "Cells: macro-F1 / accuracy.",
        "",
        f"| set ({result['folds']}-fold CV) | cells | classes | "
        + " | ".join(names)
        + " | CellTypist s/fold |",
        "|---|---|---|" + "---|" * (len(names) + 1),
    ]
    for stem, r in result["cross_validation"].items():
        ct = r["peers"]["celltypist"]["seconds_per_fold"]
        lines.append(
            f"| {stem} | {r['n_cells']:,} | {r['n_classes']} | "
            + " | ".join(cells(r["peers"][p]) for p in names)
            + f" | {np.mean(ct):.1f} ({min(ct):.1f}-{max(ct):.1f}) |"
        )
    if result["cross_dataset"]:
        lines += [
            "",
            "| cross-dataset (query <- reference) | query cells | shared genes | "
            + " | ".join(names)
            + " | CellTypist s |",
            "|---|---|---|" + "---|" * (len(names) + 1),
        ]
        for name, r in result["cross_dataset"].items():
            lines.append(
                f"| {name} | {r['n_query']:,} | {r['shared_genes']:,} | "
                + " | ".join(cells(r["peers"][p]) for p in names)
                + f" | {r['peers']['celltypist']['seconds']:.1f} |"
            )
    lines += [
        "",
        "s/fold includes starting the peer venv's python and importing celltypist (scanpy).",
    ]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "peers")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--k", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--venv", type=Path, help="the peer venv (default: $CELLVEC_PEERS_VENV or cache)"
    )
    ap.add_argument(
        "--feature-selection",
        action="store_true",
        help="also run celltypist_fs: CellTypist with feature_selection=True (its tutorials' setting)",
    )
    ap.add_argument(
        "--only",
        help="comma-separated subset of: " + ",".join(list(SETS) + list(CROSS)),
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not SHARED.exists():
        sys.exit(f"real data not found at {SHARED}")
    wanted = set(args.only.split(",")) if args.only else set(SETS) | set(CROSS)
    names = PEERS + (("celltypist_fs",) if args.feature_selection else ())
    python = peers.peer_env(args.venv)
    t0 = time.perf_counter()
    result = {
        "seed": args.seed,
        "k": args.k,
        "folds": args.folds,
        "peers": names,
        "celltypist_env": peer_versions(python),
        "cross_validation": {
            s: cross_validate(s, names, folds=args.folds, k=args.k, seed=args.seed, python=python)
            for s in SETS
            if s in wanted
        },
        "cross_dataset": {
            c: cross_dataset(c, names, k=args.k, seed=args.seed, python=python)
            for c in CROSS
            if c in wanted
        },
    }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "peers.json").write_text(json.dumps(result, indent=2))
    md = to_markdown(result)
    (args.out / "peers.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
