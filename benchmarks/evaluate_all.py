"""The README's results: cellvec against real peers on every labelled set in ../shared/data.

One command, the same 5 stratified folds for every representation (CellTypist
included, run in its own virtual environment):

    python benchmarks/evaluate_all.py --out results/          # everything (~1-2 h on 2 cores)
    python benchmarks/evaluate_all.py --only amacrine,pbmc3k  # some sets
    python benchmarks/evaluate_all.py --representations cellvec   # just cellvec, merged in
    python benchmarks/evaluate_all.py --only pbmc3k --representations none --scenarios panels

With --representations, the run replaces just those representations (and the
scenarios it ran) in each set's JSON on disk and keeps the rest, e.g. the peers
after a change to cellvec's recipe; the JSON's `commands` list says which command
wrote what.

Within-dataset sets: macosko2015_amacrine (mouse retina, 21 amacrine subtypes),
pbmc3k, pbmc_3chem, pbmc68k_reduced. Cross-dataset pairs (no retraining):
pbmc_3chem 3pv1 mapped onto 3pv2 + 5p, and pbmc68k_reduced mapped onto pbmc3k
(labels harmonised with data/labelmaps). Scenarios on amacrine and pbmc3k (and
panels on pbmc_3chem): data-limited curve, panels with 30% / 10% of the genes,
left-out subtypes. Writes `<set>.json` / `<set>.md` per run and `summary.md`, the
table the README shows. Gene stores hold just the genes these sets name
(benchmarks/_stores.py) and are reused across runs.
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
MAIN = [
    "pca_knn",
    "logreg_expr",
    "logreg_balanced",
    "celltypist",
    "naive_mean",
    "graph_baseline",
    "random_vectors",
]
MAIN += ["cellvec_unrefined", "cellvec"]


def runs(chem_split) -> dict:
    ref3, q3 = chem_split
    labelmap = ROOT / "data" / "labelmaps" / "pbmc68k_to_pbmc3k.json"
    from cellvec.cell_index.mapping import read_label_map

    return {
        "amacrine": dict(
            species="mouse",
            data=CELLS / "macosko2015_amacrine.h5ad",
            label_key="cell_type",
            ablations=True,
            data_limited=[5, 10],
            panels=[0.3, 0.1],
            leave_out=["AC_12"],
        ),
        "pbmc3k": dict(
            species="human",
            data=CELLS / "pbmc3k.h5ad",
            label_key="classified",
            data_limited=[5, 20],
            panels=[0.3, 0.1],
            leave_out=["NK", "B"],
        ),
        "pbmc_3chem": dict(
            species="human",
            data=CELLS / "pbmc_3chem.h5ad",
            label_key="cell_type",
            panels=[0.3, 0.1],
        ),
        "pbmc68k": dict(
            species="human", data=CELLS / "pbmc68k_reduced.h5ad", label_key="bulk_labels"
        ),
        "pbmc_3chem_cross": dict(
            species="human", data=ref3, label_key="cell_type", query=q3, folds=0
        ),
        "transfer_68k_to_3k": dict(
            species="human",
            data=CELLS / "pbmc3k.h5ad",
            label_key="classified",
            query=CELLS / "pbmc68k_reduced.h5ad",
            query_label_key="bulk_labels",
            label_map=read_label_map(labelmap),
            folds=0,
        ),
    }


def summary_table(results: dict[str, dict]) -> str:
    """macro-F1 (accuracy) per set and representation; the best of each row in bold."""
    names = [n for n in MAIN if any(n in _reps(r) for r in results.values())]
    lines = [
        "| set (macro-F1 / accuracy) | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for set_name, r in results.items():
        reps = _reps(r)
        if not any(n in names for n in reps):
            continue  # a run of scenarios only: nothing for this table
        best = max(m["macro_f1"] for n, m in reps.items() if n in names)
        cells = []
        for n in names:
            if n not in reps:
                cells.append("–")
                continue
            m = reps[n]
            txt = f"{m['macro_f1']:.3f} / {m['accuracy']:.3f}"
            cells.append(f"**{txt}**" if m["macro_f1"] == best else txt)
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _merged(path: Path, new: dict, command: str) -> dict:
    """A run of some representations replaces just those in the set's result on disk
    (e.g. cellvec after a recipe change, beside peers measured on the same folds);
    `commands` says which command last wrote which representations."""
    if not path.exists():
        return new
    old = json.loads(path.read_text())
    if (old.get("folds"), old.get("label_key")) != (new.get("folds"), new.get("label_key")):
        return new
    out = dict(old)
    for key in ("representations", "transfer"):
        if new.get(key):
            out[key] = {**old.get(key, {}), **new[key]}
    scenarios = [k for k in ("data_limited", "panels", "leave_out") if new.get(k)]
    for key in scenarios:  # a scenario run replaces that scenario whole
        out[key] = new[key]
    written = sorted(new.get("transfer") or new.get("representations") or {}) + scenarios
    out["commands"] = [
        *old.get("commands", [{"command": old.get("command"), "wrote": "everything else"}]),
        {"command": command, "wrote": written, "recipe": new.get("recipe")},
    ]
    out["recipe"] = new.get("recipe", old.get("recipe"))
    return out


def _with(res, d: dict):
    """`res` showing the merged representations, for its markdown."""
    from dataclasses import replace

    return replace(
        res,
        representations=d.get("representations", {}) if not res.transfer else {},
        transfer=d.get("transfer", {}),
        data_limited=d.get("data_limited", {}),
        panels=d.get("panels", {}),
        leave_out=d.get("leave_out", {}),
    )


def _reps(r: dict) -> dict:
    return r.get("transfer") or r["representations"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--only", help="comma-separated subset of the runs")
    ap.add_argument("--no-celltypist", action="store_true", help="skip the CellTypist peer")
    ap.add_argument("--no-scenarios", action="store_true", help="plain folds and transfer only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--refine-steps", type=int, help="refinement steps (default: the recipe's own, 400+)"
    )
    ap.add_argument(
        "--representations",
        help="score only these in folds and transfer, e.g. cellvec ('none': scenarios only)",
    )
    ap.add_argument(
        "--scenarios",
        help="only these of data_limited,panels,leave_out,ablations (default: all planned; "
        "'none' with --representations)",
    )
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this evaluation needs the shared real data")
    log_progress()
    import anndata as ad

    from cellvec.evaluation.evaluate import evaluate
    from cellvec.evaluation.plan import EvaluationPlan, Scenarios, Transfer

    chem = ad.read_h5ad(CELLS / "pbmc_3chem.h5ad")
    donor = chem.obs["donor"].astype(str)
    plan = runs((chem[donor != "3pv1"].copy(), chem[donor == "3pv1"].copy()))
    only = set(args.only.split(",")) if args.only else set(plan)
    args.out.mkdir(parents=True, exist_ok=True)
    peers = () if args.no_celltypist else ("celltypist",)
    done = {}
    for name, kw in plan.items():
        if name not in only:
            continue
        kw = dict(kw)
        store = ensure_store(
            args.stores / kw.pop("species"), "human" if "pbmc" in name else "mouse"
        )
        if args.no_scenarios:
            for key in ("data_limited", "panels", "leave_out", "ablations"):
                kw.pop(key, None)
        folds = kw.pop("folds", 5)
        only_reps = None
        if args.representations:
            only_reps = [] if args.representations == "none" else args.representations.split(",")
        keep = args.scenarios.split(",") if args.scenarios else (["none"] if only_reps else None)
        for key in ("data_limited", "panels", "leave_out", "ablations"):
            if keep is not None and key not in keep:
                kw.pop(key, None)
        evaluation_plan = EvaluationPlan(
            folds=folds or 5,
            seed=args.seed,
            representations=only_reps,
            baselines=True,
            peers=peers,
            ablations=kw.pop("ablations", False),
            skip_folds=folds == 0,
            refine_options={"steps": args.refine_steps} if args.refine_steps else None,
        )
        query = kw.pop("query", None)
        transfer = None
        if query is not None:
            transfer = Transfer(query, kw.pop("query_label_key", None), kw.pop("label_map", None))
        data, label_key = kw.pop("data"), kw.pop("label_key")
        t = time.perf_counter()
        res = evaluate(
            data,
            label_key=label_key,
            store=store,
            plan=evaluation_plan,
            scenarios=Scenarios(transfer=transfer, **kw),  # data_limited, panels, leave_out
        )
        res.dataset = name
        d = res.to_dict(confusion=True)
        command = "python benchmarks/evaluate_all.py " + " ".join(sys.argv[1:])
        d["command"] = command
        if only_reps is not None:
            d = _merged(args.out / f"{name}.json", d, command)
            res = _with(res, d)
        (args.out / f"{name}.json").write_text(json.dumps(d, indent=2, default=str))
        (args.out / f"{name}.md").write_text(res.to_markdown() + "\n")
        print(f"== {name} ({time.perf_counter() - t:.0f} s)\n{res.to_markdown()}\n", flush=True)
        done[name] = d
    # the summary covers every set with a result on disk, so runs can be made piecewise
    results = {}
    for name in plan:
        f = args.out / f"{name}.json"
        if f.exists():
            results[name] = json.loads(f.read_text())
    table = summary_table(results)
    (args.out / "summary.md").write_text(
        "Generated by `python benchmarks/evaluate_all.py` (see its docstring).\n\n" + table + "\n"
    )
    print(table)


if __name__ == "__main__":
    main()
