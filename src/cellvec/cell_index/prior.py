"""Pre-trained priors: a refinement fitted once on labelled references a lab already has,
the starting point of a small atlas (`cellvec prior build`, `atlas build --prior NAME`).

With 3-20 cells a class a reference alone teaches refinement little. A prior is what
`fit_encoder` fits on several other references pooled (their labels kept apart by
dataset, `pbmc3k:B cells`): the background transform, the gene gates and corrections
of every store gene they use, and the head. An atlas built on a prior

- takes the prior's background transform;
- starts from the prior's gene vectors: the prior's gates and corrections are baked
  into the vectors its own gene adapter refines, so the adapter's penalties pull
  towards the prior rather than towards the bare text (genes the prior never saw
  start from the text);
- starts its head from the prior's head (the refine options' `hidden` and `out_dim`
  must be the prior's).

The atlas's own arrays are the prior's and its refinement's composed: mapping needs
nothing of the prior. The recipe records the prior's hash (`prior_hash`) and the
atlas's refinement report its name and sources.

Measured leave one dataset out (`benchmarks/pretrained_prior.py`,
results/pretrained_prior.md, three seeds): a prior from the other human PBMC sets raised
macro-F1 at 3-20 reference cells a class on pbmc_3chem by +0.019 to +0.057 on average
(every seed), on pbmc3k by +0.028 and +0.019 at 3 and 20 cells, and by nothing beyond
the seed spread at 5 and 10 (-0.004, +0.009). A prior is
only as near as its references: one from another tissue (the Baron human pancreas) cost
the same atlases up to 0.039 (results/pretrained_prior_from_baron_human.md).

A prior lives in the store as table `prior_<name>`: one row per gene it trained
(`symbol`, `gate`, `correction`: its correction's length relative to its vector), so
`cellvec sql "SELECT * FROM prior_pbmc ORDER BY gate"` shows the genes it turned down;
the table's metadata holds the recipe, whose hashes name the arrays' artifacts.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import scipy.sparse as sp

from cellvec.cell_index.artifacts import load_artifact
from cellvec.cell_index.background import apply_background
from cellvec.cell_index.fitting import fit_encoder
from cellvec.cell_index.readers import LOGNORM, ExpressionSource, align_genes
from cellvec.cell_index.recipe import Recipe
from cellvec.cell_index.refine import HEAD_KEYS
from cellvec.cell_index.table import MAX_TABLE_NAME, is_table_name
from cellvec.errors import CellvecError, StoreError
from cellvec.gene_store.store import GeneStore
from cellvec.storage import META_KEY, Store, StoreLocation, read_meta, replace_table

log = logging.getLogger(__name__)

PRIOR_PREFIX = "prior_"
# recipe fields an atlas must share with its prior: they fix the space the prior's gene
# rows, background and head live in
SAME_SPACE = ("background", "center")


@dataclass(frozen=True)
class Prior:
    """A loaded prior: its recipe, background transform, gates and corrections of the store
    rows `gene_rows`, head arrays and table metadata."""

    name: str
    recipe: Recipe
    background: dict[str, np.ndarray]
    gene_rows: np.ndarray
    gate: np.ndarray
    delta: np.ndarray
    head: dict[str, np.ndarray]
    meta: dict

    @property
    def digest(self) -> str:
        """The prior's identity, as an atlas recipe records it: the hash of its arrays."""
        return self.recipe.head_hash

    def check(self, recipe: Recipe, genes) -> None:
        """Refuse an atlas of other gene vectors (`genes`, the gene table) or whose vectors
        live in another space than the prior's; note the other differences (the prior
        still applies, fitted under other settings)."""
        _require_table(self.name, self.recipe, genes)
        mine, theirs = self.recipe.to_dict(), recipe.to_dict()
        wrong = [
            f"{k}: prior {mine[k]!r}, atlas {theirs[k]!r}"
            for k in SAME_SPACE
            if mine[k] != theirs[k]
        ]
        if wrong:
            raise CellvecError(
                f"Prior {self.name!r} was built on other gene vectors than this atlas "
                f"({'; '.join(wrong)}). Build the prior on the same store table with the "
                "same --background and --center, or leave out --prior."
            )
        other = ("top_genes", "weighting", "skip_genes", "refine", "adapt_genes")
        differ = [f"{k} {mine[k]!r} -> {theirs[k]!r}" for k in other if mine[k] != theirs[k]]
        if differ:
            log.info("prior %s was fitted with other settings: %s", self.name, ", ".join(differ))

    def start(
        self, basis: np.ndarray, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(gene vectors to refine, gates, corrections) for the store rows `rows` whose
        background-transformed vectors are `basis`: `(basis + D0) * g0` with the prior's
        gate g0 and correction D0 of each row (1 and 0 where the prior never saw it)."""
        g0 = np.ones(len(rows), np.float32)
        d0 = np.zeros((len(rows), basis.shape[1]), np.float32)
        order = np.argsort(self.gene_rows)
        at = np.searchsorted(self.gene_rows[order], rows)
        seen = at < len(order)
        seen[seen] = self.gene_rows[order[at[seen]]] == rows[seen]
        g0[seen], d0[seen] = self.gate[order[at[seen]]], self.delta[order[at[seen]]]
        log.info(
            "prior %s: %s of the reference's %s genes start from its gates and corrections, "
            "the rest from the text",
            self.name,
            f"{int(seen.sum()):,}",
            f"{len(rows):,}",
        )
        return ((basis + d0) * g0[:, None]).astype(np.float32), g0, d0

    def compose(self, params: dict, g0: np.ndarray, d0: np.ndarray) -> dict:
        """The refinement `params`, fitted on `start`'s vectors, as gates and corrections of
        the bare vectors: `g * ((E + D0) * g0 + D)` = `(E + D0 + D / g0) * (g * g0)`."""
        g = params.get("gene_gate", np.ones(len(g0), np.float32))
        d = params.get("gene_delta", np.zeros_like(d0))
        return {
            **params,
            "gene_gate": (g * g0).astype(np.float32),
            "gene_delta": (d0 + d / g0[:, None]).astype(np.float32),
        }

    def provenance(self) -> dict:
        """What an atlas records of the prior it started from."""
        return {"name": self.name, "hash": self.digest, "sources": self.meta.get("sources", [])}


def pool_sources(sources: list[ExpressionSource], names: list[str]) -> ExpressionSource:
    """The cells of `sources` as one in-memory log-normalised source over the union of their
    genes (a gene a source lacks reads as zero), cell ids prefixed by `names` (obs column
    `dataset`). All of it is held in memory: a prior is built from references that fit.
    Each row's columns come out sorted, as in a file scanpy writes: ties at the top-N cut
    are broken by stored order, and a CSR product leaves the columns unsorted (the same
    cells then gave a prior 0.04 apart in its head weights)."""
    var = sorted({str(g) for s in sources for g in s.var_names})
    blocks = [align_genes(s.to_csr(), [str(g) for g in s.var_names], var) for s in sources]
    obs = [
        pd.DataFrame({"dataset": name}, index=[f"{name}:{c}" for c in s.obs_names], dtype=object)
        for s, name in zip(sources, names)
    ]
    return ExpressionSource(
        path=f"pooled({', '.join(names)})",
        obs=pd.concat(obs),
        var_names=var,
        kind=LOGNORM,
        _matrix=sp.vstack(blocks, format="csr").sorted_indices(),
    )


def check_prior_name(name: str) -> None:
    """Refuse a name that cannot be a table (and a SQL view) before any work."""
    if not is_table_name(name):
        raise CellvecError(
            f"Prior name {name!r}: use up to {MAX_TABLE_NAME} letters, digits and underscores "
            "(it becomes a table and a SQL view name)."
        )


def build_prior(
    references: list[tuple[str, ExpressionSource, np.ndarray]],
    *,
    store: Store | str | Path | StoreLocation,
    name: str,
    model: str | None = None,
    recipe: Recipe | None = None,
    seed: int = 0,
    refine_options: dict | None = None,
) -> Prior:
    """Fit a prior on labelled `references` ((dataset name, cells, labels) each, pooled,
    labels prefixed by the dataset name) and write it to the store as `prior_<name>`.

    `recipe` (default `Recipe()`) is the one its atlases will use: they must share its
    background and centring (`SAME_SPACE`); `seed` and `refine_options` as `atlas build`'s."""
    check_prior_name(name)
    names = [n for n, _, _ in references]
    if len(set(names)) != len(names):
        raise CellvecError(f"Two references of the prior share a name ({', '.join(names)}).")
    recipe = recipe or Recipe()
    if recipe.refine != "supcon":
        raise CellvecError(
            f"A prior is a supervised refinement of labelled references; refine={recipe.refine!r} "
            "learns nothing from their labels. Build it with --refine supcon."
        )
    if not recipe.adapt_genes:
        raise CellvecError(
            "A prior carries the gene gates and corrections its atlases start from; "
            "--no-adapt-genes learns none. Build it with --adapt-genes (the default)."
        )
    t0 = time.perf_counter()
    store = Store.of(store, create=True)
    genes = GeneStore(store).load(model, every_gene=True)
    source = pool_sources([s for _, s, _ in references], names)
    labels = np.array([f"{n}:{v}" for n, _, y in references for v in np.asarray(y).astype(str)])
    log.info(
        "prior %s: %s cells of %s, %d classes, %s genes",
        name,
        f"{source.n_obs:,}",
        ", ".join(names),
        len(np.unique(labels)),
        f"{len(source.var_names):,}",
    )
    fit = fit_encoder(
        source,
        labels,
        genes,
        recipe,  # its model, hashes and prior_hash are set by the fit
        store=store,
        seed=seed,
        refine_options=refine_options,
    )
    enc = fit.encoder
    r = enc.refinement
    rows = r["gene_rows"]
    basis = apply_background(genes.vectors[rows], enc.background)
    correction = np.linalg.norm(r["gene_delta"], axis=1) / np.maximum(
        np.linalg.norm(basis, axis=1), 1e-12
    )
    sources = [
        {
            "dataset": n,
            "path": str(s.path),
            "n_cells": int(s.n_obs),
            "classes": {
                str(c): int(k)
                for c, k in zip(*np.unique(np.asarray(y).astype(str), return_counts=True))
            },
        }
        for n, s, y in references
    ]
    report = {k: v for k, v in fit.report.items() if k != "history"}
    meta = {
        "recipe": enc.recipe.to_dict(),
        "sources": sources,
        "n_cells": int(source.n_obs),
        "n_genes": int(len(rows)),
        "refinement": report,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "complete": True,
    }
    table = pa.table(
        {
            "symbol": pa.array(genes.genes["symbol"].to_numpy()[rows].astype(str)),
            "store_row": pa.array(rows.astype(np.int64)),
            "gate": pa.array(r["gene_gate"].astype(np.float32)),
            "correction": pa.array(correction.astype(np.float32)),
        }
    )
    replace_table(
        store.db,
        PRIOR_PREFIX + name,
        table.replace_schema_metadata({META_KEY: json.dumps(meta).encode()}),
    )
    log.info(
        "Prior %s: %s cells, %s genes, in %.1f s -> %s",
        name,
        f"{source.n_obs:,}",
        f"{len(rows):,}",
        time.perf_counter() - t0,
        store.location.uri,
    )
    return load_prior(store, name, genes)


def list_priors(store: Store | str | Path | StoreLocation) -> list[str]:
    return [
        n[len(PRIOR_PREFIX) :] for n in Store.of(store).table_names() if n.startswith(PRIOR_PREFIX)
    ]


def describe_prior(store: Store | str | Path | StoreLocation, name: str) -> dict:
    """A prior's metadata (recipe, sources, cells, genes, refinement report) and its name."""
    return {"name": name, **_stored_meta(Store.of(store), name)}


def _stored_meta(store: Store, name: str) -> dict:
    tbl = store.open_table(PRIOR_PREFIX + name) if is_table_name(name) else None
    meta = read_meta(tbl.to_lance()) if tbl is not None else {}
    if not meta.get("complete"):
        have = ", ".join(list_priors(store)) or "none"
        raise StoreError(
            f"No prior {name!r} in {store} (priors: {have}). Build it with `cellvec prior build`."
        )
    return meta


def _inconsistent(arrays: dict, dim: int, n_store_genes: int | None) -> str | None:
    """What is wrong with a prior's stored arrays (a store is a folder anyone may have
    edited), or None: every array there, one gate and correction per gene row, the rows
    distinct store rows, the gates positive (a composed correction divides by them)."""
    missing = [k for k in ("gene_rows", "gene_gate", "gene_delta", *HEAD_KEYS) if k not in arrays]
    if missing:
        return f"it lacks {', '.join(missing)}"
    rows, gate, delta = arrays["gene_rows"], arrays["gene_gate"], arrays["gene_delta"]
    n = len(rows)
    if rows.ndim != 1 or gate.shape != (n,) or delta.shape != (n, dim):
        return (
            f"{n} gene rows, gates {gate.shape} and corrections {delta.shape} "
            f"(want ({n},) and ({n}, {dim}))"
        )
    if len(np.unique(rows)) != n or (
        n and (rows.min() < 0 or (n_store_genes or np.inf) <= rows.max())
    ):
        return "its gene rows are not distinct rows of the gene table"
    if not (np.isfinite(gate).all() and (gate > 0).all() and np.isfinite(delta).all()):
        return "its gates or corrections are not finite positive numbers"
    return None


def _require_table(name: str, recipe: Recipe, genes) -> None:
    """Refuse gene table `genes` unless prior `name` (`recipe`) was built on it: its gene
    rows would name other genes."""
    if recipe.model != genes.model or recipe.gene_table_hash != genes.meta.get("content_hash"):
        raise StoreError(
            f"Prior {name!r} was built on the {recipe.model} gene table {recipe.gene_table_hash}; "
            f"this atlas uses the {genes.model} table {genes.meta.get('content_hash')}. Build "
            "the prior on the same store and model (`cellvec prior build --model`)."
        )


def load_prior(store: Store | str | Path | StoreLocation, name: str, genes=None) -> Prior:
    """Prior `name` of the store; with `genes` (the gene table its atlases use), refused
    when it was built on another one (its gene rows would name other genes)."""
    store = Store.of(store)
    meta = _stored_meta(store, name)
    recipe = Recipe.from_dict(meta["recipe"])
    if genes is not None:
        _require_table(name, recipe, genes)
    arrays = load_artifact(store, recipe.head_hash)
    problem = _inconsistent(arrays, recipe.dimension, len(genes.vectors) if genes else None)
    if problem:
        raise StoreError(
            f"Prior {name!r} of {store} is not usable: {problem}. Rebuild it with `cellvec "
            "prior build`."
        )
    return Prior(
        name=name,
        recipe=recipe,
        background=load_artifact(store, recipe.background_hash) if recipe.background_hash else {},
        gene_rows=arrays["gene_rows"],
        gate=arrays["gene_gate"],
        delta=arrays["gene_delta"],
        head={k: arrays[k] for k in HEAD_KEYS},
        meta=meta,
    )
