"""How many labels `cell_index.ontology` maps to the right Cell Ontology id: right /
wrong / abstained on the Baron 2016 pancreas labels (human and mouse; the true ids are
in the files' `obs.cell_ontology_id`) and the PBMC labels of ../shared/data (true ids
assigned by hand below, as CELLxGENE curators label PBMC types).

Three settings per set: the label text alone; with the tissue hint; with the tissue
hint and each class's marker genes (`--markers`) (its 20 genes of highest mean log-expression above
the classes' average, their MiniLM gene vectors from a small store of just those genes,
built here from ../shared/data/genes). The text model is MiniLM, the gene store's.
A wrong term that lies under the true one in the CL (more specific: "CD8-positive,
alpha-beta cytotoxic T cell" for "CD8-positive, alpha-beta T cell") is counted apart.

Caveat: the shorthands `ontology.SHORTHANDS` spells out (Mono, DC, NK, T, B, ...) were
written while looking at these PBMC labels, so the PBMC figures are in-sample.

    python benchmarks/ontology_labels.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, log_progress  # noqa: E402
from _stores import subset_store  # noqa: E402

PBMC_TRUTH = {
    "B": "CL:0000236",  # B cell
    "CD14+ Mono": "CL:0001054",  # CD14-positive monocyte
    "CD8 T": "CL:0000625",  # CD8-positive, alpha-beta T cell
    "DC": "CL:0000451",  # dendritic cell
    "FCGR3A+ Mono": "CL:0002396",  # CD14-low, CD16-positive monocyte
    "Memory CD4 T": "CL:0000897",  # CD4-positive, alpha-beta memory T cell
    "NK": "CL:0000623",  # natural killer cell
    "Naive CD4 T": "CL:0000895",  # naive thymus-derived CD4-positive, alpha-beta T cell
    "Platelet": "CL:0000233",  # platelet
    "HSC": "CL:0000037",  # hematopoietic stem cell
    "MK": "CL:0000556",  # megakaryocyte
    "Mono_CD14": "CL:0001054",
    "Mono_CD16": "CL:0002396",
    "T_CD4": "CL:0000624",  # CD4-positive, alpha-beta T cell
    "T_CD8": "CL:0000625",
    "CD14+ Monocyte": "CL:0001054",
    "CD19+ B": "CL:0000236",
    "CD34+": "CL:0008001",  # hematopoietic precursor cell
    "CD4+/CD25 T Reg": "CL:0000815",  # regulatory T cell
    "CD4+/CD45RA+/CD25- Naive T": "CL:0000895",
    "CD4+/CD45RO+ Memory": "CL:0000897",
    "CD56+ NK": "CL:0000623",
    "CD8+ Cytotoxic T": "CL:0000625",
    "CD8+/CD45RA+ Naive Cytotoxic": "CL:0000900",  # naive thymus-derived CD8-positive, a-b T
    "Dendritic": "CL:0000451",
}
SETS = {
    "baron_human": ("baron2016_pancreas_human", "cell_type1", "human", "pancreas"),
    "baron_mouse": ("baron2016_pancreas_mouse", "cell_type1", "mouse", "pancreas"),
    "pbmc3k": ("pbmc3k", "classified", "human", "blood"),
    "pbmc_3chem": ("pbmc_3chem", "cell_type", "human", "blood"),
    "pbmc68k_reduced": ("pbmc68k_reduced", "bulk_labels", "human", "blood"),
}


def truth_of(src, key: str) -> dict[str, str]:
    if "cell_ontology_id" in src.obs.columns:
        pairs = src.obs[[key, "cell_ontology_id"]].astype(str).drop_duplicates()
        return dict(zip(pairs[key], pairs["cell_ontology_id"]))
    return {c: PBMC_TRUTH[c] for c in sorted(src.obs[key].astype(str).unique())}


def markers(src, key: str, species: str, tmp: Path) -> dict[str, np.ndarray]:
    """Each class's marker genes' mean MiniLM vector, from a store of just those genes."""
    from cellvec.cell_index.ontology import N_MARKERS, marker_vectors
    from cellvec.gene_store.resolve import match_genes
    from cellvec.gene_store.store import GeneStore

    labels = src.obs[key].astype(str).to_numpy()
    classes = np.unique(labels)
    sums = np.zeros((len(classes), len(src.var_names)))
    for sl, block in src.chunks(20_000):
        for c, name in enumerate(classes):
            rows = np.flatnonzero(labels[sl] == name)
            if len(rows):
                sums[c] += np.asarray(block[rows].sum(0)).ravel()
    profile = sums / np.bincount(np.searchsorted(classes, labels))[:, None]
    lift = profile - profile.mean(0, keepdims=True)
    top = np.unique(np.argsort(-lift, axis=1)[:, : N_MARKERS * 2])
    names = {str(src.var_names[i]).upper() for i in top}
    store = subset_store(tmp / f"markers_{species}_{len(names)}", species, names)
    genes = GeneStore(store).load("minilm")
    rows = match_genes([str(v) for v in src.var_names], genes.genes).rows
    vecs = np.zeros((len(src.var_names), genes.dimension), np.float32)
    vecs[rows >= 0] = genes.vectors[rows[rows >= 0]]
    profile[:, rows < 0] = 0.0  # genes without a vector: no lift, never markers
    return marker_vectors(profile, classes, vecs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--sets", default=",".join(SETS))
    args = ap.parse_args()
    log_progress()

    from cellxgene_ontology_guide.ontology_parser import OntologyParser

    from cellvec.cell_index.ontology import load_cell_ontology, propose_ontology_ids
    from cellvec.cell_index.readers import read_expression
    from cellvec.gene_store.embedders import get_embedder

    onto = load_cell_ontology()
    ancestors = OntologyParser().get_term_ancestors
    embedder = get_embedder("minilm")
    out = {"cl_version": onto.version, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sets.split(","):
            file, key, species, tissue = SETS[name]
            src = read_expression(SHARED / "cells" / f"{file}.h5ad")
            truth = truth_of(src, key)
            marks = markers(src, key, species, Path(tmp))
            rows = {}
            for setting, kw in (
                ("text", {}),
                ("text+tissue", {"tissue": tissue}),
                ("text+tissue+markers", {"tissue": tissue, "class_markers": marks}),
            ):
                props = propose_ontology_ids(list(truth), embedder=embedder, ontology=onto, **kw)
                right = sum(props[c].id == t for c, t in truth.items())
                abstained = sum(props[c].id is None for c in truth)
                narrower = sum(
                    props[c].id not in (None, t) and t in ancestors(props[c].id)
                    for c, t in truth.items()
                )
                rows[setting] = {
                    "right": right,
                    "wrong": len(truth) - right - abstained,
                    "of_which_narrower": narrower,
                    "abstained": abstained,
                    "labels": {
                        c: {**props[c].to_dict(), "truth": t, "truth_term": onto.label_of(t)}
                        for c, t in truth.items()
                    },
                }
                print(
                    f"{name:<16} {setting:<20} right {right:>2} / wrong "
                    f"{rows[setting]['wrong']:>2} ({narrower} of them a narrower term under the "
                    f"true one) / abstained {abstained:>2}  (of {len(truth)})",
                    flush=True,
                )
            out["sets"][name] = rows
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
