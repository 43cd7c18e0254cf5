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


def one_to_one(to: str) -> dict[str, str]:
    """Upper-cased symbol -> ortholog symbol, for genes with exactly one ortholog each way."""
    import polars as pl

    df = pl.read_csv(HCOP, infer_schema_length=0).select(
        pl.col("Gene name").alias("mouse"), pl.col("Human gene name").alias("human")
    )
    df = df.drop_nulls().filter((pl.col("mouse") != "-") & (pl.col("human") != "-")).unique()
    src, dst = ("human", "mouse") if to == "mouse" else ("mouse", "human")
    df = df.filter((pl.col(src).count().over(src) == 1) & (pl.col(dst).count().over(dst) == 1))
    return {s.upper(): d for s, d in zip(df[src].to_list(), df[dst].to_list())}


def translated(adata, to: str):
    """`adata` with its genes renamed to their `to` orthologs (genes without one dropped)."""
    table = one_to_one(to)
    names = [table.get(str(g).upper()) for g in adata.var_names]
    keep = np.array([n is not None for n in names])
    out = adata[:, keep].copy()
    out.var_names = [n for n in names if n is not None]
    out.var_names_make_unique()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this needs the shared real data")
    log_progress()
    import anndata as ad

    from cellvec.cell_index.atlas import build_atlas
    from cellvec.cell_index.mapping import map_cells
    from cellvec.gene_store.orthologs import read_orthologs

    hcop = read_orthologs(HCOP)
    rows = {}
    chem = ad.read_h5ad(CELLS / "pbmc_3chem.h5ad")
    donor = chem.obs["donor"].astype(str).to_numpy()
    human = ensure_store(args.stores / "human", "human")
    build_atlas(chem[donor != "3pv1"].copy(), store=human, name="xs_chem", label_key="cell_type")
    query = chem[donor == "3pv1"].copy()
    for name, q, orth in (
        ("pbmc_3chem 3pv1 -> 3pv2+5p, human names", query, None),
        ("pbmc_3chem 3pv1 -> 3pv2+5p, as mouse names", translated(query, "mouse"), hcop),
    ):
        res = map_cells(q, "xs_chem", store=human, truth_key="cell_type", orthologs=orth)
        rows[name] = {"genes": q.n_vars, **{k: res.metrics[k] for k in ("accuracy", "macro_f1")}}
    ama = ad.read_h5ad(CELLS / "macosko2015_amacrine.h5ad")
    test = np.random.default_rng(0).random(ama.n_obs) < 0.3
    mouse = ensure_store(args.stores / "mouse", "mouse")
    build_atlas(ama[~test].copy(), store=mouse, name="xs_ama", label_key="cell_type")
    query = ama[test].copy()
    for name, q, orth in (
        ("amacrine 30% -> 70%, mouse names", query, None),
        ("amacrine 30% -> 70%, as human names", translated(query, "human"), hcop),
    ):
        res = map_cells(q, "xs_ama", store=mouse, truth_key="cell_type", orthologs=orth)
        rows[name] = {"genes": q.n_vars, **{k: res.metrics[k] for k in ("accuracy", "macro_f1")}}
    lines = [
        "Cross-species mapping through HCOP orthologs (`python benchmarks/cross_species.py`).",
        "",
        "| query | genes in the query | accuracy | macro-F1 |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {r['genes']:,} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} |"
        for n, r in rows.items()
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cross_species.md").write_text("\n".join(lines) + "\n")
    (args.out / "cross_species.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
