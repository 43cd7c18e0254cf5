"""Background removal: take out what all gene vectors share.

Vectors of templated gene texts share a large common component ("A protein-coding
gene of mouse. Molecular function: ..."), so raw weighted averages of them are all
alike. `center` subtracts the mean gene vector; `whiten` also rescales the
principal directions to equal variance (regularised PCA whitening), so that the
directions in which genes differ count. Fitted on the reference's matched gene
vectors (gene-level only: no cells and no labels), never on a query.
"""

from __future__ import annotations

import numpy as np


def fit_background(
    gene_vectors: np.ndarray, kind: str, *, shrink: float = 0.1
) -> dict[str, np.ndarray]:
    """Arrays of a fitted transform: `mean` and, for whiten, `proj` (dim x dim)."""
    if kind == "none":
        return {}
    mean = gene_vectors.mean(axis=0).astype(np.float32)
    if kind == "center":
        return {"mean": mean}
    centred = (gene_vectors - mean).astype(np.float64)
    cov = centred.T @ centred / max(len(centred) - 1, 1)
    evals, evecs = np.linalg.eigh(cov)
    evals = np.clip(evals, 0, None)
    # Shrink towards the mean eigenvalue so that near-empty directions are not blown up.
    reg = (1 - shrink) * evals + shrink * evals.mean()
    proj = (evecs / np.sqrt(reg)).astype(np.float32)
    return {"mean": mean, "proj": proj}


def apply_background(gene_vectors: np.ndarray, params: dict[str, np.ndarray]) -> np.ndarray:
    if not params:
        return gene_vectors
    out = gene_vectors - params["mean"]
    if "proj" in params:
        out = out @ params["proj"]
    return out.astype(np.float32, copy=False)
