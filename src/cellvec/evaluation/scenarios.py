"""The scenarios beyond plain folds, each run in the same folds as the plain scores.

- data-limited: n reference cells per class, the same draw for every representation;
- panels: the query keeps a random share of the genes (cellvec re-aggregates the
  reference over them; expression peers see zeros for the rest, `logreg_panel` is
  retrained on the panel);
- two levels: cellvec's fine and broad calls with the unassigned call;
- left-out subtypes: how many of an unseen subtype's cells come back unassigned.

The species swap and transfer to a second dataset are in `evaluation.transfer`.
"""

from __future__ import annotations

import logging

import numpy as np

from cellvec.cell_index.mapping import map_cells
from cellvec.evaluation.baselines import EXPRESSION_BASELINES
from cellvec.evaluation.cross_validation import CrossValidation, as_broad
from cellvec.evaluation.plan import UnassignedCall
from cellvec.metrics import UNASSIGNED, classification_metrics

log = logging.getLogger(__name__)

CALIBRATION_SPLIT = 0.1  # held out of refinement in the left-out scenario, for typicality


def data_limited_curves(
    cv: CrossValidation, sizes: tuple[int, ...], *, peers: tuple[str, ...], refine: str, seed: int
) -> dict[str, dict[str, float]]:
    """{representation: {n: macro-F1}} with `n` reference cells per class (each of
    `sizes`) drawn from each fold's reference with `seed`."""
    curves: dict[str, dict[str, float]] = {}
    # cellvec_unrefined: the language-model prior without refinement, which small
    # references can over-fit (results/data_limited.md)
    names = ["pca_knn", "logreg_expr", *peers, "random_vectors"]
    names += [*(["cellvec_unrefined"] if refine != "none" else []), "cellvec"]
    for name in names:
        curves[name] = {
            str(n_per): cv.score(name, ref_cells=few_cells(cv.y, n_per, seed))["macro_f1"]
            for n_per in sizes
        }
        log.info("data-limited %-14s %s", name, curves[name])
    return curves


def few_cells(y: np.ndarray, n_per: int, seed: int):
    """`ref_cells` for `CrossValidation.predict`: `n_per` cells of each class drawn from
    each fold's reference, the folds drawn in turn from one generator seeded `seed` (so
    every representation, and any benchmark that calls this, gets the same draw)."""
    classes, rng = np.unique(y), np.random.default_rng(seed)

    def few(i, tr):
        return np.sort(np.concatenate([rng.permutation(tr[y[tr] == c])[:n_per] for c in classes]))

    return few


def panel_scores(
    cv: CrossValidation, shares: tuple[float, ...], *, peers: tuple[str, ...], seed: int
) -> dict[str, dict[str, dict]]:
    """{share: {representation: metrics}} with each fold's query keeping a random share of
    its genes (drawn per fold and share from `seed`)."""
    out: dict[str, dict[str, dict]] = {}
    for share in shares:

        def panel(i, q, share=share):
            rng = np.random.default_rng([seed, i, int(share * 1000)])
            keep = rng.random(len(q.var_names)) < share
            return q.subset_genes(keep)

        reps = {}
        for name in ["logreg_expr", "logreg_panel", "pca_knn", *peers, "random_vectors", "cellvec"]:
            reps[name] = cv.score(name, query_of=panel)
            log.info("panel %.0f%% %-14s macro-F1 %.3f", 100 * share, name, reps[name]["macro_f1"])
        out[f"{share:g}"] = reps
    return out


def two_level_scores(cv: CrossValidation, y_broad: np.ndarray, call: UnassignedCall) -> dict:
    """cellvec's fine and broad calls in the same folds, each fold's atlas built with a
    calibration split and both levels: each level's metrics with and without the
    unassigned call, and how many cells whose fine label is unassigned get a broad one."""
    y, pred = cv.y, cv.predictors
    out = {k: np.empty(cv.n, dtype=object) for k in ("fine", "broad", "fine_free", "broad_free")}
    for tr, te in cv.splits:
        ref, q = cv.fold(tr, te)
        atlas = pred.fit(
            "cellvec", ref, y[tr], calibration_split=CALIBRATION_SPLIT, broad=y_broad[tr]
        )
        for suffix, conf, typ in (
            ("", call.min_confidence, call.min_typicality),
            ("_free", 0.0, 0.0),
        ):
            res = map_cells(q, atlas, k=pred.k, min_confidence=conf, min_typicality=typ)
            out["fine" + suffix][te] = res.labels
            out["broad" + suffix][te] = res.broad.labels
    result = {
        "min_confidence": call.min_confidence,
        "min_typicality": call.min_typicality,
        "calibration_split": CALIBRATION_SPLIT,
    }
    for lvl, truth in (("fine", y), ("broad", y_broad)):
        m = classification_metrics(truth, out[lvl])
        result[lvl] = {
            **{
                k: m[k]
                for k in ("accuracy", "macro_f1", "balanced_accuracy", "unassigned_fraction")
            },
            "macro_f1_without": classification_metrics(truth, out[lvl + "_free"])["macro_f1"],
            "per_class": m["per_class"],
        }
    lost = out["fine"] == UNASSIGNED
    given = lost & (out["broad"] != UNASSIGNED)
    result.update(
        fine_unassigned=int(lost.sum()),
        broad_given=int(given.sum()),
        broad_right=int((given & (out["broad"] == y_broad)).sum()),
    )
    return result


def left_out_scores(
    cv: CrossValidation, name: str, sub: str, call: UnassignedCall, y_broad=None
) -> dict:
    """Leave subtype `sub` out of every fold's reference (built with a calibration split)
    and map the whole held-out fold with the unassigned call `call`: the share of `sub`'s
    cells called unassigned or given another label, and the known subtypes' macro-F1 with
    and without the call.
    For cellvec, the share of `sub`'s cells each test refuses (`by_typicality`: typicality
    or confidence; `by_mixing`: the mixing test), which may overlap.
    With broad labels (`y_broad`), the share of `sub`'s cells given their right broad
    label (cellvec's broad call; an expression peer's label counts as its broad class)."""
    y = cv.y
    calls = _left_out_calls(cv, name, sub, call, y_broad)
    novel = y == sub
    known = ~novel
    with_call, without = calls["with_call"], calls["without"]
    extra = {}
    if y_broad is not None:
        extra["broad_right"] = float((calls["broad"][novel] == y_broad[novel]).mean())
    if name not in EXPRESSION_BASELINES:
        extra.update(
            min_typicality=call.min_typicality,
            min_mixing=call.min_mixing,
            by_typicality=float(calls["by_typicality"][novel].mean()),
            by_mixing=float(calls["by_mixing"][novel].mean()),
        )
    return {
        **extra,
        "cells": int(novel.sum()),
        "unassigned": float((with_call[novel] == UNASSIGNED).mean()),
        "mislabelled": float((with_call[novel] != UNASSIGNED).mean()),
        "known_macro_f1": classification_metrics(y[known], with_call[known])["macro_f1"],
        "known_macro_f1_without": classification_metrics(y[known], without[known])["macro_f1"],
        "known_unassigned": float((with_call[known] == UNASSIGNED).mean()),
    }


def _left_out_calls(
    cv: CrossValidation, name: str, sub: str, call: UnassignedCall, y_broad
) -> dict[str, np.ndarray]:
    """Each cell's label with the call (`with_call`) and without (`without`), its broad
    label (`broad`), and whether typicality/confidence (`by_typicality`) or the mixing
    test (`by_mixing`) refused it, from references without `sub`."""
    y, n, pred = cv.y, cv.n, cv.predictors
    out = {k: np.empty(n, dtype=object) for k in ("with_call", "without", "broad")}
    out.update(by_typicality=np.zeros(n, dtype=bool), by_mixing=np.zeros(n, dtype=bool))
    for tr, te in cv.splits:
        tr = tr[y[tr] != sub]
        ref, q = cv.fold(tr, te)
        if name in EXPRESSION_BASELINES:
            out["without"][te] = out["with_call"][te] = pred.predict(name, ref, y[tr], q)
            if y_broad is not None:
                out["broad"][te] = as_broad(out["with_call"][te], y[tr], y_broad[tr])
            continue
        broad = y_broad[tr] if y_broad is not None else None
        atlas = pred.fit(name, ref, y[tr], calibration_split=CALIBRATION_SPLIT, broad=broad)
        res = map_cells(
            q,
            atlas,
            k=pred.k,
            min_typicality=call.min_typicality,
            min_confidence=call.min_confidence,
            min_mixing=call.min_mixing,
        )
        out["with_call"][te] = res.labels
        out["by_typicality"][te] = (res.typicality < call.min_typicality) | (
            res.confidence < call.min_confidence
        )
        if res.mixing_applied:
            out["by_mixing"][te] = res.mixing < call.min_mixing
        if res.broad is not None:
            out["broad"][te] = res.broad.labels
        out["without"][te] = pred.predict(name, ref, y[tr], q, atlas=atlas)
    return out
