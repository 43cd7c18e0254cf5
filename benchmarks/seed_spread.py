"""The seed-to-seed spread of the figures tests/test_real_data.py asserts, for its floors.

A floor is there to catch a broken pipeline, not to sit on the noise: each test
runs seed 0, and its floor is set below the lowest of 5 seeds by at least the
seed-to-seed range (the same seed on another machine moves less than another
seed does). Writes results/seed_spread.md (and .json):

    python benchmarks/seed_spread.py --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, write_results  # noqa: E402
from _stores import ensure_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELLS = SHARED / "cells"


def left_out(store, source, test, label_key: str, sub: str, seed: int, key: str):
    """An atlas of the cells outside `test` less subtype `sub` (a 0.1 calibration split),
    the `test` cells mapped onto it with typicality and the mixing test at 0.01: (the
    share of `sub`'s cells unassigned and of the known cells, as `<key>.unassigned` and
    `<key>.known_unassigned`; the mapping). tests/test_real_data.py runs it for seed 0."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.mapping import map_cells

    labels = source.obs[label_key].astype(str).to_numpy()
    name = f"lo_{sub}"
    build_atlas(
        source.subset(~test & (labels != sub)),
        store=store,
        name=name,
        label_key=label_key,
        options=BuildOptions(calibration_split=0.1, seed=seed),
    )
    res = map_cells(source.subset(test), name, store=store, min_typicality=0.01, min_mixing=0.01)
    novel = labels[test] == sub
    unassigned = res.labels == "unassigned"
    figures = {
        f"{key}.unassigned": float(unassigned[novel].mean()),
        f"{key}.known_unassigned": float(unassigned[~novel].mean()),
    }
    return figures, res


def scenarios(human: Path, mouse: Path, seed: int, work: Path) -> dict[str, float]:
    """Every figure the real-data tests assert, for one seed (the tests' own set-ups)."""
    import shutil

    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.mapping import map_cells, read_label_map
    from cellvec.cell_index.readers import read_expression

    out = {}
    h, m = work / f"h{seed}", work / f"m{seed}"
    shutil.copytree(human, h)
    shutil.copytree(mouse, m)
    src = read_expression(CELLS / "pbmc_3chem.h5ad")
    donor = src.obs["donor"].astype(str).to_numpy()
    ref, query = src.subset(donor != "3pv1"), src.subset(donor == "3pv1")
    build_atlas(ref, store=h, name="chem", label_key="cell_type", options=BuildOptions(seed=seed))
    res = map_cells(query, "chem", store=h, truth_key="cell_type")
    out["cross_chemistry.accuracy"] = res.metrics["accuracy"]
    out["cross_chemistry.macro_f1"] = res.metrics["macro_f1"]
    build_atlas(
        CELLS / "pbmc3k.h5ad",
        store=h,
        name="pbmc3k",
        label_key="classified",
        options=BuildOptions(seed=seed),
    )
    res = map_cells(
        CELLS / "pbmc68k_reduced.h5ad",
        "pbmc3k",
        store=h,
        truth_key="bulk_labels",
        label_map=read_label_map(ROOT / "data" / "labelmaps" / "pbmc68k_to_pbmc3k.json"),
    )
    out["pbmc68k_to_pbmc3k.accuracy"] = res.metrics["accuracy"]
    out["pbmc68k_to_pbmc3k.B_f1"] = res.metrics["per_class"]["B"]["f1"]
    pbmc = read_expression(CELLS / "pbmc3k.h5ad")
    test = np.random.default_rng(0).random(pbmc.n_obs) < 0.3  # fixed split, as for amacrine
    out.update(left_out(h, pbmc, test, "classified", "NK", seed, "pbmc3k_leave_out_NK")[0])
    ama = read_expression(CELLS / "macosko2015_amacrine.h5ad")
    rng = np.random.default_rng(0)  # the split is fixed; only the refinement seed varies
    test = rng.random(ama.n_obs) < 0.3
    build_atlas(
        ama.subset(~test),
        store=m,
        name="ama",
        label_key="cell_type",
        options=BuildOptions(seed=seed),
    )
    q = ama.subset(test)
    res = map_cells(q, "ama", store=m, truth_key="cell_type")
    out["amacrine.macro_f1"] = res.metrics["macro_f1"]
    keep = np.random.default_rng(1).random(len(q.var_names)) < 0.3
    res = map_cells(q.subset_genes(keep), "ama", store=m, truth_key="cell_type")
    out["amacrine_panel30.macro_f1"] = res.metrics["macro_f1"]
    out.update(left_out(m, ama, test, "cell_type", "AC_12", seed, "amacrine_leave_out_AC_12")[0])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this needs the shared real data")
    logging.basicConfig(level=logging.WARNING)
    human = ensure_store(args.stores / "human", "human")
    mouse = ensure_store(args.stores / "mouse", "mouse")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            runs[seed] = scenarios(human, mouse, seed, Path(tmp))
            print(seed, json.dumps({k: round(v, 4) for k, v in runs[seed].items()}), flush=True)
    lines = [
        f"Seed-to-seed spread (seeds {args.seeds}) of the figures tests/test_real_data.py asserts.",
        "Generated by `python benchmarks/seed_spread.py`.",
        "",
        "| figure | seed 0 | min | mean | max | range |",
        "|---|---|---|---|---|---|",
    ]
    for key in runs[seeds[0]]:
        v = np.array([runs[s][key] for s in seeds])
        lines.append(
            f"| {key} | {runs[seeds[0]][key]:.3f} | {v.min():.3f} | {v.mean():.3f} | "
            f"{v.max():.3f} | {v.max() - v.min():.3f} |"
        )
    write_results(args.out, "seed_spread", lines, runs)


if __name__ == "__main__":
    main()
