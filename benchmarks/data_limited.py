"""Few reference cells: cellvec against its peers at 3, 5, 10 and 20 labelled cells per class.

Each fold's reference is cut to N cells per class (the same draw for every method:
evaluate()'s data-limited scenario, seed 0, 5 stratified folds, the held-out fold as
the query), then cellvec's default (below a median class of 20 cells the reference
chooses its read-out by CV on itself, as `atlas build` does: `tune.choose_readout`),
the recipe unrefined (the text's prior alone, kNN), the random-vector control (the
default on Gaussian gene vectors), logistic regression and PCA + kNN on log expression
and CellTypist (in its own venv) label the query. Writes results/data_limited.{md,json}:

    python benchmarks/data_limited.py --out results/
    python benchmarks/data_limited.py --only amacrine --sizes 5,10 --no-celltypist   # quick

With `--summaries` the gene stores embed NCBI RefSeq summaries (the paper's text) in
the composed text too (stores `<species>_refseq` beside the others):

    python benchmarks/data_limited.py --summaries --only pbmc3k,amacrine --sizes 5,10 \
        --no-celltypist --out results/data_limited_refseq

The markdown also lists the per-class F1 of classes under 10 cells in the full-data
runs (results/<set>.json, written by evaluate_all.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, log_progress  # noqa: E402
from _stores import ensure_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELLS = SHARED / "cells"
SETS = {
    "amacrine": ("mouse", "macosko2015_amacrine.h5ad", "cell_type"),
    "pbmc3k": ("human", "pbmc3k.h5ad", "classified"),
    "pbmc_3chem": ("human", "pbmc_3chem.h5ad", "cell_type"),
}
ORDER = (
    "cellvec",
    "cellvec_unrefined",
    "random_vectors",
    "logreg_expr",
    "celltypist",
    "pca_knn",
)


def table(curves: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """One row per set and representation, one column per size; cellvec's gap to
    logistic regression below each set."""
    sizes = sorted({int(s) for c in curves.values() for v in c.values() for s in v})
    lines = [
        "| set | representation | " + " | ".join(f"{s} cells" for s in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for name, curve in curves.items():
        for rep in [r for r in ORDER if r in curve]:
            cells = [f"{curve[rep][str(s)]:.3f}" if str(s) in curve[rep] else "–" for s in sizes]
            lines.append(f"| {name} | {rep} | " + " | ".join(cells) + " |")
        if "cellvec" in curve and "logreg_expr" in curve:
            gap = [f"{curve['cellvec'][str(s)] - curve['logreg_expr'][str(s)]:+.3f}" for s in sizes]
            lines.append(f"| {name} | cellvec − logistic regression | " + " | ".join(gap) + " |")
    return lines


def rare_classes(out: Path, below: int = 10) -> list[str]:
    """Per-class F1 of classes with fewer than `below` cells in the full-data runs on disk."""
    lines = [
        "| set | class (cells) | " + " | ".join(ORDER) + " |",
        "|---|---|" + "---|" * len(ORDER),
    ]
    for name in SETS:
        f = out / f"{name}.json"
        if not f.exists():
            continue
        reps = json.loads(f.read_text())["representations"]
        per = reps["cellvec"]["per_class"]
        for cls, m in per.items():
            if m["support"] >= below:
                continue
            cells = [f"{reps[r]['per_class'][cls]['f1']:.3f}" if r in reps else "–" for r in ORDER]
            lines.append(f"| {name} | {cls} ({m['support']}) | " + " | ".join(cells) + " |")
    return lines if len(lines) > 2 else []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(SETS))
    ap.add_argument("--sizes", default="3,5,10,20", help="reference cells per class")
    ap.add_argument("--no-celltypist", action="store_true", help="skip the CellTypist peer")
    ap.add_argument(
        "--summaries", action="store_true", help="stores whose gene texts add RefSeq summaries"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this benchmark needs the shared real data")
    log_progress()
    from cellvec.evaluation.evaluate import evaluate
    from cellvec.evaluation.plan import EvaluationPlan, Scenarios

    sizes = [int(s) for s in args.sizes.split(",")]
    names = args.only.split(",") if args.only else list(SETS)
    peers = () if args.no_celltypist else ("celltypist",)
    curves, seconds, recipe = {}, {}, None
    for name in names:
        species, f, label_key = SETS[name]
        t = time.perf_counter()
        res = evaluate(
            CELLS / f,
            label_key=label_key,
            store=ensure_store(
                args.stores / (f"{species}_refseq" if args.summaries else species),
                species,
                summaries=args.summaries,
            ),
            plan=EvaluationPlan(seed=args.seed, representations=(), peers=peers),
            scenarios=Scenarios(data_limited=tuple(sizes)),
        )
        curves[name], recipe = res.data_limited, res.recipe
        seconds[name] = round(time.perf_counter() - t)
        print(f"== {name} ({seconds[name]} s)", json.dumps(res.data_limited), flush=True)
    command = "python benchmarks/data_limited.py " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    doc = {"command": command, "recipe": recipe, "seconds": seconds, "curves": curves}
    (args.out / "data_limited.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = [
        f"Generated by `{command}` (see its docstring): macro-F1 with N reference cells per "
        f"class, seed {args.seed}, 5 stratified folds, the held-out fold as the query; the same "
        "draw of reference cells for every representation.",
        "",
        *table(curves),
    ]
    rare = rare_classes(args.out)
    if rare:
        md += ["", "Per-class F1 of classes under 10 cells in the full-data runs (`<set>.json`):"]
        md += ["", *rare]
    (args.out / "data_limited.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
