"""How the mixing test (`map --min-mixing`) behaves where query and atlas come from
different chemistries or studies: the share of query cells that fail it, whether it
was applied, and the labels with and without it. Writes
results/mixing_across_batches.json:

    python benchmarks/mixing_across_batches.py

Pairs (the README's cross-dataset rows): pbmc_3chem 3pv1 onto an atlas of 3pv2 + 5p,
and pbmc68k_reduced onto pbmc3k (labels harmonised with data/labelmaps). Atlases are
built with the default recipe, seed 0, a 0.1 calibration split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, log_progress  # noqa: E402
from _stores import ensure_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELLS = SHARED / "cells"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this needs the shared real data")
    log_progress()
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.mapping import map_cells, read_label_map
    from cellvec.cell_index.readers import read_expression

    store = ensure_store(args.stores / "human", "human")
    chem = read_expression(CELLS / "pbmc_3chem.h5ad")
    donor = chem.obs["donor"].astype(str).to_numpy()
    build_atlas(
        chem.subset(donor != "3pv1"),
        store=store,
        name="mix_chem",
        label_key="cell_type",
        options=BuildOptions(calibration_split=0.1, seed=0),
    )
    build_atlas(
        CELLS / "pbmc3k.h5ad",
        store=store,
        name="mix_3k",
        label_key="classified",
        options=BuildOptions(calibration_split=0.1, seed=0),
    )
    labelmap = read_label_map(ROOT / "data" / "labelmaps" / "pbmc68k_to_pbmc3k.json")
    pairs = {
        "pbmc_3chem 3pv1 onto 3pv2 + 5p": (chem.subset(donor == "3pv1"), "mix_chem", {}),
        "pbmc68k_reduced onto pbmc3k": (
            CELLS / "pbmc68k_reduced.h5ad",
            "mix_3k",
            {"label_map": labelmap},
        ),
    }
    keys = {"mix_chem": "cell_type", "mix_3k": "bulk_labels"}
    out = {}
    for name, (query, atlas, kw) in pairs.items():
        runs = {}
        for min_mixing in (0.0, 0.01):
            res = map_cells(
                query,
                atlas,
                store=store,
                truth_key=keys[atlas],
                min_typicality=0.01,
                min_mixing=min_mixing,
                **kw,
            )
            s = res.summary()
            runs[f"min_mixing={min_mixing:g}"] = {
                "mixing": s.get("mixing"),
                "accuracy": s["accuracy"],
                "macro_f1": s["macro_f1"],
                "unassigned_fraction": s["unassigned_fraction"],
            }
        out[name] = runs
        print(name, json.dumps(runs), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "mixing_across_batches.json").write_text(
        json.dumps({"command": "python benchmarks/mixing_across_batches.py", **out}, indent=2)
    )


if __name__ == "__main__":
    main()
