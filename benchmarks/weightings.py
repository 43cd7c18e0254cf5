"""Within a species: how the weighting of a cell's top genes moves cellvec, over seeds.

The weighting decides most of the gap across species (`results/cross_species.md`:
`--weighting softmax` maps the Baron pancreas pair far better than the default); this
measures what each costs within a species, on the same 5 stratified folds as
`evaluate_all.py` (cellvec alone, the default recipe but for `--weighting`), for seeds
0-2 (the folds and the refinement both follow the seed) and, where the spread is widest
(pbmc_3chem), seeds 0-9; and across datasets of one species, the two pairs of
`evaluate_all.py` (pbmc_3chem 3pv1 onto 3pv2 + 5p, pbmc68k_reduced onto pbmc3k; the
seed sets the refinement). Writes `weightings.md` / `.json`: each weighting's macro-F1
and accuracy per set and seed, the mean, and the mean difference from `value` (the
default) over the seeds both have.

A weighting written `W:S` (e.g. `softmax:1.0`) is `--weighting W` with the refinement's
`--level-shift S` (the views of an atlas meant for another species).

    python benchmarks/weightings.py --out results/weightings [--weightings value sqrt]
        [--seeds 0 1 2] [--only pbmc3k,pbmc_3chem_cross,...] [--no-extra-seeds]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import MIN_CELLS, SHARED, log_progress, macro_f1_10, write_results  # noqa: E402
from _stores import ensure_store  # noqa: E402

CELLS = SHARED / "cells"
SETS = {  # name: (file, label key, species, extra seeds)
    "amacrine": ("macosko2015_amacrine", "cell_type", "mouse", ()),
    "pbmc3k": ("pbmc3k", "classified", "human", ()),
    "pbmc_3chem": ("pbmc_3chem", "cell_type", "human", (3, 4, 5, 6, 7, 8, 9)),
    "pbmc68k": ("pbmc68k_reduced", "bulk_labels", "human", ()),
}
PAIRS = ("pbmc_3chem_cross", "transfer_68k_to_3k")  # evaluate_all.runs(): human, no folds


def run(name: str, source, weighting: str, seed: int, stores: Path) -> dict:
    """cellvec's scores on set `name` with `weighting`: 5 folds of `source` (the set, read
    once), or for a pair of `PAIRS` its query mapped onto its reference (`source` the
    pair's `evaluate_all.runs()` entry). `weighting` `W:S`: `W` with `--level-shift S`."""
    from cellvec.cell_index.recipe import Recipe
    from cellvec.evaluation.evaluate import evaluate
    from cellvec.evaluation.plan import EvaluationPlan, Scenarios, Transfer

    spec = weighting
    weighting, _, shift = spec.partition(":")
    refine_options = {"level_shift": float(shift)} if shift else None
    if name in PAIRS:  # `source`: the pair's entry, its query mapped onto its reference
        data, label_key, species = source["data"], source["label_key"], "human"
        query = Transfer(source["query"], source.get("query_label_key"), source.get("label_map"))
        scenarios = Scenarios(transfer=query)
    else:
        data, (_, label_key, species, _), scenarios = source, SETS[name], None
    t = time.perf_counter()
    res = evaluate(
        data,
        label_key=label_key,
        store=ensure_store(stores / species, species),
        recipe=Recipe(weighting=weighting),
        plan=EvaluationPlan(
            seed=seed,
            representations=("cellvec",),
            skip_folds=name in PAIRS,
            refine_options=refine_options,
        ),
        scenarios=scenarios,
    )
    m = (res.transfer if name in PAIRS else res.representations)["cellvec"]
    row = {
        "set": name,
        "weighting": spec,
        "seed": seed,
        "macro_f1": round(float(m["macro_f1"]), 4),
        "accuracy": round(float(m["accuracy"]), 4),
        "macro_f1_10": macro_f1_10(m["per_class"]),  # pbmc_3chem: 3 HSC and 7 MK cells left out
        "seconds": round(time.perf_counter() - t),
    }
    print(json.dumps(row), flush=True)
    return row


def pair_runs() -> dict:
    """`evaluate_all.runs()`: the across-dataset pairs, pbmc_3chem split by donor as there."""
    import anndata as ad
    from evaluate_all import runs

    chem = ad.read_h5ad(CELLS / "pbmc_3chem.h5ad")
    donor = chem.obs["donor"].astype(str)
    return runs((chem[donor != "3pv1"].copy(), chem[donor == "3pv1"].copy()))


def table(rows: list[dict], weightings: list[str]) -> list[str]:
    by = {(r["set"], r["weighting"], r["seed"]): r for r in rows}
    out = [
        "| set | weighting | seeds | macro-F1 per seed | mean macro-F1 / accuracy "
        f"| mean difference from value (macro-F1 / accuracy) | mean macro-F1, classes of "
        f"{MIN_CELLS}+ cells (difference) |",
        "|---|---|---|---|---|---|---|",
    ]
    keys = ("macro_f1", "accuracy", "macro_f1_10")
    for name in dict.fromkeys(r["set"] for r in rows):
        for w in weightings:
            seeds = sorted(s for (n, ww, s) in by if n == name and ww == w)
            if not seeds:
                continue
            per = [by[name, w, s] for s in seeds]
            mean = [np.mean([p[k] for p in per]) for k in keys]
            both = [s for s in seeds if (name, "value", s) in by]
            diff = (
                [np.mean([by[name, w, s][k] - by[name, "value", s][k] for s in both]) for k in keys]
                if both and w != "value"
                else None
            )
            out.append(
                f"| {name} | {w} | {', '.join(map(str, seeds))} | "
                + ", ".join(f"{p['macro_f1']:.3f}" for p in per)
                + f" | {mean[0]:.3f} / {mean[1]:.3f} | "
                + (f"{diff[0]:+.3f} / {diff[1]:+.3f}" if diff else "-")
                + f" | {mean[2]:.3f}"
                + (f" ({diff[2]:+.3f})" if diff else "")
                + " |"
            )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--weightings", nargs="+", default=["value", "sqrt"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", help="comma-separated subset of " + ", ".join([*SETS, *PAIRS]))
    ap.add_argument("--no-extra-seeds", action="store_true", help="pbmc_3chem too only on --seeds")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this needs the shared real data")
    log_progress()
    from cellvec.cell_index.readers import read_expression

    rows, pairs = [], None
    for name in args.only.split(",") if args.only else [*SETS, *PAIRS]:
        if name in PAIRS:
            pairs = pairs or pair_runs()
            source, extra = pairs[name], ()
        else:
            source = read_expression(CELLS / f"{SETS[name][0]}.h5ad")
            extra = () if args.no_extra_seeds else SETS[name][3]
        rows += [
            run(name, source, w, seed, args.stores)
            for w in args.weightings
            for seed in sorted({*args.seeds, *extra})
        ]
    command = "python benchmarks/weightings.py " + " ".join(sys.argv[1:])
    lines = [
        "# Within a species: the weighting of a cell's top genes, over seeds",
        "",
        f"`{command}` (cellvec alone, the default recipe but for `--weighting`; `W:S` is",
        "`--weighting W --level-shift S`; on a set,",
        "5 stratified folds, the seed sets the folds and the refinement; on a pair of sets",
        "(`pbmc_3chem_cross`, `transfer_68k_to_3k`, as in `evaluate_all.py`), the query mapped",
        "onto the reference, the seed sets the refinement).",
        "",
        *table(rows, args.weightings),
    ]
    write_results(args.out, "weightings", lines, {"command": command, "rows": rows})


if __name__ == "__main__":
    main()
