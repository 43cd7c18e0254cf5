"""A refinement pre-trained on other labelled references as the prior of a small atlas
(issue 23's "knowledge from elsewhere"), measured leave one dataset out.

For a target set, the other human PBMC sets (pbmc3k, pbmc_3chem, pbmc68k_reduced, less
the target) are pooled, labels prefixed by their set, and fitted once with the default
recipe (`fit_encoder`): one background over the pooled genes, gene gates and
corrections, head. Every atlas fitted on the target's data-limited draws (the draws of
`benchmarks/data_limited.py`: seed 0, 5 stratified folds, N cells a class) then starts
from them:

- the background is the pretrained one;
- the pretrained gene gates and corrections are baked into the gene vectors the atlas
  refines, so its own adapter's penalties pull towards them rather than the bare text
  (genes the pooled sets lack start from the text);
- the head starts from the pretrained head, with an L2 pull of strength `--pull`
  towards it (0: a starting point only).

The read-out choice of small references (`tune.choose_readout`) fits through the same
path. `default` is the same draws without the prior, in the same run. Patched in with
unittest.mock, not an option of cellvec: the numbers decide whether it becomes one.
amacrine is not run: there is no second labelled mouse retina set here to pretrain on.

    python benchmarks/pretrained_prior.py --out results/ [--only pbmc3k] [--sizes 5,10] [--pull 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from unittest import mock

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, log_progress  # noqa: E402
from _stores import ensure_store  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CELLS = SHARED / "cells"
SETS = {
    "pbmc3k": ("pbmc3k.h5ad", "classified"),
    "pbmc_3chem": ("pbmc_3chem.h5ad", "cell_type"),
    "pbmc68k": ("pbmc68k_reduced.h5ad", "bulk_labels"),
}
TARGETS = ("pbmc3k", "pbmc_3chem")


def pooled(names):
    """The sets `names` as one log-normalised source over the union of their genes, and
    their labels prefixed by set."""
    import anndata as ad

    from cellvec.cell_index.labels import labels_of
    from cellvec.cell_index.readers import read_expression

    parts = []
    for name in names:
        f, key = SETS[name]
        s = read_expression(CELLS / f)
        parts.append((s, [f"{name}:{v}" for v in labels_of(s, key)]))
    var = sorted({str(g) for s, _ in parts for g in s.var_names})
    at = {g: i for i, g in enumerate(var)}
    blocks = []
    for s, _ in parts:
        cols = np.array([at[str(g)] for g in s.var_names])
        move = sp.csr_matrix(
            (np.ones(len(cols)), (np.arange(len(cols)), cols)), shape=(len(cols), len(var))
        )
        blocks.append(sp.csr_matrix(sp.csr_matrix(s.to_csr()) @ move))
    a = ad.AnnData(sp.vstack(blocks, format="csr").astype(np.float32))
    a.var_names = var
    return read_expression(a), np.array([v for _, y in parts for v in y])


def pretrain(names, genes) -> dict:
    """The pretrained prior: background, per-store-gene gates and corrections, head."""
    from cellvec.cell_index.fitting import fit_encoder
    from cellvec.cell_index.recipe import Recipe
    from cellvec.cell_index.refine import HEAD_KEYS

    source, labels = pooled(names)
    t0 = time.perf_counter()
    fit = fit_encoder(source, labels, genes, Recipe(model=genes.model))
    r = fit.encoder.refinement
    gate = np.ones(len(genes.vectors), np.float32)
    delta = np.zeros_like(genes.vectors, dtype=np.float32)
    gate[r["gene_rows"]], delta[r["gene_rows"]] = r["gene_gate"], r["gene_delta"]
    print(
        f"prior: {source.n_obs:,} cells of {', '.join(names)}, {len(r['gene_rows']):,} genes, "
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return {
        "background": fit.encoder.background,
        "gate": gate,
        "delta": delta,
        "head": {k: r[k] for k in HEAD_KEYS},
        "cells": int(source.n_obs),
    }


def with_prior(prior: dict, pull: float) -> ExitStack:
    """Patches under which every fit starts from `prior` (see the module docstring)."""
    import torch

    import cellvec.cell_index.fitting as fitting
    import cellvec.cell_index.refine as refine

    state: dict = {}
    fold, fit, init, loss = (
        fitting.fold_duplicates,
        refine.fit_refinement,
        refine._Model.__init__,
        refine._contrastive_loss,
    )

    def fold_recording(*a, **k):
        cols, rows, folded = fold(*a, **k)
        state["rows"] = rows
        return cols, rows, folded

    def fit_from_prior(w, basis, labels, *, recipe=None, options=None, seed=0):
        # adapted = gate_ft * ((E + D0) * g0 + D_ft), written as (E + D) * g for the encoder
        rows = state["rows"]
        g0, d0 = prior["gate"][rows], prior["delta"][rows]
        params, report = fit(
            w, ((basis + d0) * g0[:, None]).astype(np.float32), labels,
            recipe=recipe, options=options, seed=seed,
        )  # fmt: skip
        g = params.get("gene_gate", np.ones(len(rows), np.float32))
        d = params.get("gene_delta", np.zeros_like(basis))
        params["gene_gate"] = (g * g0).astype(np.float32)
        params["gene_delta"] = (d0 + d / g0[:, None]).astype(np.float32)
        return params, report

    def init_from_prior(self, e, mean0, *, adapt_genes, options, steps):
        init(self, e, mean0, adapt_genes=adapt_genes, options=options, steps=steps)
        h = prior["head"]
        with torch.no_grad():
            for layer, wk, bk in ((self.mlp[0], "w1", "b1"), (self.mlp[2], "w2", "b2")):
                layer.weight.copy_(torch.from_numpy(h[wk].T))
                layer.bias.copy_(torch.from_numpy(h[bk]))
            self.skip.weight.copy_(torch.from_numpy(h["skip"].T))
        self.prior_params = [p.detach().clone() for p in self._head_params()]
        state["model"] = self

    def loss_with_pull(z, labels, temperature):
        out = loss(z, labels, temperature)
        m = state.get("model")
        if pull and m is not None:
            pairs = zip(m._head_params(), m.prior_params)
            out = out + pull * sum(((p - p0) ** 2).sum() for p, p0 in pairs)
        return out

    def head_params(self):
        return list(self.mlp.parameters()) + list(self.skip.parameters())

    stack = ExitStack()
    for target, name, new in (
        (fitting, "fold_duplicates", fold_recording),
        (fitting, "fit_refinement", fit_from_prior),
        (fitting, "fit_background", lambda vectors, kind: prior["background"]),
        (refine._Model, "_head_params", head_params),
        (refine._Model, "__init__", init_from_prior),
        (refine, "_contrastive_loss", loss_with_pull),
    ):
        stack.enter_context(mock.patch.object(target, name, new, create=True))
    return stack


def curve(target: str, genes, sizes, seed: int = 0) -> dict[str, float]:
    """cellvec's macro-F1 on `target` with n reference cells a class, the draws of
    benchmarks/data_limited.py."""
    from cellvec import metrics
    from cellvec.cell_index.labels import labels_of
    from cellvec.cell_index.readers import read_expression
    from cellvec.cell_index.recipe import Recipe
    from cellvec.evaluation.cross_validation import CrossValidation
    from cellvec.evaluation.representations import Predictors
    from cellvec.evaluation.scenarios import few_cells

    f, key = SETS[target]
    source = read_expression(CELLS / f)
    y = labels_of(source, key)
    pred = Predictors({genes.model: genes}, Recipe(model=genes.model), 15, seed, {})
    cv = CrossValidation(pred, source, y, metrics.folds(y, 5, seed))
    return {
        str(n): round(cv.score("cellvec", ref_cells=few_cells(y, n, seed))["macro_f1"], 4)
        for n in sizes
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    ap.add_argument("--stores", type=Path, default=Path("/tmp/cellvec_eval_stores"))
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(TARGETS))
    ap.add_argument("--sizes", default="3,5,10,20", help="reference cells per class")
    ap.add_argument("--pull", type=float, default=0.0, help="L2 pull of the head to the prior")
    args = ap.parse_args()
    if not SHARED.exists():
        sys.exit(f"{SHARED} not found: this benchmark needs the shared real data")
    log_progress()
    from cellvec.gene_store import GeneStore

    genes = GeneStore(ensure_store(args.stores / "human", "human")).load("minilm")
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = args.only.split(",") if args.only else list(TARGETS)
    rows = {}
    for target in targets:
        others = [s for s in SETS if s != target]
        prior = pretrain(others, genes)
        t0 = time.perf_counter()
        default = curve(target, genes, sizes)
        with with_prior(prior, args.pull):
            primed = curve(target, genes, sizes)
        rows[target] = {"prior_sets": others, "default": default, "prior": primed}
        print(target, json.dumps(rows[target]), f"{time.perf_counter() - t0:.0f} s", flush=True)
    command = "python benchmarks/pretrained_prior.py " + " ".join(sys.argv[1:])
    doc = {"command": command, "pull": args.pull, "sizes": sizes, "sets": rows}
    lines = [
        f"Generated by `{command}` (see its docstring): cellvec's macro-F1 with N reference "
        "cells per class (the draws of benchmarks/data_limited.py), without and with a "
        "refinement pre-trained on the other PBMC sets.",
        "",
        "| set | prior from | " + " | ".join(f"{n} cells" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for target, r in rows.items():
        for kind in ("default", "prior"):
            lines.append(
                f"| {target} | {', '.join(r['prior_sets']) if kind == 'prior' else '(none)'} | "
                + " | ".join(f"{r[kind][str(n)]:.3f}" for n in sizes)
                + " |"
            )
        lines.append(
            f"| {target} | prior - default | "
            + " | ".join(f"{r['prior'][str(n)] - r['default'][str(n)]:+.3f}" for n in sizes)
            + " |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pretrained_prior.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.out / "pretrained_prior.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
