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

A real pair (Baron et al. 2016 pancreas, human 2,142 cells and mouse 1,886, same
protocol, labels `cell_type1` lower-cased) is mapped both ways: an atlas of one species
(`calibration_split=0.1`; the default recipe, whose cross-species view answers a query
mapped through orthologs; the same atlas with `--no-cross-species`; and one built as the
view is, `--weighting softmax --level-shift 1.0`, read by the plain vote: `RECIPES`),
the other species' cells mapped with `orthologs=HCOP`, scored on the 11 classes both have; logistic regression (plain, and with
classes weighted by size) and CellTypist
trained on the reference's genes that have a one-to-one HCOP ortholog in the query,
predicting the translated query. With `min_typicality=0.01` the share of the cells of
classes the atlas lacks (human acinar, epsilon, mast; mouse B and other immune cells)
that come back unassigned, and the accuracy left on the known ones; the same with the
calibration of a query of the atlas's own species (`own_species_calibration`) and at
0.05; and where the cells of the missing classes land. The renamed queries are also
mapped with `map_cells(..., orthologs=HCOP)` onto atlases with and without the view
(`renamed_through_view`).

The Baron stores hold the genes that carry the cells' vectors (`_stores.carrying_genes`),
or with `--genes all` every gene of each file (`results/cross_species_all_genes/`).

    python benchmarks/cross_species.py --out results/ [--seeds 0 1 2] [--baron-only]
        [--genes carrying|all]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import MIN_CELLS, SHARED, log_progress, macro_f1_10, write_results  # noqa: E402
from _stores import carrying_genes, ensure_named_store, ensure_store, file_genes  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELLS = SHARED / "cells"
HCOP = SHARED / "genes" / "hcop_mouse_to_human.csv.gz"
BARON = {s: CELLS / f"baron2016_pancreas_{s}.h5ad" for s in ("human", "mouse")}
ENDOCRINE = ("beta", "alpha", "delta", "gamma")
# The genes of the Baron stores (`_stores.NAMED`; `--genes`): "carrying" the genes that
# carry the cells' vectors, "all" every gene of each file (the stores issue 22 measured).
GENES = "carrying"
STORES_TEXT = {
    "carrying": [
        "`benchmarks/_stores.py` (`baron_human`, `baron_mouse`): cellvec is given the genes",
        "those stores hold (the genes carrying the cells' vectors, chosen without labels);",
    ],
    "all": [
        "`benchmarks/_stores.py` (`baron_human_all`, `baron_mouse_all`): every gene of each",
        "file, as issue 22 measured; cellvec is given the genes those stores hold (all but",
        "those NCBI gene_info does not name);",
    ],
}


def store_name(species: str) -> str:
    """The Baron store of `species` for `GENES`."""
    return f"baron_{species}" + ("_all" if GENES == "all" else "")


def given_genes(path: Path) -> set[str]:
    """The genes of the Baron file `path` that cellvec is given (`GENES`)."""
    return set(file_genes(path) if GENES == "all" else carrying_genes(path))


def baron(species: str, other: str) -> tuple:
    """(reference AnnData of `species`, query AnnData of `other`), labels in obs['label']."""
    import anndata as ad

    out = []
    for s in (species, other):
        a = ad.read_h5ad(BARON[s])
        a.obs["label"] = a.obs["cell_type1"].astype(str).str.lower().to_numpy()
        a.uns["species"] = s
        out.append(a)
    return tuple(out)


def carried(a):
    """`a` log-normalised over all its genes (CP10k, log1p), then cut to the genes its
    Baron store holds (`given_genes`): what cellvec is given, so that every gene it sees
    is in the store and the values are those of the whole file."""

    keep = given_genes(BARON[species_of(a)])
    cols = np.array([g in keep for g in a.var_names])
    return lognorm(a)[:, cols].copy()


def lognorm(a):
    """`a` log-normalised over all its genes, as a new AnnData (same obs, var, uns)."""
    import anndata as ad

    from cellvec.cell_index.readers import read_expression

    return ad.AnnData(read_expression(a).to_csr(), obs=a.obs, var=a.var, uns=dict(a.uns))


def species_of(a) -> str:
    return a.uns["species"]


def score(truth, predicted, known) -> dict:
    """Metrics over the query cells of the classes the reference has (`known`)."""
    from cellvec.metrics import classification_metrics

    truth, predicted = np.asarray(truth).astype(str), np.asarray(predicted).astype(str)
    keep = np.isin(truth, list(known))
    m = classification_metrics(truth[keep], predicted[keep])
    m.pop("confusion")
    return m


def baron_peers(ref, query, species: str, hcop, peers=("celltypist",), seed: int = 0) -> dict:
    """Predicted labels of the query by logistic regression (unweighted, and with classes
    weighted by size: `logreg_balanced`, whose figures on the Baron pair are within 0.02 of
    those issue 22 first measured, 0.774 / 0.938 and 0.840 / 0.918) and `peers`, trained
    on the reference's genes that have a one-to-one ortholog in the query, the query
    translated."""
    from cellvec.cell_index.readers import align_genes, read_expression
    from cellvec.evaluation.baselines import expression_baseline
    from cellvec.evaluation.transfer import translate

    # each file normalised over all its genes (CP10k, log1p) before the query is cut to
    # its translated genes, so that both sides' values are on the same scale
    r, q = read_expression(ref), read_expression(lognorm(query))
    translated, sources = translate(q, hcop.one_to_one(species))
    have = set(translated.var_names)
    genes = [g for g in r.var_names if g in have]
    x_ref = align_genes(r.to_csr(), r.var_names, genes)
    x_q = align_genes(translated.to_csr(), translated.var_names, genes)
    y = ref.obs["label"].to_numpy().astype(str)
    # the same, on the genes cellvec is given (both files' `given_genes`, `carried`)
    own = given_genes(BARON[species_of(query)])
    both = given_genes(BARON[species]) & {
        g for g, o in zip(translated.var_names, sources.var_names) if o in own
    }
    kept = [g for g in genes if g in both]
    at = {g: i for i, g in enumerate(genes)}
    cut = [at[g] for g in kept]
    out = {
        "genes": len(genes),
        "genes_carried": len(kept),
        "logreg_expr": expression_baseline("logreg_expr", x_ref, y, x_q, 15, seed),
        "logreg_balanced": expression_baseline("logreg_balanced", x_ref, y, x_q, 15, seed),
        "logreg_carried": expression_baseline(
            "logreg_expr", x_ref[:, cut], y, x_q[:, cut], 15, seed
        ),
    }
    for name in peers:
        from cellvec.evaluation.peers import celltypist_predict

        out[name] = celltypist_predict(x_ref, y, x_q, genes, seed=seed)
    return out


def baron_cellvec(
    ref,
    query,
    store,
    name: str,
    hcop,
    *,
    min_typicality: float = 0.01,
    seed: int = 0,
    level_shift: float = 0.0,
    cross_species: bool = True,
    **build,
) -> dict:
    """cellvec's labels for the query (and with `min_typicality`) from an atlas of `ref`
    built with `build` (`Recipe` fields), `calibration_split=0.1`, `seed`, `level_shift`
    (`atlas build --level-shift`) and `cross_species` (`--no-cross-species` when False);
    `ref` and `query` as cellvec is given them (`carried`)."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.mapping import map_cells
    from cellvec.cell_index.recipe import Recipe

    atlas = build_atlas(
        ref,
        store=store,
        name=name,
        label_key="label",
        recipe=Recipe(**build),
        options=BuildOptions(
            calibration_split=0.1,
            seed=seed,
            refine_options={"level_shift": level_shift} if level_shift else None,
            cross_species=cross_species,
        ),
    )
    res = map_cells(query, atlas, orthologs=hcop)
    strict = map_cells(query, atlas, orthologs=hcop, min_typicality=min_typicality)
    stricter = map_cells(query, atlas, orthologs=hcop, min_typicality=0.05)
    with own_species_calibration():
        own = map_cells(query, atlas, orthologs=hcop, min_typicality=min_typicality)
    return {
        "labels": res.labels,
        "typical_labels": strict.labels,
        "typical_labels_0.05": stricter.labels,
        "own_calibration_labels": own.labels,
        "similarity": res.neighbour_similarity,
        "typicality": strict.typicality,
        "gene_coverage": res.gene_coverage,
    }


@contextlib.contextmanager
def own_species_calibration():
    """Typicality of a query mapped through orthologs calibrated as a query of the atlas's
    own species is (the calibration cells as they are, not level-shifted): what
    `map --orthologs --min-typicality` did before `calibration.species_calibrations`."""
    from cellvec.cell_index.mapping import Reference

    target = Reference.target
    Reference.target = lambda self, panel, other_species=False: target(self, panel)
    try:
        yield
    finally:
        Reference.target = target


def baron_row(truth, known, labels, typical_labels=None) -> dict:
    """Macro-F1, accuracy and per-class F1 over the known classes, and macro-F1 over those
    with at least `MIN_CELLS` query cells (`macro_f1_10`); with `typical_labels`, the
    unassigned share of the cells of classes the atlas lacks and the accuracy left."""
    m = score(truth, labels, known)
    row = {
        "macro_f1": round(m["macro_f1"], 4),
        "accuracy": round(m["accuracy"], 4),
        "macro_f1_10": macro_f1_10(m["per_class"]),  # Baron: t_cell and schwann left out
        "per_class_f1": {c: round(v["f1"], 4) for c, v in m["per_class"].items()},
    }
    if typical_labels is not None:
        truth = np.asarray(truth).astype(str)
        unknown = ~np.isin(truth, list(known))
        t = score(truth, typical_labels, known)
        row["typicality_0.01"] = {
            "unassigned_of_unknown": round(
                float((typical_labels[unknown] == "unassigned").mean()), 4
            )
            if unknown.any()
            else None,
            "n_unknown": int(unknown.sum()),
            "accuracy_known": round(t["accuracy"], 4),
            "unassigned_of_known": round(t["unassigned_fraction"], 4),
        }
    return row


def unknown_classes(truth, known, cv: dict) -> dict:
    """Where the query cells of each class the atlas lacks go (`baron_cellvec`'s `cv`): the
    labels they get (the three most common), how many come back unassigned with
    `min_typicality`, and their median similarity to the nearest reference cell and median
    typicality; the same medians over the cells of the known classes."""
    truth = np.asarray(truth).astype(str)

    def medians(m) -> dict:
        return {
            "cells": int(m.sum()),
            "unassigned": int((cv["typical_labels"][m] == "unassigned").sum()),
            "median_similarity": round(float(np.median(cv["similarity"][m])), 3),
            "median_typicality": round(float(np.median(cv["typicality"][m])), 3),
        }

    unknown = ~np.isin(truth, list(known))
    out = {}
    for c in sorted(set(truth[unknown])):
        m = truth == c
        labels, counts = np.unique(cv["labels"][m].astype(str), return_counts=True)
        top = np.argsort(-counts, kind="stable")[:3]
        out[c] = {**medians(m), "labels": {labels[i]: int(counts[i]) for i in top}}
    out["(known classes)"] = medians(~unknown)
    return out


def known_losses(truth, known, cv: dict) -> dict:
    """Per known class (`baron_cellvec`'s `cv`): its query cells, how many come back
    unassigned with `min_typicality`, and how many of those the labels without it called
    right: where the threshold's cost falls."""
    truth = np.asarray(truth).astype(str)
    out = {}
    for c in sorted(set(truth) & set(known)):
        m = truth == c
        lost = cv["typical_labels"][m] == "unassigned"
        out[c] = {
            "cells": int(m.sum()),
            "unassigned": int(lost.sum()),
            "unassigned_right": int((lost & (cv["labels"][m] == c)).sum()),
        }
    return out


# cellvec's rows: the default recipe (the query compared with the atlas's cross-species
# view: `build.SPECIES_VIEW`, its vote by class size), the same atlas without the view
# (`--no-cross-species`: the atlas itself, as before the view), and an atlas built as the
# view is (`--weighting softmax --level-shift 1.0`: each cell's top genes weighted by their
# expression, the refinement's views shifting each gene's level batch-wide), read by the
# plain vote. Older runs also had `--weighting softmax` and `sqrt` atlases
# (results/cross_species_weighting/, results/cross_species_softmax_shift/).
RECIPES = {
    "cellvec": {},
    "cellvec_no_view": {"cross_species": False},
    "cellvec_softmax_shift": {"weighting": "softmax", "level_shift": 1.0},
}


def run_baron(stores: Path, hcop, peers, seeds=(0,)) -> dict:
    """Both directions of the Baron pair: cellvec (`RECIPES`, atlases of each of `seeds`;
    the row is the first seed's, `seeds` holds each seed's macro-F1 and accuracy) and the
    peers."""
    out = {}
    for species, other in (("human", "mouse"), ("mouse", "human")):
        ref, query = baron(species, other)
        known = set(ref.obs["label"])
        truth = query.obs["label"].to_numpy().astype(str)
        store = ensure_named_store(stores, store_name(species))
        given = carried(ref), carried(query)  # once: every atlas and mapping takes these
        rows = {}
        for name, build in RECIPES.items():
            for seed in seeds:
                tag = "" if name == "cellvec" else "_" + name.split("_", 1)[1]
                cv = baron_cellvec(
                    *given, store, f"baron_{species}{tag}_{seed}", hcop, seed=seed, **build
                )
                row = baron_row(truth, known, cv["labels"], cv["typical_labels"])
                own = baron_row(truth, known, cv["labels"], cv["own_calibration_labels"])
                row["typicality_0.01_own_calibration"] = own["typicality_0.01"]
                at_05 = baron_row(truth, known, cv["labels"], cv["typical_labels_0.05"])
                row["typicality_0.05"] = at_05["typicality_0.01"]  # baron_row's key, at 0.05
                row["unknown_classes"] = unknown_classes(truth, known, cv)
                row["known_losses"] = known_losses(truth, known, cv)
                row["gene_coverage"] = round(cv["gene_coverage"], 4)
                rows.setdefault(name, row).setdefault("seeds", {})[seed] = {
                    k: row[k]
                    for k in (
                        "macro_f1",
                        "accuracy",
                        "macro_f1_10",
                        "typicality_0.01",
                        "typicality_0.01_own_calibration",
                        "typicality_0.05",
                    )
                }
        pred = baron_peers(ref, query, species, hcop, peers)
        for name in ("logreg_expr", "logreg_balanced", "logreg_carried", *peers):
            rows[name] = baron_row(truth, known, pred[name])
        out[f"{other} onto {species}"] = {
            "peer_genes": pred["genes"],
            "peer_genes_carried": pred["genes_carried"],
            "shared_classes": sorted(known & set(truth)),
            "small_classes": sorted(
                c for c in known & set(truth) if (truth == c).sum() < MIN_CELLS
            ),
            **rows,
        }
    return out


def baron_within(stores: Path, seeds=(0,)) -> dict:
    """The known cells' cost of `min_typicality=0.01` within a species, on the same tissue:
    each Baron set split 70 / 30 (the split drawn from the seed), an atlas of the 70%
    (`calibration_split=0.1`, `--no-cross-species`: within a species the view is never
    used), the 30% mapped with and without the threshold. Per species and seed: the
    unassigned share, the accuracy without -> with."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.mapping import map_cells

    out = {}
    for species, other in (("human", "mouse"), ("mouse", "human")):
        ref = baron(species, other)[0]
        store = ensure_named_store(stores, store_name(species))
        given, labels = carried(ref), ref.obs["label"].to_numpy().astype(str)
        for seed in seeds:
            test = np.random.default_rng(seed).random(ref.n_obs) < 0.3
            atlas = build_atlas(
                given[~test].copy(),
                store=store,
                name=f"within_{species}_{seed}",
                label_key="label",
                options=BuildOptions(calibration_split=0.1, seed=seed, cross_species=False),
            )
            plain = map_cells(given[test].copy(), atlas).labels
            strict = map_cells(given[test].copy(), atlas, min_typicality=0.01).labels
            truth = labels[test]
            out.setdefault(species, {})[seed] = {
                "unassigned": round(float((strict == "unassigned").mean()), 4),
                "accuracy": round(float((plain == truth).mean()), 4),
                "accuracy_0.01": round(float((strict == truth).mean()), 4),
            }
    return out


def within_lines(within: dict, pair: dict) -> list[str]:
    """`baron_within`'s table, each atlas's species beside the other species' known cells
    mapped onto it (cellvec's default recipe, `run_baron`)."""
    lines = [
        "",
        "The known cells' cost of `--min-typicality 0.01`, within a species on the same tissue",
        "(`baron_within`: each set split 70 / 30 by the seed, an atlas of the 70% with",
        "`--calibration-split 0.1`, the 30% mapped) and across species (the default recipe",
        "above, the other species' cells of the shared classes): the share unassigned, and",
        "the accuracy without -> with the threshold.",
        "",
        "| atlas | query | seed | known cells unassigned at 0.01 | accuracy |",
        "|---|---|---|---|---|",
    ]
    for species, seeds in within.items():
        other = "mouse" if species == "human" else "human"
        across = pair[f"{other} onto {species}"]["cellvec"]["seeds"]
        for seed, r in seeds.items():
            lines.append(
                f"| {species} | 30% of the {species} cells | {seed} | "
                f"{100 * r['unassigned']:.1f}% | {r['accuracy']:.3f} -> {r['accuracy_0.01']:.3f} |"
            )
        for seed, r in across.items():
            t = r["typicality_0.01"]
            lines.append(
                f"| {species} | the {other} cells, through orthologs | {seed} | "
                f"{100 * t['unassigned_of_known']:.1f}% | {r['accuracy']:.3f} -> "
                f"{t['accuracy_known']:.3f} |"
            )
    return lines


def baron_lines(res: dict, peers) -> list[str]:
    names = [*RECIPES, "logreg_expr", "logreg_balanced", *peers, "logreg_carried"]
    lines = [
        "| query onto atlas | "
        + " | ".join(f"{n} macro-F1 / accuracy" for n in names)
        + " | "
        + " | ".join(f"F1 {c} ({' / '.join(RECIPES)})" for c in ENDOCRINE)
        + " | unassigned of unknown classes, accuracy left (typicality 0.01; "
        + " / ".join(RECIPES)
        + ") |",
        "|---|" + "---|" * (len(names) + len(ENDOCRINE) + 1),
    ]
    for key, r in res.items():
        typ = {n: r[n]["typicality_0.01"] for n in RECIPES}
        lines.append(
            f"| {key} | "
            + " | ".join(f"{r[n]['macro_f1']:.3f} / {r[n]['accuracy']:.3f}" for n in names)
            + " | "
            + " | ".join(
                " / ".join(f"{r[n]['per_class_f1'].get(c, float('nan')):.2f}" for n in RECIPES)
                for c in ENDOCRINE
            )
            + " | "
            + " / ".join(
                f"{t['unassigned_of_unknown']:.2f} of {t['n_unknown']}, {t['accuracy_known']:.3f}"
                for t in typ.values()
            )
            + " |"
        )
    lines += [
        "",
        f"Macro-F1 over the shared classes with at least {MIN_CELLS} query cells (the first "
        "seed's atlas; the classes left out are named):",
        "",
        "| query onto atlas | classes left out | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for key, r in res.items():
        lines.append(
            f"| {key} | {', '.join(r['small_classes']) or '-'} | "
            + " | ".join(f"{r[n]['macro_f1_10']:.3f}" for n in names)
            + " |"
        )
    seeds = sorted(next(iter(res.values()))["cellvec"]["seeds"])
    if len(seeds) > 1:
        lines += [
            "",
            f"cellvec over seeds {', '.join(map(str, seeds))} (folds of the calibration split "
            f"and refinement), macro-F1 / accuracy; the mean, and the mean macro-F1 over the "
            f"classes of {MIN_CELLS}+ query cells:",
            "",
            "| query onto atlas | recipe | "
            + " | ".join(f"seed {s}" for s in seeds)
            + f" | mean | mean macro-F1, {MIN_CELLS}+ cells |",
            "|---|---|" + "---|" * (len(seeds) + 2),
        ]
        for key, r in res.items():
            for n in RECIPES:
                per = [r[n]["seeds"][s] for s in seeds]
                mean = [
                    float(np.mean([p[k] for p in per]))
                    for k in ("macro_f1", "accuracy", "macro_f1_10")
                ]
                lines.append(
                    f"| {key} | {n} | "
                    + " | ".join(f"{p['macro_f1']:.3f} / {p['accuracy']:.3f}" for p in per)
                    + f" | {mean[0]:.3f} / {mean[1]:.3f} | {mean[2]:.3f} |"
                )
        lines += [
            "",
            "`--min-typicality 0.01` over the same seeds (typicality of a query mapped through "
            "orthologs is calibrated on level-shifted views of the calibration cells, "
            "`calibration.species_calibrations`): the share of the cells of classes the atlas lacks "
            "that come back unassigned, and the accuracy on the known classes without the "
            "threshold -> with it; in brackets the same with the calibration cells as they are "
            "(the calibration of a query of the atlas's own species, what map did before); "
            "after the slash, the same at `--min-typicality 0.05` (level-shifted views):",
            "",
            "| query onto atlas | recipe | " + " | ".join(f"seed {s}" for s in seeds) + " |",
            "|---|---|" + "---|" * len(seeds),
        ]
        for key, r in res.items():
            for n in RECIPES:
                per = [r[n]["seeds"][s] for s in seeds]
                lines.append(
                    f"| {key} | {n} | "
                    + " | ".join(
                        f"{p['typicality_0.01']['unassigned_of_unknown']:.2f}, "
                        f"{p['accuracy']:.3f} -> {p['typicality_0.01']['accuracy_known']:.3f} "
                        f"({p['typicality_0.01_own_calibration']['unassigned_of_unknown']:.2f}, "
                        f"{p['typicality_0.01_own_calibration']['accuracy_known']:.3f}) / "
                        f"{p['typicality_0.05']['unassigned_of_unknown']:.2f}, "
                        f"{p['typicality_0.05']['accuracy_known']:.3f}"
                        for p in per
                    )
                    + " |"
                )
    lines += [
        "",
        "Where the query cells of the classes the atlas lacks go (the first seed's atlas): "
        "the labels they get (most common first), how many come back unassigned at "
        "`--min-typicality 0.01`, their median similarity to the nearest reference cell "
        "and median typicality; the last row of each, the known classes' cells:",
        "",
        "| query onto atlas | recipe | class | cells | labels | unassigned at 0.01 "
        "| median nearest similarity | median typicality |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in res.items():
        for n in ("cellvec", "cellvec_softmax_shift"):
            for c, d in r[n]["unknown_classes"].items():
                labels = ", ".join(f"{lab} {k}" for lab, k in d.get("labels", {}).items())
                lines.append(
                    f"| {key} | {n} | {c} | {d['cells']} | {labels or '-'} | "
                    f"{d['unassigned']} | {d['median_similarity']:.3f} | "
                    f"{d['median_typicality']:.3f} |"
                )
    lines += [
        "",
        "Where the known cells' cost of `--min-typicality 0.01` falls (the default recipe, the "
        "first seed's atlas): per class, the query cells that come back unassigned, and how "
        "many of those were called right without the threshold:",
        "",
        "| query onto atlas | class | cells | unassigned | of them right |",
        "|---|---|---|---|---|",
    ]
    for key, r in res.items():
        for c, d in r["cellvec"]["known_losses"].items():
            share = d["unassigned"] / d["cells"]
            lines.append(
                f"| {key} | {c} | {d['cells']} | {d['unassigned']} ({share:.1%}) | "
                f"{d['unassigned_right']} |"
            )
    lines += ["", "Per-class F1 (query cells of the shared classes):", ""]
    for key, r in res.items():
        classes = r["shared_classes"]
        lines += [
            f"{key}:",
            "",
            "| | " + " | ".join(classes) + " |",
            "|---|" + "---|" * len(classes),
        ]
        lines += [
            f"| {n} | "
            + " | ".join(f"{r[n]['per_class_f1'].get(c, 0):.2f}" for c in classes)
            + " |"
            for n in names
        ]
        lines.append("")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--no-celltypist", action="store_true", help="skip the CellTypist peer")
    ap.add_argument("--baron-only", action="store_true", help="skip the renamed-query cases")
    ap.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="cellvec's atlas seeds on the Baron pair"
    )
    ap.add_argument(
        "--genes",
        choices=("carrying", "all"),
        default="carrying",
        help="the Baron stores' genes (carrying: those that carry the cells' vectors)",
    )
    args = ap.parse_args()
    global GENES
    GENES = args.genes
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this needs the shared real data")
    log_progress()
    import anndata as ad

    from cellvec.evaluation.evaluate import evaluate
    from cellvec.evaluation.plan import EvaluationPlan, Scenarios, Transfer
    from cellvec.gene_store.orthologs import read_orthologs

    hcop = read_orthologs(HCOP)
    peers = () if args.no_celltypist else ("celltypist",)
    command = "python benchmarks/cross_species.py" + (" --no-celltypist" if not peers else "")
    command += " --seeds " + " ".join(map(str, args.seeds)) if args.seeds != [0] else ""
    command += " --baron-only" if args.baron_only else ""
    command += f" --genes {GENES}" if GENES != "carrying" else ""
    out = args.out.resolve()
    command += (
        f" --out {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}"
        if out != ROOT / "results"
        else ""
    )
    pair = run_baron(args.stores, hcop, peers, seeds=args.seeds)
    within = baron_within(args.stores, seeds=args.seeds)
    pair_lines = [
        "## Baron 2016 pancreas, human and mouse",
        "",
        f"`{command}`: an atlas of one species (`--calibration-split 0.1`; `cellvec` the default",
        "recipe, whose query of another species is compared with the atlas's cross-species view,",
        "`cellvec_no_view` the same atlas built with `--no-cross-species` (compared with the atlas",
        "itself), `cellvec_softmax_shift` an atlas built with `--weighting softmax --level-shift",
        "1.0` (the view's recipe, read by the plain vote); the first seed's atlas below, each",
        "seed's at the end),",
        "the other species' cells mapped with `--orthologs hcop_mouse_to_human.csv.gz`; the",
        "peers trained on the reference's genes with a one-to-one HCOP ortholog in the query,",
        "predicting the translated query; scored on the classes both species have. Stores:",
        *STORES_TEXT[GENES],
        "`logreg_carried` is logistic regression on those genes only ("
        + ", ".join(f"{r['peer_genes_carried']:,} of {r['peer_genes']:,}" for r in pair.values())
        + " one-to-one genes).",
        "",
        *baron_lines(pair, peers),
        *within_lines(within, pair),
    ]
    if args.baron_only:
        write_results(args.out, "cross_species", pair_lines, {"baron": pair, "within": within})
        return
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
    rows, tables, through = {}, [], {}
    for name, (species, other, ref, query) in runs.items():
        store = ensure_store(args.stores / species, species)
        through[name] = renamed_through_view(store, name, ref, query, other, hcop)
        res = evaluate(
            ref.copy(),
            label_key="cell_type",
            store=store,
            plan=EvaluationPlan(
                skip_folds=True, peers=peers, representations=("logreg_expr", *peers, "cellvec")
            ),
            scenarios=Scenarios(
                species_swap=other, orthologs=hcop, transfer=Transfer(query.copy())
            ),
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
        "# Cross-species mapping",
        "",
        *pair_lines,
        "## The query renamed",
        "",
        f"Cross-species mapping through HCOP orthologs (`{command}`):",
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
    lines += [
        "",
        "The same renamed queries through `cellvec map --orthologs` onto an atlas of the whole",
        "reference (seed 0), which compares them with the atlas's cross-species view (as",
        "`evaluate --species-swap` above does), and onto the same atlas built with",
        "`--no-cross-species` (the atlas itself); the query under its own names beside. A",
        "renamed query is the same cells: the levels a species moves, which the view is",
        "trained for, do not move.",
        "",
        "| query | renamed, the view | renamed, the atlas itself | own names | HSC, MK F1 (view / itself) |",
        "|---|---|---|---|---|",
    ]
    for name, r in through.items():
        f1 = " ".join(
            f"{c} {r['view']['per_class_f1'].get(c, 0):.2f} / {r['atlas']['per_class_f1'].get(c, 0):.2f}"
            for c in ("HSC", "MK")
            if c in r["view"]["per_class_f1"]
        )
        lines.append(
            f"| {name} | {r['view']['macro_f1']:.3f} / {r['view']['accuracy']:.3f} | "
            f"{r['atlas']['macro_f1']:.3f} / {r['atlas']['accuracy']:.3f} | "
            f"{r['own']['macro_f1']:.3f} / {r['own']['accuracy']:.3f} | {f1 or '-'} |"
        )
    lines += ["", "The evaluations in full:", ""] + ["\n".join(["", t]) for t in tables]
    results = {"baron": pair, "within": within, "renamed": rows, "renamed_through_view": through}
    write_results(args.out, "cross_species", lines, results)


def renamed_through_view(store, name: str, ref, query, other: str, hcop) -> dict:
    """`query` renamed to `other`'s symbols (one-to-one orthologs) mapped with `orthologs=`
    onto an atlas of `ref` (seed 0) with its cross-species view and without; and `query`
    as it is: macro-F1, accuracy and per-class F1 of each."""
    from cellvec.cell_index.build import BuildOptions, build_atlas
    from cellvec.cell_index.mapping import map_cells
    from cellvec.cell_index.readers import read_expression
    from cellvec.evaluation.transfer import translate
    from cellvec.metrics import classification_metrics

    renamed = translate(read_expression(query.copy()), hcop.one_to_one(other))[0]
    truth = query.obs["cell_type"].astype(str).to_numpy()
    out = {}
    for key, view in (("view", True), ("atlas", False)):
        tag = "" if view else "_no_view"
        atlas = build_atlas(
            ref.copy(),
            store=store,
            name=f"renamed_{name.split()[0]}{tag}",
            label_key="cell_type",
            options=BuildOptions(cross_species=view),
        )
        out[key] = classification_metrics(truth, map_cells(renamed, atlas, orthologs=hcop).labels)
        if view:
            out["own"] = classification_metrics(truth, map_cells(query.copy(), atlas).labels)
    return {
        k: {
            "macro_f1": round(m["macro_f1"], 4),
            "accuracy": round(m["accuracy"], 4),
            "per_class_f1": {str(c): round(v["f1"], 4) for c, v in m["per_class"].items()},
        }
        for k, m in out.items()
    }


if __name__ == "__main__":
    main()
