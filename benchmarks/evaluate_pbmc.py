"""The results table of the README: every representation on the real PBMC sets.

Needs ../shared/data. Builds (or reuses) a human minilm store of the genes named in
the three datasets, then runs `cellvec.evaluate` with all baselines:
pbmc3k (5-fold, plus a data-limited curve), pbmc_3chem (5-fold within, and the
3pv1 cells mapped onto the 3pv2 + 5p cells with no retraining), pbmc68k_reduced
(5-fold; its X is scaled so .raw is used), and pbmc3k -> pbmc68k_reduced transfer
with the label map in data/labelmaps. Writes JSON and a markdown table.

    python benchmarks/evaluate_pbmc.py --store /tmp/pbmc_store --out results/
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def ensure_store(store: Path) -> None:
    import anndata as ad

    from cellvec.gene_store import GeneStore, build_gene_store

    if store.exists() and "minilm" in GeneStore(store).models():
        return
    names = set()
    for f in ("pbmc_3chem", "pbmc3k", "pbmc68k_reduced"):
        names |= {
            str(v).upper()
            for v in ad.read_h5ad(SHARED / "cells" / f"{f}.h5ad", backed="r").var_names
        }
    store.mkdir(parents=True, exist_ok=True)
    subset = store.parent / "human_pbmc.gene_info"
    with gzip.open(SHARED / "genes" / "human.gene_info.gz", "rt") as src, open(subset, "w") as dst:
        for i, line in enumerate(src):
            p = line.split("\t")
            if i == 0 or p[2].upper() in names or any(s.upper() in names for s in p[4].split("|")):
                dst.write(line)
    build_gene_store(
        subset, gene2go=SHARED / "genes" / "human.gene2go.gz", species="human", store=store
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", type=Path, default=Path("/tmp/cellvec_pbmc_store"))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument(
        "--only",
        help="comma-separated subset of: pbmc3k,pbmc_3chem,pbmc_3chem_cross,pbmc68k,transfer",
    )
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this evaluation needs the shared real data")
    import anndata as ad

    from cellvec.cell_index.mapping import read_label_map
    from cellvec.evaluation.evaluate import evaluate

    ensure_store(args.store)
    args.out.mkdir(parents=True, exist_ok=True)
    cells = SHARED / "cells"
    chem = ad.read_h5ad(cells / "pbmc_3chem.h5ad")
    runs = {
        "pbmc3k": dict(
            data=cells / "pbmc3k.h5ad", label_key="classified", data_limited=[5, 10, 20, 50]
        ),
        "pbmc_3chem": dict(data=cells / "pbmc_3chem.h5ad", label_key="cell_type"),
        "pbmc_3chem_cross": dict(
            data=chem[chem.obs["donor"] != "3pv1"].copy(),
            label_key="cell_type",
            query=chem[chem.obs["donor"] == "3pv1"].copy(),
        ),
        "pbmc68k": dict(data=cells / "pbmc68k_reduced.h5ad", label_key="bulk_labels"),
        "transfer": dict(
            data=cells / "pbmc3k.h5ad",
            label_key="classified",
            query=cells / "pbmc68k_reduced.h5ad",
            query_label_key="bulk_labels",
            label_map=read_label_map(ROOT / "data" / "labelmaps" / "pbmc68k_to_pbmc3k.json"),
        ),
    }
    only = set(args.only.split(",")) if args.only else set(runs)
    for name, kw in runs.items():
        if name not in only:
            continue
        t = time.perf_counter()
        res = evaluate(store=args.store, refine="supcon", baselines=True, folds=args.folds, **kw)
        d = res.to_dict(confusion=True)
        d["dataset"] = name
        res.dataset = name
        (args.out / f"{name}.json").write_text(json.dumps(d, indent=2, default=str))
        (args.out / f"{name}.md").write_text(res.to_markdown() + "\n")
        print(f"== {name} ({time.perf_counter() - t:.0f} s)\n{res.to_markdown()}\n", flush=True)


if __name__ == "__main__":
    main()
