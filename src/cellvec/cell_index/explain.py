"""Explain a subtype: its driving genes and nearest gene texts; follow a per-subtype score.

- `explain_subtype`: the genes that contribute most to the subtype's centroid (mean
  top-gene weight in its cells x alignment of the gene's vector with the centroid),
  and the store genes whose texts lie nearest the centroid, with their GO terms.
- `score_direction`: for a user-supplied score per subtype (e.g. vulnerability), the
  direction in the atlas space that best follows it (least squares over centroids)
  and each cell's position along it.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from cellvec.cell_index.atlas import Atlas
from cellvec.cell_index.readers import read_expression
from cellvec.errors import CellvecError
from cellvec.gene_store.embedders.base import normalise_rows


def explain_subtype(
    atlas: Atlas,
    subtype: str,
    reference,
    *,
    label_key: str | None = None,
    n_genes: int = 20,
    n_texts: int = 10,
) -> dict:
    """Top contributing genes and nearest gene texts of `subtype` (uses the unrefined gene space)."""
    label_key = label_key or atlas.meta["label_key"]
    if subtype not in set(atlas.labels.astype(str)):
        raise CellvecError(
            f"Atlas {atlas.name!r} has no subtype {subtype!r}; it has: {', '.join(atlas.classes[:30])}."
        )
    enc = atlas.encoder()
    src = read_expression(reference)
    if label_key not in src.obs.columns:
        raise CellvecError(f"{src.path}: no obs column {label_key!r} (the atlas label key).")
    mask = src.obs[label_key].astype(str).to_numpy() == subtype
    if not mask.any():
        raise CellvecError(f"{src.path}: no cell labelled {subtype!r} in {label_key!r}.")
    basis = enc.basis(src.var_names, src.path)
    sub = src.subset(mask)
    w = basis.top_weights(sub.to_csr(), enc.recipe)[:, basis.columns]
    mean_w = np.asarray(w.mean(axis=0)).ravel()
    centroid = normalise_rows((mean_w @ basis.vectors)[None, :])[0]
    contrib = mean_w * (normalise_rows(basis.vectors) @ centroid)
    top = np.argsort(-contrib)[:n_genes]
    genes = enc.genes.genes
    drivers = [
        {
            "symbol": genes["symbol"][int(basis.rows[i])],
            "mean_weight": float(mean_w[i]),
            "contribution": float(contrib[i]),
        }
        for i in top
        if contrib[i] > 0
    ]
    # nearest gene texts in the raw store space (cosine to the raw-vector centroid)
    raw_centroid = normalise_rows((mean_w @ enc.genes.vectors[basis.rows])[None, :])[0]
    sims = enc.genes.vectors @ raw_centroid
    near = np.argsort(-sims)[:n_texts]
    texts = [
        {
            "symbol": genes["symbol"][int(i)],
            "similarity": float(sims[i]),
            "go_terms": (
                genes["go_terms"][int(i)].to_list()[:8] if "go_terms" in genes.columns else []
            ),
        }
        for i in near
    ]
    return {
        "atlas": atlas.name,
        "subtype": subtype,
        "n_cells": int(mask.sum()),
        "drivers": drivers,
        "nearest_gene_texts": texts,
    }


def score_direction(
    atlas: Atlas, scores: dict[str, float]
) -> tuple[np.ndarray, pl.DataFrame, dict]:
    """(direction, per-cell positions, fit report) for a per-subtype score."""
    known = [s for s in scores if s in set(atlas.labels.astype(str))]
    if len(known) < 3:
        raise CellvecError(
            f"Need scores for at least 3 subtypes of atlas {atlas.name!r}; matched {len(known)}: "
            f"{', '.join(known) or 'none'}."
        )
    labels = atlas.labels.astype(str)
    cents = np.stack([atlas.vectors[labels == s].mean(0) for s in known])
    target = np.array([scores[s] for s in known], dtype=np.float64)
    target = (target - target.mean()) / (target.std() or 1.0)
    centred = cents - cents.mean(0)
    # minimum-norm least squares: the direction d with centred @ d ~ target
    d, *_ = np.linalg.lstsq(centred, target, rcond=None)
    d = d / (np.linalg.norm(d) or 1.0)
    pos = (atlas.vectors - cents.mean(0)) @ d
    per_type = {s: float(pos[labels == s].mean()) for s in known}
    r = float(np.corrcoef([per_type[s] for s in known], target)[0, 1])
    cells = pl.DataFrame(
        {
            "cell_id": atlas.cell_ids.astype(str).tolist(),
            "label": labels.tolist(),
            "position": pos.astype(np.float64),
        }
    )
    return (
        d.astype(np.float32),
        cells,
        {"subtypes": known, "pearson_r": r, "mean_position": per_type},
    )
