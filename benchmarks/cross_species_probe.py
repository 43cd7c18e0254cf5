"""Where cellvec loses the species gap on the Baron pair: one probe at each stage of a cell's path.

A cell goes expression -> its top genes' weights (`--top-genes`, `--weighting`) -> the
weighted mean of their text vectors (the unrefined vector: adapted genes, centred) ->
the refined vector (the head) -> the kNN vote. At each stage the same probe is fitted on
the reference's cells alone and predicts the other species' cells: logistic regression on
the features as they are (no scaling: standardising lifts genes whose small levels differ
between species, and it cost the expression probe 0.08-0.11 of macro-F1 over the classes of 10+ cells here), C chosen by
3-fold cross-validation on the reference (macro-F1), as the peer `logreg_expr` of
`cross_species.py` but for C. The probe's features come from the atlas cellvec builds (default
recipe but for `--weighting`, `--calibration-split 0.1`); the query goes through the same
gene matching (`--orthologs hcop_mouse_to_human.csv.gz`, paralogs folded). A stage whose
probe scores far below the one before it is where the species part is lost. No query
label is used but to score.

    python benchmarks/cross_species_probe.py --out results/ [--weightings value softmax]
        [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
import cross_species as xs  # noqa: E402
from _common import MIN_CELLS, log_progress, write_results  # noqa: E402
from _stores import ensure_named_store  # noqa: E402

STAGES = (
    ("expression", "log-normalised expression of the atlas's genes"),
    ("weights", "top-gene weights (x top_genes, so an average gene is 1)"),
    ("unrefined", "unrefined cell vectors (text vectors averaged)"),
    ("refined", "refined cell vectors (the head)"),
    ("knn", "cellvec's own call (kNN vote on refined vectors)"),
)


def probe(x_ref, y, x_query, seed: int) -> np.ndarray:
    """Logistic regression fitted on the reference alone (features unscaled, C by 3-fold
    CV on macro-F1), the query's predicted labels."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold

    model = LogisticRegressionCV(
        Cs=[0.01, 0.1, 1.0, 10.0, 100.0, 1000.0],
        cv=StratifiedKFold(3, shuffle=True, random_state=seed),
        scoring="f1_macro",
        max_iter=5000,
    )
    return model.fit(x_ref, y).predict(x_query)


def in_atlas_genes(source, basis, n_genes: int, transform) -> sp.csr_matrix:
    """`transform(basis, chunk)` (cells x the dataset's columns) of each chunk of `source`,
    placed at the atlas's genes (`basis.positions`): both species in one gene space."""
    parts = []
    for _, x in source.chunks(20_000):
        m = sp.csc_matrix(transform(basis, x))[:, basis.columns].tocoo()
        parts.append(
            sp.csr_matrix((m.data, (m.row, basis.positions[m.col])), shape=(m.shape[0], n_genes))
        )
    return sp.vstack(parts, format="csr")


def stages(atlas, ref, query, hcop) -> dict:
    """Each stage's features of the reference and the query: {stage: (x_ref, x_query)}."""
    from cellvec.cell_index.readers import read_expression
    from cellvec.cell_index.refine import apply_head

    enc = atlas.encoder()
    n_genes = len(enc.refinement["gene_rows"])
    sources = read_expression(ref), read_expression(query)
    bases = (
        enc.basis(sources[0].var_names, "reference"),
        enc.basis(sources[1].var_names, "query", orthologs=hcop),
    )
    top = enc.recipe.top_genes

    def expression(basis, x):
        return basis.combine(x)

    def weights(basis, x):
        return basis.top_weights(x, enc.recipe) * top

    out = {}
    for stage, fn in (("expression", expression), ("weights", weights)):
        out[stage] = tuple(in_atlas_genes(s, b, n_genes, fn) for s, b in zip(sources, bases))
    out["unrefined"] = tuple(enc.unrefined(s, b) for s, b in zip(sources, bases))
    out["refined"] = tuple(apply_head(enc.refinement, u) for u in out["unrefined"])
    return out


def run(stores: Path, weightings, seed: int) -> dict:
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.mapping import map_cells
    from cellvec.cell_index.recipe import Recipe
    from cellvec.gene_store.orthologs import read_orthologs

    hcop = read_orthologs(xs.HCOP)
    res = {}
    for species, other in (("human", "mouse"), ("mouse", "human")):
        ref, query = xs.baron(species, other)
        known = set(ref.obs["label"])
        truth = query.obs["label"].to_numpy().astype(str)
        y = ref.obs["label"].to_numpy().astype(str)
        given = xs.carried(ref), xs.carried(query)
        store = ensure_named_store(stores, f"baron_{species}")
        key = f"{other} onto {species}"
        for weighting in weightings:
            t = time.perf_counter()
            atlas = build_atlas(
                given[0],
                store=store,
                name=f"probe_{species}_{weighting}",
                label_key="label",
                recipe=Recipe(weighting=weighting),
                options=BuildOptions(calibration_split=0.1, seed=seed),
            )
            rows = {}
            for stage, (x_ref, x_query) in stages(atlas, *given, hcop).items():
                rows[stage] = xs.baron_row(truth, known, probe(x_ref, y, x_query, seed))
            rows["knn"] = xs.baron_row(
                truth, known, map_cells(given[1], atlas, orthologs=hcop).labels
            )
            rows["seconds"] = round(time.perf_counter() - t)
            res.setdefault(key, {})[weighting] = rows
            print(key, weighting, json.dumps({s: rows[s]["macro_f1_10"] for s, _ in STAGES}))
    return res


def lines(res: dict, seed: int, command: str) -> list[str]:
    out = [
        "# Cross-species: where the species gap is lost, stage by stage",
        "",
        f"`{command}`: the Baron pair, an atlas of one species (seed {seed}, "
        "`--calibration-split 0.1`), the other species mapped with `--orthologs`. At each "
        "stage a logistic regression fitted on the reference alone (features unscaled, C by "
        "3-fold CV) predicts the query; the last row is "
        "cellvec's own call. Macro-F1 / accuracy over the shared classes, and macro-F1 over "
        f"the shared classes of {MIN_CELLS}+ query cells (schwann and t_cell have 2-7):",
        "",
    ]
    for key, by_w in res.items():
        out += [
            f"**{key}**",
            "",
            "| stage | "
            + " | ".join(f"{w}: macro-F1 / accuracy | {w}: {MIN_CELLS}+ cells" for w in by_w)
            + " | F1 delta / gamma ("
            + ", ".join(by_w)
            + ") |",
            "|---|" + "---|---|" * len(by_w) + "---|",
        ]
        for stage, desc in STAGES:
            cells = []
            for r in by_w.values():
                s = r[stage]
                cells.append(f"{s['macro_f1']:.3f} / {s['accuracy']:.3f} | {s['macro_f1_10']:.3f}")
            dg = "; ".join(
                f"{r[stage]['per_class_f1']['delta']:.2f} / {r[stage]['per_class_f1']['gamma']:.2f}"
                for r in by_w.values()
            )
            out.append(f"| {desc} | " + " | ".join(cells) + f" | {dg} |")
        out.append("")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=xs.ROOT / "results")
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--weightings", nargs="+", default=["value", "softmax"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    log_progress()
    if not all(p.exists() for p in xs.BARON.values()):
        sys.exit(f"skipped: the Baron pair is not in {xs.SHARED / 'cells'}")
    command = "python benchmarks/cross_species_probe.py"
    command += (
        "" if a.weightings == ["value", "softmax"] else " --weightings " + " ".join(a.weightings)
    )
    command += "" if a.seed == 0 else f" --seed {a.seed}"
    res = run(a.stores, a.weightings, a.seed)
    write_results(a.out, "cross_species_probe", lines(res, a.seed, command), res)


if __name__ == "__main__":
    main()
