"""Cross-species mapping through orthologs, measured both ways against same-species mapping.

There is no labelled pair of one tissue in two species in ../shared/data, so the
query's own species is hidden instead: its gene names are translated through the
HCOP table (one-to-one orthologs only; other genes are dropped, as a real
cross-species query lacks them), and the translated query is mapped onto the
atlas of the original species with `map_cells(..., orthologs=HCOP)`, which must
find its way back through the same table. What is lost is what the two
translations lose: genes without a one-to-one ortholog, and genes the ortholog
resolution cannot place.

- human -> mouse: pbmc_3chem 3pv1 cells, named with mouse symbols, onto an atlas
  of the 3pv2 + 5p cells (human store);
- mouse -> human: a fixed 30% of the amacrine cells, named with human symbols,
  onto an atlas of the other 70% (mouse store).

    python benchmarks/cross_species.py --out results/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, log_progress  # noqa: E402
from _stores import ensure_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELLS = SHARED / "cells"
HCOP = SHARED / "genes" / "hcop_mouse_to_human.csv.gz"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--no-celltypist", action="store_true", help="skip the CellTypist peer")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this needs the shared real data")
    log_progress()
    import anndata as ad

    from cellvec.evaluation.evaluate import evaluate
    from cellvec.gene_store.orthologs import read_orthologs

    hcop = read_orthologs(HCOP)
    peers = () if args.no_celltypist else ("celltypist",)
    chem = ad.read_h5ad(CELLS / "pbmc_3chem.h5ad")
    donor = chem.obs["donor"].astype(str).to_numpy()
    ama = ad.read_h5ad(CELLS / "macosko2015_amacrine.h5ad")
    test = np.random.default_rng(0).random(ama.n_obs) < 0.3
    runs = {
        "pbmc_3chem 3pv1 -> 3pv2+5p": (
            "human",
            "mouse",
            chem[donor != "3pv1"],
            chem[donor == "3pv1"],
        ),
        "amacrine 30% -> 70%": ("mouse", "human", ama[~test], ama[test]),
    }
    rows, tables = {}, []
    for name, (species, other, ref, query) in runs.items():
        res = evaluate(
            ref.copy(),
            label_key="cell_type",
            store=ensure_store(args.stores / species, species),
            query=query.copy(),
            skip_folds=True,
            species_swap=other,
            orthologs=hcop,
            peers=peers,
            representations=["logreg_expr", *peers, "cellvec"],
        )
        res.dataset = name
        tables.append(res.to_markdown())
        swapped = res.species_swap["transfer"]
        for label, reps, genes in (
            (f"{name}, {species} names", res.transfer, query.n_vars),
            (f"{name}, as {other} names", swapped, res.species_swap["genes"]["transfer"][0]),
        ):
            rows[label] = {
                "genes": genes,
                **{k: reps["cellvec"][k] for k in ("accuracy", "macro_f1")},
                "peers_macro_f1": {p: reps[p]["macro_f1"] for p in reps if p != "cellvec"},
            }
    names = ["logreg_expr", *peers]
    lines = [
        "Cross-species mapping through HCOP orthologs (`python benchmarks/cross_species.py`):",
        "the query renamed through one-to-one orthologs, mapped onto the reference of its own",
        "species with `orthologs=`; peers trained on the reference's genes the query keeps.",
        "",
        "| query | genes in the query | accuracy | macro-F1 | "
        + " | ".join(f"{n} macro-F1" for n in names)
        + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    lines += [
        f"| {n} | {r['genes']:,} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | "
        + " | ".join(f"{r['peers_macro_f1'][p]:.3f}" for p in names)
        + " |"
        for n, r in rows.items()
    ]
    lines += ["", "The evaluations in full:", ""] + ["\n".join(["", t]) for t in tables]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross_species.md").write_text("\n".join(lines) + "\n")
    (args.out / "cross_species.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
